"""The captured loss-and-gradient graph against the eager Pyro ELBO it was captured from."""

from __future__ import annotations

import dataclasses
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import ModelConfig, TrainConfig, build_vae, load_data, make_elbo
from pyro_vae.objectives.capture import CompiledLoss
from pyro_vae.objectives.free_bits import FreeBitsELBO
from pyro_vae.training.fit import fit
from pyro_vae.training.schedules import LatentScale

SMALL = ModelConfig(latent_dims=(3,), hidden=(16,))
NUM_DATA = 1000


@pytest.fixture
def eager_pyro():
    """The trainer's setting: Pyro validation off (the param-store registration is each
    model's own; the compiled loss turns it off where it captures and checks)."""
    with pyro.validation_enabled(False):
        yield


def _batch(seed: int = 1, size: int = 20) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(size, 64, generator=generator), generator=generator)


def _loss_and_grads(compiled: CompiledLoss, x: torch.Tensor, seed: int, eager: bool = False):
    compiled.owner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if eager:
        loss = compiled._eager((x,), {"num_data": NUM_DATA})
    else:
        loss = compiled.loss_and_grads(x, num_data=NUM_DATA)
    grads = [p.grad.clone() if p.grad is not None else None for p in compiled.owner.parameters()]
    return loss, grads


def _assert_same(first, second) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


CASES = {
    "mc": (SMALL, "mc", 1),
    "mc, 3 vectorized particles": (SMALL, "mc", 3),
    "analytic": (SMALL, "analytic", 1),
    "iwae K=5": (SMALL, "iwae", 5),
    "renyi": (SMALL, "renyi", 4),
    "stl": (SMALL, "stl", 2),
    "dreg": (SMALL, "dreg", 3),
    "penalty": (SMALL, "penalty", 1),
    "learned gaussian scale": (
        dataclasses.replace(SMALL, likelihood="gaussian", gaussian_scale=None),
        "mc",
        1,
    ),
    "hierarchical top-down, analytic": (
        dataclasses.replace(SMALL, latent_dims=(4, 2)),
        "analytic",
        1,
    ),
    "hierarchical bottom-up, dreg": (
        dataclasses.replace(SMALL, latent_dims=(4, 2), guide="bottom-up"),
        "dreg",
        3,
    ),
    "conv": (dataclasses.replace(SMALL, network="conv", hidden=(8,)), "mc", 1),
}


@pytest.mark.parametrize("case", CASES)
def test_graph_equals_the_eager_elbo_in_value_and_gradient(case, eager_pyro):
    """Same noise, same loss and gradients; then again after the parameters moved.

    The second comparison catches a value baked into the graph at capture time (it
    would still match at the capture's parameters). On CPU the two agree bit for bit
    here; the tolerance only allows for other kernels elsewhere.
    """
    config, estimator, particles = CASES[case]
    torch.manual_seed(0)
    vae = build_vae(config, (1, 8, 8))
    compiled = CompiledLoss(make_elbo(estimator, particles), vae)
    x = _batch()
    _assert_same(_loss_and_grads(compiled, x, 5), _loss_and_grads(compiled, x, 5, eager=True))
    assert len(compiled.graphs) == 1 and not compiled.fallbacks
    optimizer = torch.optim.Adam(vae.parameters(), lr=0.02)
    for _ in range(3):
        _loss_and_grads(compiled, x, 7)
        optimizer.step()
    other = _batch(seed=2)
    _assert_same(
        _loss_and_grads(compiled, other, 11), _loss_and_grads(compiled, other, 11, eager=True)
    )


def test_each_replay_draws_fresh_noise_from_the_global_generator(eager_pyro):
    torch.manual_seed(0)
    compiled = CompiledLoss(make_elbo("mc"), build_vae(SMALL, (1, 8, 8)))
    x = _batch()
    first, again = _loss_and_grads(compiled, x, 3), _loss_and_grads(compiled, x, 3)
    assert first[0] == again[0]
    compiled.owner.zero_grad(set_to_none=True)
    losses = {compiled.loss_and_grads(x, num_data=NUM_DATA) for _ in range(5)}
    assert len(losses) == 5


def test_gradients_accumulate_like_backward(eager_pyro):
    torch.manual_seed(0)
    compiled = CompiledLoss(make_elbo("analytic"), build_vae(SMALL, (1, 8, 8)))
    x = _batch()
    _, once = _loss_and_grads(compiled, x, 3)
    torch.manual_seed(3)
    compiled.loss_and_grads(x, num_data=NUM_DATA)  # on top of the grads already there
    for single, param in zip(once, compiled.owner.parameters()):
        torch.testing.assert_close(param.grad, 2 * single)


