"""One test per assumption that pyro_vae.compat makes about torch's and Pyro's internals.

A torch or Pyro upgrade that breaks one of them fails here, by name; the fallbacks are
tested too (the fast paths then run the public, slower way, with the same numbers).
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_vae import ModelConfig, TrainConfig, build_vae, compat, load_data
from pyro_vae.models.vae import param_store_registration
from pyro_vae.objectives.capture import CompiledLoss
from pyro_vae.objectives.closed_form import ClosedFormKL_ELBO
from pyro_vae.objectives.registry import make_elbo
from pyro_vae.training.fit import fit
from pyro_vae.training.schedules import LatentScale


def _vae():
    torch.manual_seed(0)
    return build_vae(ModelConfig(latent_dims=(3,), hidden=(16,)), (1, 8, 8))


def _batch():
    return torch.bernoulli(torch.rand(20, 64, generator=torch.Generator().manual_seed(1)))


def test_make_fx_records_aten_operations_on_fake_tensors_without_touching_real_ones():
    real = torch.ones(3)

    def function(t):
        t.add_(1)  # an in-place change, recorded, not applied to the real tensor
        return t * 2

    graph = compat.make_fx_fake(function)(real)
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.aten.add_.Tensor in targets and torch.ops.aten.mul.Tensor in targets
    assert torch.equal(real, torch.ones(3))
    assert compat.tracing_stack_loaded()


def test_an_operators_entry_point_computes_what_the_overload_computes():
    overload = torch.ops.aten.add.Tensor
    entry = compat.operator_entry(overload)
    assert entry is not overload and callable(entry)
    a, b = torch.randn(4), torch.randn(4)
    assert torch.equal(entry(a, b), overload(a, b))
    assert compat.operator_entry(len) is len  # anything else is kept as it is


def test_without_an_entry_point_the_overload_itself_is_used(monkeypatch):
    class Overload:  # an OpOverload whose _op went away
        pass

    monkeypatch.setattr(compat, "_overload_type", lambda: Overload)
    target = Overload()
    assert compat.operator_entry(target) is target


def test_the_replay_falls_back_to_calling_the_overloads_with_the_same_numbers(monkeypatch):
    results = []
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(compat, "operator_entry", lambda target: target)
        vae = _vae()
        loss = CompiledLoss(make_elbo("mc"), vae)
        torch.manual_seed(2)
        with pyro.validation_enabled(False), param_store_registration(vae, False):
            results.append(loss.loss_and_grads(_batch(), num_data=100))
            assert any(g is not None for g in loss.graphs.values())
    assert results[0] == results[1]


@pytest.mark.parametrize("particles,vectorize", [(1, False), (3, True), (2, False)])
def test_an_elbos_traces_carry_log_prob_sums_at_every_sample_site(particles, vectorize):
    vae = _vae()
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)
    with pyro.validation_enabled(False):
        pairs = list(compat.elbo_traces(elbo, vae.model, vae.guide, (_batch(),), {}))
    assert len(pairs) == (1 if vectorize else particles)
    for model_trace, guide_trace in pairs:
        for trace in (model_trace, guide_trace):
            sites = [s for s in trace.nodes.values() if s["type"] == "sample"]
            assert sites and all(torch.is_tensor(s["log_prob_sum"]) for s in sites)


def test_pyro_calls_the_per_particle_term_closed_form_kl_overrides():
    """ClosedFormKL_ELBO overrides TraceMeanField_ELBO's _get_trace and
    _differentiable_loss_particle: Pyro's loss methods must go through them."""
    calls = {"trace": 0, "particle": 0}

    class Spy(ClosedFormKL_ELBO):
        def _get_trace(self, *args):
            calls["trace"] += 1
            return super()._get_trace(*args)

        def differentiable_elbo_particle(self, *args):
            calls["particle"] += 1
            return super().differentiable_elbo_particle(*args)

    vae = _vae()
    with pyro.validation_enabled(False):
        Spy(num_particles=2).differentiable_loss(vae.model, vae.guide, _batch())
    assert calls == {"trace": 2, "particle": 2}
    assert issubclass(ClosedFormKL_ELBO, TraceMeanField_ELBO)


def test_a_tensors_version_moves_with_every_in_place_change():
    tensor = torch.zeros(3)
    before = compat.tensor_version(tensor)
    tensor.add_(1)
    assert isinstance(before, int) and compat.tensor_version(tensor) > before
    assert compat.tensor_version(object()) is None  # unknown: callers check every time


def test_hooks_registered_on_a_module_or_globally_are_seen():
    module = nn.Linear(2, 2)
    empty = compat.module_hooks(module)
    assert all(hooks == () for hooks in empty)
    handle = module.register_forward_hook(lambda m, i, o: o)
    assert compat.module_hooks(module) != empty
    handle.remove()
    assert compat.module_hooks(module) == empty
    before = compat.global_module_hooks()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert compat.global_module_hooks() != before
    finally:
        handle.remove()
    assert compat.global_module_hooks() == before


def test_a_trace_of_values_is_replayed_into_latent_sites_that_handlers_still_see():
    value = torch.full((4, 2), 0.5)

    def model():
        with pyro.plate("data", 4):
            return pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    replayed = poutine.replay(model, trace=compat.values_trace({"z": value}))
    with LatentScale(0.25):
        trace = poutine.trace(replayed).get_trace()
    site = trace.nodes["z"]
    assert site["value"] is value and not site["is_observed"] and site["scale"] == 0.25


def test_without_make_fx_training_runs_eagerly_with_a_warning(monkeypatch):
    def unavailable(function):
        raise compat.NotCompilable("torch has no make_fx (test)")

    monkeypatch.setattr(compat, "make_fx_fake", unavailable)
    data = load_data("digits", limit=60)
    vae = _vae()
    with pytest.warns(UserWarning, match="torch has no make_fx"):
        history = fit(
            vae, data, TrainConfig(epochs=1, batch_size=30, compile=True), log=None, progress=False
        )
    assert len(history) == 1


def test_autocast_runs_eagerly():
    vae = _vae()
    loss = CompiledLoss(make_elbo("mc"), vae)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pyro.validation_enabled(False),
        param_store_registration(vae, False),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        loss.loss_and_grads(_batch(), num_data=100)
    assert not loss.graphs
