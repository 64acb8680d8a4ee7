"""The trainer's extension points: callbacks (the guide's example runs), and the
optimization handed to it from outside."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pyro_vae import ModelConfig, TrainConfig, build_vae, load_data
from pyro_vae.training.callbacks import Callback
from pyro_vae.training.fit import fit
from pyro_vae.training.optimization import Optimization, build_schedule
from pyro_vae.training.trainer import Trainer

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide" / "training.md"
MODEL = ModelConfig(latent_dims=(2,), hidden=(16,))


@pytest.fixture(scope="module")
def data():
    return load_data("digits", validation_size=50, limit=300)


def _vae(data):
    torch.manual_seed(0)
    return build_vae(MODEL, data.data_shape)


def test_the_callback_example_of_the_training_guide_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert blocks, "the guide's callback example is gone"
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), {"__name__": "docs_example"})
    assert "parameter norm" in capsys.readouterr().out


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_train_start(self, trainer):
        self.calls.append(f"start {trainer.epoch}")

    def on_evaluate(self, trainer):
        self.calls.append(f"evaluate {trainer.epoch}")
        return {"mine": float(trainer.epoch)}

    def should_stop(self, trainer, metrics):
        self.calls.append(f"stop? {metrics['epoch']} finished={trainer.finished}")
        return False

    def on_epoch_end(self, trainer, metrics):
        self.calls.append(f"end {metrics['epoch']} finished={trainer.finished}")

    def on_train_end(self, trainer):
        self.calls.append(f"done {trainer.epoch}")


def test_the_hooks_run_in_order_and_a_metric_of_ones_own_is_recorded(data, tmp_path):
    config = TrainConfig(epochs=2, batch_size=64, monitor_images=50)
    plain = fit(_vae(data), data, config, progress=False, log=None)
    recorder = Recorder()
    history = fit(
        _vae(data), data, config, run_dir=tmp_path, callbacks=[recorder], progress=False, log=None
    )
    assert recorder.calls == [
        "start 0",
        "evaluate 1",
        "stop? 1 finished=False",
        "end 1 finished=False",
        "evaluate 2",
        "stop? 2 finished=False",
        "end 2 finished=True",
        "done 2",
    ]
    keys = list(history.last)
    assert keys.index("validation_elbo") < keys.index("mine") < keys.index("seconds")
    assert history["mine"] == [1.0, 2.0]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["mine"] for line in lines] == [1.0, 2.0]
    for key in ("train_elbo", "test_elbo", "validation_elbo", "lr", "kl_factor"):
        assert history[key] == plain[key]  # a callback that only measures changes nothing


def test_a_callback_ends_the_run_and_early_stopping_is_not_claimed(data):
    class Once(Callback):
        def should_stop(self, trainer, metrics):
            return True

    history = fit(
        _vae(data),
        data,
        TrainConfig(epochs=4, monitor_images=50),
        callbacks=[Once()],
        progress=False,
        log=None,
    )
    assert len(history) == 1 and not history.stopped_early


def test_the_trainer_takes_the_optimization_it_is_handed(data):
    config = TrainConfig(epochs=1, lr=0.01, monitor_images=50)
    handed = Optimization(
        build=lambda parameters: torch.optim.SGD(parameters, lr=0.01),
        schedule=lambda epoch: 0.005,
        gradient_limit=float("inf"),
    )
    trainer = Trainer(_vae(data), data, config, optimization=handed)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    history = trainer.run(progress=False, log=None)
    assert history["lr"] == [0.005]
    assert build_schedule(config)(0) == 0.01