def test_one_graph_per_input_shape_shared_by_later_fits_of_the_same_module(eager_pyro):
    torch.manual_seed(0)
    vae = build_vae(SMALL, (1, 8, 8))
    compiled = CompiledLoss(make_elbo("mc"), vae)
    for size in (20, 20, 7, 20):
        compiled.loss_and_grads(_batch(size=size), num_data=NUM_DATA)
    assert len(compiled.graphs) == 2
    assert CompiledLoss(make_elbo("mc"), vae).graphs is compiled.graphs
    other = CompiledLoss(make_elbo("mc", 2), vae)  # another estimator: its own graphs
    other.loss_and_grads(_batch(), num_data=NUM_DATA)
    assert len(compiled.graphs) == 3


@pytest.mark.parametrize(
    "setting",
    ["inside a Pyro handler (KL warm-up)", "Pyro validation on", "free bits"],
)
def test_runs_eagerly_where_a_graph_would_be_wrong(setting, eager_pyro):
    torch.manual_seed(0)
    vae = build_vae(SMALL, (1, 8, 8))
    elbo = FreeBitsELBO(1, 0.5, "analytic") if setting == "free bits" else make_elbo("mc")
    compiled = CompiledLoss(elbo, vae)
    x = _batch()
    contexts = {
        "inside a Pyro handler (KL warm-up)": LatentScale(0.3),
        "Pyro validation on": pyro.validation_enabled(True),
        "free bits": pyro.validation_enabled(False),
    }
    with contexts[setting]:
        torch.manual_seed(4)
        loss = compiled.loss_and_grads(x, num_data=NUM_DATA)
        vae.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        expected = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=NUM_DATA)
    assert not compiled.graphs
    assert loss == pytest.approx(expected.item(), rel=1e-6)


class _DataDependent(nn.Module):
    """A model whose structure depends on a tensor's value: no static graph exists."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(2))

    def model(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            if float(z.sum()) > 0:  # Python control flow on a sampled value
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
            else:
                pyro.sample("x", dist.Normal(-z, 1.0).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc, 1.0).to_event(1))


def test_a_model_with_data_dependent_control_flow_falls_back_with_a_warning(eager_pyro):
    module = _DataDependent()
    compiled = CompiledLoss(make_elbo("mc"), module)
    x = torch.randn(5, 2)
    with pytest.warns(UserWarning, match="the loss runs eagerly for inputs .*capture failed"):
        loss = compiled.loss_and_grads(x)
    assert compiled.graphs and all(graph is None for graph in compiled.graphs.values())
    assert torch.isfinite(torch.tensor(loss)) and module.loc.grad is not None


def test_fit_trains_the_same_parameters_compiled_or_eager():
    data = load_data("digits", limit=120)
    states = {}
    for compile_ in (True, False):
        torch.manual_seed(0)
        vae = build_vae(SMALL, data.data_shape)
        config = TrainConfig(
            epochs=2, batch_size=50, compile=compile_, estimator="iwae", particles=3
        )
        history = fit(vae, data, config, progress=False, log=None)
        states[compile_] = (history["train_elbo"], vae.state_dict())
    assert states[True][0] == pytest.approx(states[False][0], rel=1e-6)
    for name, value in states[True][1].items():
        torch.testing.assert_close(value, states[False][1][name], rtol=1e-5, atol=1e-6)


def test_a_graph_that_disagrees_with_the_elbo_is_not_used(eager_pyro, monkeypatch):
    torch.manual_seed(0)
    compiled = CompiledLoss(make_elbo("mc"), build_vae(SMALL, (1, 8, 8)))
    eager = compiled._eager
    monkeypatch.setattr(compiled, "_eager", lambda args, kwargs: eager(args, kwargs) * 1.001)
    with pytest.warns(UserWarning, match="the graph's loss .* is not the ELBO's"):
        compiled.loss_and_grads(_batch(), num_data=NUM_DATA)
    assert list(compiled.graphs.values()) == [None]


class _DiscreteLatent(nn.Module):
    """A Bernoulli latent: Trace_ELBO needs its score-function term, eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(1))

    def model(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(2 * z, 1.0), obs=x)

    def guide(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=self.logit.expand(x.shape[0])))


