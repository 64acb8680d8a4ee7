"""Your own estimator and your own model, first-class: every tool takes a name, an import
path, an :class:`~pyro_vae.Estimator` or an ELBO object, and any Pyro ELBO.

The user's code the command line names by import path is ``examples/own_code.py`` (a
3-layer convolutional VAE factory and a beta-ELBO estimator spec), put on the path as a
user would with ``PYTHONPATH=examples``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

import pyro_vae as pv
from pyro_vae.app.compare import as_run_config
from pyro_vae.app.compare_checks import check_executor_reaches, parse_estimators
from pyro_vae.config import RunConfig, TrainConfig
from pyro_vae.errors import UserInputError
from pyro_vae.objectives.adapters import LossAndGradsAdapter
from pyro_vae.objectives.capture import traceable_loss
from pyro_vae.objectives.registry import ESTIMATORS, Option, estimator_spec, make_elbo
from tests.helpers import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class MyELBO(Trace_ELBO):
    """A user's subclass that changes nothing of the loss: captured as Trace_ELBO."""


class OverridingELBO(Trace_ELBO):
    """A user's subclass that overrides the loss (here with the same value): eager."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        return super()._differentiable_loss_particle(model_trace, guide_trace)


@pytest.fixture
def own_code(monkeypatch):
    """``examples/`` on the import path, as ``PYTHONPATH=examples`` puts it."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])
    )
    import own_code as module

    return module


@pytest.fixture
def registry():
    """The registry, put back as it was after the test (registrations are per process)."""
    before = dict(ESTIMATORS)
    yield ESTIMATORS
    ESTIMATORS.clear()
    ESTIMATORS.update(before)


def _small(seed: int = 0):
    torch.manual_seed(seed)
    return pv.build_vae(pv.ModelConfig(latent_dims=(3,), hidden=(16,)), (1, 8, 8))


def _digits(limit: int = 100):
    return pv.DataConfig(dataset="digits", limit=limit).load(seed=0)


def _grads(vae) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in vae.parameters()]


# ------------------------------------------------------------------ the spec
def test_an_option_is_typed_checked_and_parsed_with_one_line_errors():
    renyi = estimator_spec("renyi")
    assert renyi.resolve_options({}) == {"alpha": 0.5}
    assert renyi.resolve_options({"alpha": 0}) == {"alpha": 0.0}  # an int is a float here
    assert renyi.parse_options(["alpha=0.25"]) == {"alpha": 0.25}
    for given, message in (
        ({"alpha": "0.3"}, "renyi's option alpha must be a float, got '0.3'"),
        ({"alpha": True}, "must be a float, got True"),
        ({"alpha": math.inf}, "must be finite"),
        ({"alpha": 1}, "alpha = 1 is the ELBO"),
        ({"beta": 1.0}, "estimator renyi has no option 'beta': its options are alpha"),
    ):
        with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
            renyi.resolve_options(given)
    with pytest.raises(UserInputError, match="minimum|>= 0"):
        Option("beta", float, 1.0, minimum=0.0).check(-1.0, "mine")
    with pytest.raises(UserInputError, match="has type"):
        Option("net", list, [])
    with pytest.raises(UserInputError, match="cannot be built with 1 particle.*more than one"):
        make_elbo("pyro.infer:ReweightedWakeSleep", 1)


def test_pyro_elbo_classes_get_options_from_their_signatures_and_claims_from_the_registry():
    renyi = estimator_spec("pyro.infer:RenyiELBO")
    assert renyi.key == "pyro.infer:RenyiELBO" and renyi.is_bound and renyi.has_value
    assert {o.name: (o.type, o.default) for o in renyi.options}["alpha"] == (float, 0.0)
    assert "strict_enumeration_warning" not in {o.name for o in renyi.options}
    tail = estimator_spec("pyro.infer:TraceTailAdaptive_ELBO")
    assert not tail.has_value and not tail.is_bound
    assert estimator_spec("pyro.infer:TraceMeanField_ELBO").closed_form_kl
    assert not estimator_spec(MyELBO).closed_form_kl and estimator_spec(MyELBO).is_bound


