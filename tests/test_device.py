"""The device path: data follows the model to its device, RNG forks cover the model's
device, and the commands that measure (compare, diagnose, reproduce) take ``--device``.

No GPU is needed: the helpers are checked on the ``meta`` device (a second device that
every torch has), the commands' refusal of an absent GPU on this machine, and the
parity script ``benchmarks/device_check.py`` (every command on the CPU and on a device)
runs here with the CPU on both sides; on a GPU machine it runs CUDA against the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pyro_vae import ModelConfig, build_vae
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import as_batch, forked_rng, model_device, on_model_device
from tests.helpers import TINY_COMPARE, TINY_RUN, digest, run_cli

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def tiny_vae():
    torch.manual_seed(0)
    return build_vae(ModelConfig(latent_dims=(2,), hidden=(8,)), (1, 4, 4))


class StoreOnly:
    """A user's model whose parameters live in Pyro's param store: no tensors of its own."""

    def model(self, x):
        loc = pyro.param("loc", torch.zeros(x.shape[-1]))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", dist.Normal(loc + z, 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))


class BuffersOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(3))


# ---------------------------------------------------------------------- the helpers
def test_the_model_device_is_its_first_tensor_s_or_none():
    vae = tiny_vae()
    assert model_device(vae) == torch.device("cpu")
    assert model_device(vae.to("meta")) == torch.device("meta")
    assert model_device(BuffersOnly().to("meta")) == torch.device("meta")
    assert model_device(StoreOnly()) is None


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 5),
    shape=st.sampled_from([(1, 4, 4), (16,)]),
    meta=st.booleans(),
)
def test_data_follows_the_model_to_its_device_and_keeps_its_values(batch, shape, meta):
    """Drawn batch sizes and layouts (flattened or not); the model on the CPU or on a
    second device: what the model gets is on its device, flattened as it flattens."""
    vae = tiny_vae()
    x = torch.rand(batch, *shape)
    if meta:
        vae = vae.to("meta")
    out = as_batch(vae, x)
    assert out.device == model_device(vae)
    assert out.shape == (batch, 16)
    if not meta:
        assert torch.equal(out, x.reshape(batch, 16))
    # already there: the very tensor, no copy
    assert on_model_device(vae, out) is out
    # a model without tensors of its own takes data where it is
    assert on_model_device(StoreOnly(), x) is x


def test_a_forked_rng_gives_the_caller_its_stream_back():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with forked_rng():
        torch.manual_seed(0)
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------- the commands
@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("command", ["compare", "reproduce"])
def test_device_cuda_without_a_gpu_is_one_line_and_writes_nothing(command, tmp_path, capsys):
    out = tmp_path / "out"
    if command == "compare":
        argv = ["compare", *TINY_COMPARE, "--estimators", "mc", "--out", out]
    else:
        argv = ["reproduce", "iwae-table1", "--cells", "1l-vae-k1", "--dataset", "digits",
                "--limit", "100", "--epochs", "1", "--out", out]  # fmt: skip
    code, _, err = run_cli([*argv, "--device", "cuda"], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "CUDA is not available" in err and "--device cpu" in err, err
    assert not (out / "comparison.json").exists() and not any(out.rglob("checkpoint.pt"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_diagnose_on_cuda_without_a_gpu_leaves_the_run_as_it_was(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *TINY_RUN, "--epochs", "1", "--out", run], capsys)
    assert code == 0, err
    before = digest(run)
    code, _, err = run_cli(["diagnose", run, "--device", "cuda", "--quiet"], capsys)
    assert code == 2 and "CUDA is not available" in err and "--device cpu" in err, err
    assert err.count("\n") == 1
    assert digest(run) == before


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_a_run_may_resume_on_another_device_and_is_refused_only_for_want_of_one(tmp_path, capsys):
    """--device is free on resume (a run started on the CPU goes on on a GPU): asking for
    one here is refused because there is none, not because the setting changed; the run
    is left as it was. The same flag on the CPU continues the run."""
    run = tmp_path / "run"
    flags = ["train", *TINY_RUN, "--eval-samples", "0", "--out", run]
    assert run_cli([*flags, "--epochs", "1"], capsys)[0] == 0
    before = digest(run)
    code, _, err = run_cli([*flags, "--epochs", "2", "--resume", "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err and "may change" not in err, err
    assert digest(run) == before
    code, _, err = run_cli([*flags, "--epochs", "2", "--resume", "--device", "cpu"], capsys)
    assert code == 0, err


def test_compute_diagnosis_names_a_device_it_does_not_know(tmp_path):
    from pyro_vae.app.diagnose import compute_diagnosis

    with pytest.raises(UserInputError, match="`device` must be 'cpu' or 'cuda', got 'gpu'"):
        compute_diagnosis(tmp_path, device="gpu")


def test_help_of_the_measuring_commands_offers_a_device(capsys):
    for command in ("compare", "diagnose", "reproduce", "train", "evaluate"):
        code, out, _ = run_cli([command, "--help"], capsys)
        assert code == 0 and "--device {cpu,cuda}" in out, (command, out)


def load_device_check():
    spec = importlib.util.spec_from_file_location(
        "device_check", ROOT / "benchmarks" / "device_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module
    spec.loader.exec_module(module)
    return module


def test_the_parity_check_finds_a_number_lost_on_the_device():
    check = load_device_check()
    cpu = {"a": 1.0, "b": [2.0, {"c": 3.0}], "d": None, "e": float("nan"), "f": True}
    assert check.not_finite_where_cpu_is(cpu, cpu) == []
    other = json.loads(json.dumps(cpu))
    other["b"][1]["c"] = float("inf")
    other["e"] = float("inf")  # not finite on the CPU either: not the device's doing
    assert check.not_finite_where_cpu_is(cpu, other) == [".b[1].c"]


def test_the_parity_script_runs_every_command_on_both_sides(tmp_path, capsys):
    """Here the CPU against itself, where the two sides must agree exactly; with a GPU
    (``--device cuda``) the same script is the CUDA check."""
    check = load_device_check()
    code = check.main(["--device", "cpu", "--out", str(tmp_path / "check")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all checks hold" in out
    result = json.loads((tmp_path / "check" / "device_check.json").read_text())
    assert result["failures"] == []
    assert set(result["seconds"]) == {"train", "evaluate", "compare", "diagnose", "sample"}
    assert all(
        set(times) == {"cpu", "device"}
        for name, times in result["seconds"].items()
        if name != "sample"  # sample loads on the CPU: only the device-trained run's
    )


def test_the_parity_script_records_a_failing_command_and_goes_on(tmp_path):
    check = load_device_check().Check(tmp_path, "cpu")
    assert check.command("evaluate", "cpu", "evaluate", str(tmp_path / "missing")) is None
    assert check.command("evaluate", "device", "evaluate", "--samples", "x") is None
    assert len(check.failures) == 2 and "evaluate (cpu, evaluate)" in check.failures[0]
    assert "missing" in check.failures[0], check.failures