def test_a_guide_without_reparameterization_trains_with_the_eager_trace_elbo(eager_pyro):
    module = _DiscreteLatent()
    compiled = CompiledLoss(make_elbo("mc"), module)
    x = torch.randn(6)
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="guide site 'z' is not reparameterized"):
        loss = compiled.loss_and_grads(x)
    grad = module.logit.grad.clone()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    expected = make_elbo("mc").differentiable_loss(module.model, module.guide, x)
    expected.backward()
    assert loss == pytest.approx(expected.item()) and torch.equal(grad, module.logit.grad)


def test_the_graph_reports_its_gradients_square_sum_for_the_finite_check(eager_pyro):
    torch.manual_seed(0)
    compiled = CompiledLoss(make_elbo("mc"), build_vae(SMALL, (1, 8, 8)))
    _, grads = _loss_and_grads(compiled, _batch(), 3)
    exact = sum(float(g.double().pow(2).sum()) for g in grads)
    assert compiled.grad_square_sum == pytest.approx(exact, rel=1e-5)  # float32 dots
    assert compiled.grad_square_sum >= max(float(g.abs().max()) for g in grads) ** 2
    module = next(g for g in compiled.graphs.values() if g is not None).module
    targets = [node.target for node in module.graph.nodes]
    assert torch.ops.aten.dot.default in targets and torch.ops.aten.aminmax.default not in targets
    nodes = list(module.graph.nodes)
    for grad in nodes[-1].args[0][2:]:  # each reduced right after it is produced
        following = [node.target for node in nodes[nodes.index(grad) + 1 :][:3]]
        assert torch.ops.aten.dot.default in following, (grad.name, following)
    compiled._eager((_batch(),), {"num_data": NUM_DATA})
    assert compiled.grad_square_sum is None  # an eager step leaves the check to the trainer


# ---------------------------------------------------------------------- the graph passes
def _captured_numbers(case: str, monkeypatch, passes: bool):
    """Loss and gradients of a fresh capture of ``case`` (with or without the passes that
    drop repeated values and reuse dead buffers), twice, from fixed noise."""
    from pyro_vae.objectives.capture import graphs as capture

    with monkeypatch.context() as patched:
        if not passes:
            patched.setattr(capture, "drop_identities", lambda graph: 0)
            patched.setattr(capture, "reuse_buffers", lambda graph: 0)
        config, estimator, particles = CASES[case]
        torch.manual_seed(0)
        vae = build_vae(config, (1, 8, 8))
        compiled = CompiledLoss(make_elbo(estimator, particles), vae)
        x = _batch()
        first = _loss_and_grads(compiled, x, 5)
        second = _loss_and_grads(compiled, _batch(seed=2), 9)  # replayed, not the check
        graph = next(g for g in compiled.graphs.values() if g is not None)
        return first, second, str(graph.module.code)


@pytest.mark.parametrize("case", ["mc", "analytic", "iwae K=5", "stl", "dreg", "conv"])
def test_graph_passes_change_no_number(case, eager_pyro, monkeypatch):
    """Dropping repeated values and computing in place where a buffer is dead leave every
    loss and gradient identical, bit for bit, to the graph as recorded."""
    *with_passes, code = _captured_numbers(case, monkeypatch, passes=True)
    *without, plain_code = _captured_numbers(case, monkeypatch, passes=False)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(with_passes, without):
        assert loss_a == loss_b
        for a, b in zip(grads_a, grads_b):
            assert (a is None) == (b is None)
            assert a is None or torch.equal(a, b)
    assert "_.Tensor(" in code and "_.Tensor(" not in plain_code  # in place somewhere
    assert code.count("torch.ops.aten.") < plain_code.count("torch.ops.aten.")


def _traced(function, *inputs):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(function, tracing_mode="fake")(*inputs)


def test_buffers_are_reused_only_when_nothing_reads_them_afterwards():
    from pyro_vae.objectives.capture import drop_identities, replay_function, reuse_buffers

    def function(a, b):
        fresh = a * 2.0  # fresh memory, but a view of it is returned: kept
        view = fresh.t()
        dead = torch.sigmoid(a)  # fresh and dead after the subtraction: reused
        chained = (dead - b) * b
        kept = a + b  # its operand is an input: never written
        return fresh + 1.0, view, chained, kept, (b * 1.0).sum()

    a, b = torch.randn(3, 3), torch.randn(3, 3)
    module = _traced(function, a, b)
    drop_identities(module.graph)
    assert reuse_buffers(module.graph) == 2  # the subtraction and the product after it
    module.recompile()
    code = str(module.code)
    assert "sub_.Tensor(sigmoid" in code and "mul_.Tensor(sub" in code
    assert "add.Tensor(a_1" in code and "add_.Tensor(mul" not in code
    before = [t.clone() for t in (a, b)]
    got = replay_function(module)(a, b)
    for value, expected in zip(got, function(a, b)):
        assert torch.equal(value, expected)
    assert all(torch.equal(t, u) for t, u in zip((a, b), before))  # inputs untouched