def test_register_estimator_adds_a_name_for_every_tool_and_refuses_clashes(registry):
    spec = pv.register_estimator(
        "mine", "pyro_vae.objectives.closed_form:trace_elbo", summary="the ELBO, renamed"
    )
    assert ESTIMATORS["mine"] is spec and TrainConfig(estimator="mine").estimator == "mine"
    assert isinstance(make_elbo("mine", 2), Trace_ELBO)
    with pytest.raises(UserInputError, match="is registered already"):
        pv.register_estimator("mine", "pyro_vae.objectives.closed_form:trace_elbo")
    with pytest.raises(UserInputError, match="is a built-in estimator"):
        pv.register_estimator("mc", "pyro_vae.objectives.closed_form:trace_elbo")
    with pytest.raises(UserInputError, match="looks like an import path"):
        pv.register_estimator("a.b:C", "pyro_vae.objectives.closed_form:trace_elbo")


def test_unknown_estimators_and_paths_are_refused_in_one_line():
    for value, message in (
        ("elbo2", "unknown estimator 'elbo2': choose one of mc"),
        ("nosuch.module:X", "module 'nosuch' is not importable"),
        ("pyro.infer:Nope", "pyro.infer has no 'Nope'"),
        ("pyro.infer:config_enumerate", "pyro.infer:config_enumerate"),
        (42, "unknown estimator 42"),
    ):
        with pytest.raises(UserInputError, match=message):
            spec = estimator_spec(value)
            spec.build(1)  # (a function that is no ELBO factory fails when built)


# ------------------------------------------------------------------ configuration
def test_config_records_an_import_path_and_an_objects_settings_and_rebuilds_them():
    config = RunConfig(train=TrainConfig(estimator=RenyiELBO(alpha=0.3, num_particles=3)))
    train = config.to_dict()["train"]
    assert train["estimator"] == "pyro.infer.renyi_elbo:RenyiELBO"
    assert train["estimator_options"]["alpha"] == 0.3 and train["particles"] == 3
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    rebuilt = make_elbo(
        again.train.estimator, again.train.particles, options=again.train.estimator_options
    )
    assert isinstance(rebuilt, LossAndGradsAdapter)
    assert rebuilt.elbo.alpha == 0.3 and rebuilt.num_particles == 3
    with pytest.raises(UserInputError, match="carries its own settings"):
        TrainConfig(estimator=RenyiELBO(), estimator_options={"alpha": 0.2})
    with pytest.raises(UserInputError, match="num_particles=3 and `particles` is 5"):
        TrainConfig(estimator=RenyiELBO(num_particles=3), particles=5)


def test_a_config_of_an_earlier_version_reads_alpha_as_renyis_option():
    old = RunConfig.from_dict({"train": {"estimator": "renyi", "alpha": 0.3}})
    assert old.train.estimator_options == {"alpha": 0.3}
    assert RunConfig.from_dict({"train": {"estimator": "mc", "alpha": 0.5}}).train == TrainConfig()


# ------------------------------------------------------------------ any Pyro ELBO
def test_the_adapters_gradient_is_the_elbos_own_and_accumulates_like_backward():
    """RenyiELBO has no differentiable_loss: the adapter's surrogate has its loss as value
    and, for the same noise, exactly the gradient its loss_and_grads leaves."""
    vae, x = _small(), _digits().train.images[:20]
    elbo = RenyiELBO(alpha=0.5, num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    with pv.models.protocol.private_param_store(), pyro.validation_enabled(False):
        pyro.set_rng_seed(5)
        for p in vae.parameters():
            p.grad = None
        expected_loss = elbo.loss_and_grads(vae.model, vae.guide, x)
        expected = _grads(vae)
        for p in vae.parameters():
            p.grad = torch.ones_like(p)  # already there: the surrogate's backward adds to it
        pyro.set_rng_seed(5)
        surrogate = LossAndGradsAdapter(elbo).differentiable_loss(vae.model, vae.guide, x)
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in vae.parameters())
        surrogate.backward()
    assert surrogate.item() == pytest.approx(expected_loss, rel=1e-6)
    for got, want in zip(_grads(vae), expected):
        assert torch.equal(got, want + 1)


PYRO_ELBOS = [
    ("pyro.infer:Trace_ELBO", {}),
    ("pyro.infer:TraceMeanField_ELBO", {}),
    ("pyro.infer:RenyiELBO", {"alpha": 0.5}),
    ("pyro.infer:TraceGraph_ELBO", {}),
    ("pyro.infer:ReweightedWakeSleep", {}),
    ("pyro.infer:TraceTailAdaptive_ELBO", {"vectorize_particles": True}),
]


@pytest.mark.parametrize("path,options", PYRO_ELBOS, ids=[p for p, _ in PYRO_ELBOS])
def test_every_pyro_elbo_trains_and_is_measured_by_every_tool(path, options):
    data = _digits(100)
    vae = _small()
    config = TrainConfig(
        estimator=path, particles=2, estimator_options=options, epochs=1, batch_size=50
    )
    history = pv.fit(vae, data, config, progress=False, log=None)
    assert math.isfinite(history.last["train_elbo"]) and math.isfinite(history.last["test_elbo"])
    x = data.test.images[:20]
    stats = pv.estimator_gradient_statistics(vae, x, path, 2, num_draws=3, options=options)
    assert stats["encoder"]["variance"] > 0 and stats["decoder"]["variance"] > 0
    bounds = pv.bound_tightness(
        vae, x, (1, 5), 50, estimators=[estimator_spec(path)], estimator_particles=2
    )
    value = bounds["estimator_objectives"][path]
    assert (value is None) == (not estimator_spec(path).has_value)
    if value is not None:
        assert math.isfinite(value)