def test_identities_are_dropped_but_outputs_stay_distinct_tensors():
    from pyro_vae.objectives.capture import drop_identities, replay_function

    def function(a):
        same = (a * 1).t().t() / 1
        return same + torch.neg(torch.neg(a)), a.view(3, 3), torch.ops.aten.alias(a)

    a = torch.randn(3, 3)
    module = _traced(function, a)
    assert drop_identities(module.graph) >= 4
    module.recompile()
    code = str(module.code)
    assert "mul" not in code and "div" not in code and "neg" not in code
    got = replay_function(module)(a)
    assert torch.equal(got[0], 2 * a)
    assert all(value is not a for value in got)  # what the graph returns is its own tensor


def test_a_returned_value_is_replaced_only_by_memory_no_other_returned_value_shares():
    from pyro_vae.objectives.capture import drop_identities, replay_function

    def function(a):
        own = (a * 2.0).t().t()  # becomes the product itself
        shared = a * 3.0
        return own, shared.t().t(), shared.t()  # the second keeps its transposes

    a = torch.randn(3, 4)
    module = _traced(function, a)
    drop_identities(module.graph)
    module.recompile()
    outputs = list(module.graph.nodes)[-1].args[0]
    assert outputs[0].target is torch.ops.aten.mul.Tensor
    assert outputs[1].target is torch.ops.aten.t.default
    got = replay_function(module)(a)
    assert all(torch.equal(x, y) for x, y in zip(got, function(a)))
    assert got[1].data_ptr() == got[2].data_ptr()  # as recorded: the two share memory


def test_the_square_sum_bounds_the_largest_entry_and_catches_what_it_must():
    from pyro_vae.objectives.capture.compiled import largest, square_sum

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 3, generator=generator), -7 * torch.rand(4, generator=generator)]
    tensors.append(torch.randn(3, 4, generator=generator).t())  # not contiguous
    squares = float(square_sum(tensors))
    assert squares == pytest.approx(sum(float(t.double().pow(2).sum()) for t in tensors))
    assert squares >= float(torch.stack([largest(t) for t in tensors]).amax()) ** 2
    for bad in (float("nan"), float("inf"), -float("inf"), 2.0**64):
        broken = [t.clone() for t in tensors]
        broken[1][2] = bad
        assert not math.isfinite(float(square_sum(broken)))


def test_the_fast_finite_check_never_passes_what_the_largest_entry_refuses():
    # the fast path (the square sum) against the slow one (the largest entry), over
    # random gradient sets at every scale up to float32's overflow and at its edges:
    # where the fast check passes, the largest entry passes too (so the verdict is the
    # largest entry's); and at ordinary scales it settles the check alone
    from pyro_vae.objectives.capture.compiled import largest, passes_fast, square_sum
    from pyro_vae.training.optimization import GRADIENT_LIMIT

    generator = torch.Generator().manual_seed(1)
    below = float(torch.tensor(2.0**64).nextafter(torch.tensor(0.0)))  # largest that fits
    settled = 0
    for trial in range(400):
        count = int(torch.randint(1, 5, (1,), generator=generator))
        sizes = torch.randint(1, 300, (count,), generator=generator)
        scale = 10.0 ** float(torch.empty(()).uniform_(-30, 20, generator=generator))
        tensors = [torch.randn(int(n), generator=generator) * scale for n in sizes]
        if trial % 4 == 1:  # an entry at the edge of what Adam can square
            tensors[0][0] = below if trial % 8 == 1 else 2.0**64
        if trial % 10 == 3:
            tensors[-1][-1] = float("nan")
        for limit in (GRADIENT_LIMIT, math.inf, 1e3):
            largest_entry = float(torch.stack([largest(t) for t in tensors]).amax())
            exact = math.isfinite(largest_entry) and largest_entry <= limit
            fast = passes_fast(float(square_sum(tensors)), limit)
            assert exact or not fast, (trial, limit, largest_entry)
            settled += fast == exact
    assert settled > 0.8 * 1200