def test_a_subclass_is_captured_as_its_base_unless_it_overrides_the_loss():
    assert traceable_loss(MyELBO())[0] is not None
    loss, why = traceable_loss(OverridingELBO())
    assert loss is None and "overrides _differentiable_loss_particle of Trace_ELBO" in why
    assert "capture='differentiable_loss'" in why
    data = _digits(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pv.fit(
            _small(),
            data,
            TrainConfig(estimator=OverridingELBO(), epochs=1, batch_size=50, compile=True),
            progress=False,
            log=None,
        )
    assert any("runs eagerly: OverridingELBO overrides" in str(w.message) for w in caught)


def test_an_overriding_subclass_trains_to_the_same_numbers_as_trace_elbo():
    data = _digits(100)
    histories = []
    for estimator in ("mc", OverridingELBO(vectorize_particles=False)):
        config = TrainConfig(estimator=estimator, epochs=1, batch_size=50, compile=False)
        histories.append(pv.fit(_small(), data, config, progress=False, log=None))
    assert histories[0].last["train_elbo"] == pytest.approx(
        histories[1].last["train_elbo"], rel=1e-6
    )


# ------------------------------------------------------------------ compare
def test_compare_takes_names_paths_and_objects_and_a_model_factory(own_code, tmp_path, registry):
    result = pv.compare_estimators(
        RunConfig(
            model=pv.ModelConfig(factory="own_code:conv_vae", factory_options={"width": 4}),
            data=pv.DataConfig(dataset="digits", limit=100),
            train=TrainConfig(epochs=1, batch_size=50, particles=2),
        ),
        ["mc", "pyro.infer:RenyiELBO", MyELBO(num_particles=2), own_code.BETA_ELBO],
        tmp_path / "cmp",
        eval_samples=10,
        grad_draws=3,
        snr_particles=(1, 2),
        bound_particles=(1, 2),
        progress=False,
        log=None,
    )
    names = [row["estimator"] for row in result["summary"]]
    assert names == ["mc", "pyro.infer:RenyiELBO", f"{__name__}:MyELBO", "beta_elbo"]
    runs = {run["estimator"]: run for run in result["runs"]}
    # every estimator started from the same parameters: their first steps' data agree
    first = {name: run["history"][0] for name, run in runs.items()}
    assert len({round(v["train_elbo"], 6) for k, v in first.items() if k != "beta_elbo"}) >= 1
    for run in result["runs"]:
        saved = json.loads((Path(run["run_dir"]) / "config.json").read_text())
        assert saved["model"]["factory"] == "own_code:conv_vae"
        assert saved["train"]["estimator"] == run["estimator"]


def test_compare_refuses_objects_another_process_cannot_rebuild(registry):
    class Local(Trace_ELBO):
        pass

    keys = parse_estimators(["mc", Local()])
    assert keys[1] == "Local" and "Local" in ESTIMATORS  # registered in this process

    class Ray:
        name = "ray"

    with pytest.raises(UserInputError, match="exist only in this process.*import path"):
        check_executor_reaches(keys, Ray())
    check_executor_reaches(["mc", "pyro.infer:RenyiELBO"], Ray())
    with pytest.raises(UserInputError, match="has no import path"):
        as_run_config(lambda shape: None)


# ------------------------------------------------------------------ the command line
def test_own_model_and_estimator_by_import_path_through_every_command(own_code, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "digits", "--limit", "200", "--batch-size", "50", "--quiet"]
    code, _, err = run_cli(
        [
            "train",
            *common,
            "--model",
            "own_code:conv_vae",
            "--model-option",
            "width=4",
            "--estimator",
            "own_code:BETA_ELBO",
            "--estimator-option",
            "beta=2.0",
            "--epochs",
            "1",
            "--eval-samples",
            "10",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["factory"] == "own_code:conv_vae"
    assert saved["model"]["factory_options"] == {"width": 4}
    assert saved["train"]["estimator"] == "own_code:BETA_ELBO"
    assert saved["train"]["estimator_options"] == {"beta": 2.0}
    assert (out / "plots" / "reconstructions.png").exists()
    code, text, err = run_cli(["evaluate", out, "--samples", "10", "--quiet"], capsys)
    assert code == 0 and "test log p(x), K=10" in text, err
    code, text, err = run_cli(["sample", out, "--n", "4"], capsys)
    assert code == 0 and text.strip().endswith(".png"), err
    code, _, err = run_cli(["train", "--resume", "auto", "--epochs", "2", "--out", out], capsys)
    assert code == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    code, text, _ = run_cli(["estimators", "own_code:BETA_ELBO"], capsys)
    assert code == 0 and "option beta (float, default 1.0)" in text and "not a bound" in text


def test_a_model_flag_with_model_settings_is_refused(own_code, tmp_path, capsys):
    code, _, err = run_cli(
        ["train", "--model", "own_code:conv_vae", "--latent-dims", "4", "--out", tmp_path / "r"],
        capsys,
    )
    assert code == 2 and "do not apply to a model factory" in err, err
    assert not (tmp_path / "r").exists()


def _built_in_a_worker(key: str) -> tuple[str, float]:
    """What a Ray worker rebuilds from a run's recorded import path."""
    from pyro_vae.objectives.registry import estimator_spec as spec_of

    spec = spec_of(key)
    elbo = spec.build(1, options={"beta": 2.0})
    return spec.key, float(elbo.beta)


def test_a_ray_worker_rebuilds_an_estimator_from_its_import_path(own_code):
    """Ray workers import user code as the driver does: here its folder on PYTHONPATH
    (which a local Ray passes on to its workers)."""
    ray = pytest.importorskip("ray")
    import signal

    from pyro_vae.app.executors import make_executor

    # ray.init installs its own SIGTERM/SIGINT handlers in this process: put them back
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ray.cloudpickle.register_pickle_by_value(__import__(__name__, fromlist=["_"]))
        with make_executor("ray", cpus_per_run=1) as executor:
            assert executor.map(_built_in_a_worker, ["own_code:BETA_ELBO"]) == [
                ("own_code:BETA_ELBO", 2.0)
            ]
    finally:
        ray.shutdown()
        for number, handler in handlers.items():
            signal.signal(number, handler)
