"""fit: it learns, it records, it resumes exactly, it never steps on a NaN."""

from __future__ import annotations

import dataclasses
import json
import math

import pyro
import pytest
import torch

from pyro_vae import ModelConfig, TrainConfig, build_vae, load_data, make_elbo
from pyro_vae.errors import DataError, NonFiniteError, UserInputError
from pyro_vae.training.checkpoint import load_checkpoint
from pyro_vae.training.fit import fit
from pyro_vae.training.schedules import LatentScale
from pyro_vae.training.trainer import CHECKPOINT, Trainer

MODEL = ModelConfig(latent_dims=(4,), hidden=(32,))


@pytest.fixture(scope="module")
def small_data():
    return load_data("digits", limit=300)


def _vae(data, seed=0):
    torch.manual_seed(seed)
    return build_vae(MODEL, data.data_shape)


def test_fit_lowers_the_loss_and_records_every_metric(small_data, tmp_path):
    vae = _vae(small_data)
    seen = []
    config = TrainConfig(epochs=15, batch_size=32, lr=3e-3)
    history = fit(vae, small_data, config, run_dir=tmp_path, callbacks=[seen.append], log=None)
    assert len(history) == 15 and len(seen) == 15 and seen[-1] is history.last
    assert history["test_elbo"][-1] > history["test_elbo"][0] + 3
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 15
    record = json.loads(lines[-1])
    for key in (
        "epoch",
        "train_elbo",
        "test_elbo",
        "test_expected_log_likelihood",
        "test_kl",
        "seconds",
        "lr",
    ):
        assert key in record
    assert record["test_elbo"] == pytest.approx(
        record["test_expected_log_likelihood"] - record["test_kl"]
    )


@pytest.mark.parametrize("estimator,warmup", [("mc", 1.5), ("iwae", 0.0), ("analytic", 0.0)])
def test_resume_reproduces_the_uninterrupted_run(small_data, tmp_path, estimator, warmup):
    config = TrainConfig(
        estimator=estimator,
        particles=2 if estimator == "iwae" else 1,
        epochs=4,
        batch_size=64,
        kl_warmup_epochs=warmup,
    )
    straight = _vae(small_data)
    history = fit(straight, small_data, config, run_dir=tmp_path / "a", log=None)

    interrupted = _vae(small_data)
    half = dataclasses.replace(config, epochs=2)
    fit(interrupted, small_data, half, run_dir=tmp_path / "b", log=None)
    # a new process would start from scratch: fresh model, RNGs scrambled
    resumed = _vae(small_data, seed=123)
    torch.manual_seed(999)
    resumed_history = fit(
        resumed, small_data, config, run_dir=tmp_path / "b", resume=True, log=None
    )

    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(history.epochs, resumed_history.epochs):
        assert {k: v for k, v in a.items() if "seconds" not in k} == {
            k: v for k, v in b.items() if "seconds" not in k
        }


def test_optimizer_state_survives_load_then_save_before_a_step(small_data, tmp_path):
    config = TrainConfig(epochs=1, batch_size=64)
    fit(_vae(small_data), small_data, config, run_dir=tmp_path, log=None)
    saved = load_checkpoint(tmp_path / CHECKPOINT)
    assert len(saved["optimizer"]["state"]) == len(list(_vae(small_data).parameters()))
    trainer = Trainer(_vae(small_data), small_data, config, run_dir=tmp_path / "again")
    trainer.load_state_dict(saved)
    (tmp_path / "again").mkdir()
    trainer.save()  # no step in between
    again = load_checkpoint(tmp_path / "again" / CHECKPOINT)
    for index, state in saved["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(again["optimizer"]["state"][index][name], value)


def test_poisoned_batch_stops_cleanly_and_keeps_the_last_good_checkpoint(
    small_data, tmp_path, monkeypatch
):
    vae = _vae(small_data)
    original = type(small_data).batches
    calls = {"epochs": 0}

    def poisoned(self, batch_size, generator=None):
        calls["epochs"] += 1
        for index, batch in enumerate(original(self, batch_size, generator)):
            if calls["epochs"] == 2 and index == 1:
                batch = batch.clone()
                batch[0, 0] = float("nan")
            yield batch

    monkeypatch.setattr(type(small_data), "batches", poisoned)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at epoch 2, step \d+"):
        fit(vae, small_data, TrainConfig(epochs=3, batch_size=64), run_dir=tmp_path, log=None)
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    # the parameters in memory are those after the last finite step, all finite
    assert all(torch.isfinite(p).all() for p in vae.parameters())


@pytest.mark.parametrize("lr", [1e20, 1e30])
def test_huge_learning_rate_stops_without_corrupting_parameters(small_data, tmp_path, lr):
    # (at lr 1e6 values grow to ~1e20 but stay finite: the run completes, as it should)
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(), small_data.data_shape)
    with pytest.raises(NonFiniteError, match="learning rate too high"):
        fit(vae, small_data, TrainConfig(epochs=3, lr=lr), run_dir=tmp_path, log=None)
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert all(torch.isfinite(p).all() for p in vae.parameters())


@pytest.mark.parametrize("size", [1e20, 1e37])
def test_large_finite_gradients_are_not_mistaken_for_overflow(small_data, size):
    # a sum of all entries would overflow float32 at 1e37 (a 2-norm at 1e20): the check
    # reads the largest entry, so huge finite gradients pass where the optimizer can take
    # them (clipped Adam), and a single inf among them is still caught
    vae = _vae(small_data)
    trainer = Trainer(vae, small_data, TrainConfig(epochs=1, optimizer="clipped_adam"))
    for p in trainer.parameters:
        p.grad = torch.full_like(p, size)
    trainer.guard.check_step(1e30, None)  # finite: no error
    trainer.parameters[0].grad[0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        trainer.guard.check_step(1e30, None)


def test_gradients_whose_squares_overflow_adam_are_refused_before_the_step(small_data):
    # Adam keeps the squared gradient in float32: 1e20 ** 2 overflows it (above 1.8e19)
    vae = _vae(small_data)
    trainer = Trainer(vae, small_data, TrainConfig(epochs=1, optimizer="adam"))
    for p in trainer.parameters:
        p.grad = torch.full_like(p, 1e18)
    trainer.guard.check_step(1e30, None)  # squares fit in float32
    trainer.parameters[0].grad[0] = 1e20
    with pytest.raises(NonFiniteError, match="Adam squares them"):
        trainer.guard.check_step(1e30, None)
    assert all(p.grad is None for p in trainer.parameters)  # the step is not taken


def test_early_stopping_restores_the_best_parameters(tmp_path):
    data = load_data("digits", validation_size=100, limit=400)
    vae = _vae(data)
    config = TrainConfig(epochs=60, batch_size=32, lr=2e-2, early_stopping_patience=2)
    history = fit(vae, data, config, run_dir=tmp_path, log=None)
    assert history.stopped_early and len(history) < 60
    best = history.best_epoch
    assert history["validation_elbo"][best - 1] == max(history["validation_elbo"])
    best_state = load_checkpoint(tmp_path / "best.pt")["model"]
    for name, value in vae.state_dict().items():
        assert torch.equal(value, best_state[name])


def test_kl_warmup_scales_only_the_kl_term(small_data):
    vae = _vae(small_data)
    x = small_data.evaluation_images()[:20]
    values = {}
    for factor in (0.0, 0.3, 1.0):
        pyro.set_rng_seed(0)
        with LatentScale(factor):
            values[factor] = make_elbo("analytic").loss(vae.model, vae.guide, x)
    # loss(beta) = -E[log p(x|z)] + beta KL: linear in beta for the same noise
    assert values[0.3] == pytest.approx(0.7 * values[0.0] + 0.3 * values[1.0], rel=1e-5)
    assert values[1.0] > values[0.0]  # the KL is positive


def test_kl_warmup_factor_rises_linearly_to_one(small_data):
    vae = _vae(small_data)
    config = TrainConfig(epochs=4, batch_size=32, kl_warmup_epochs=2)
    history = fit(vae, small_data, config, log=None)
    assert history["kl_factor"] == [0.5, 1.0, 1.0, 1.0]


def test_train_elbo_is_reported_unannealed_during_warmup():
    from pyro_vae.analysis.evaluation import evaluate_elbo

    data = load_data("digits", binarize="none", limit=300)  # fixed data: no binarization noise
    torch.manual_seed(0)
    # a narrow prior makes the KL of the untrained guide large enough to tell the two apart
    vae = build_vae(dataclasses.replace(MODEL, prior_scale=0.2), data.data_shape)
    truth = evaluate_elbo(vae, data.train.images, num_samples=50)
    assert truth["kl"] > 5
    # an epoch that barely moves the parameters, with a KL factor of almost 0
    config = TrainConfig(epochs=1, batch_size=300, lr=1e-12, kl_warmup_epochs=1e6, particles=50)
    trainer = Trainer(vae, data, config)
    reported = trainer.train_epoch(progress=False)
    assert trainer.kl_factor(0) < 1e-5
    # 50 particles on 300 points: the estimate's s.e. is well below 0.1 nat
    assert reported == pytest.approx(truth["elbo"], abs=0.3)
    assert abs(reported - truth["expected_log_likelihood"]) > 2.5


def test_empty_and_out_of_support_data_are_refused(small_data):
    vae = _vae(small_data)
    empty = dataclasses.replace(
        small_data,
        train=type(small_data.train)(small_data.train.images[:0], small_data.train.labels[:0]),
    )
    with pytest.raises(UserInputError, match="training set is empty"):
        fit(vae, empty, TrainConfig(epochs=1), log=None)
    shifted = dataclasses.replace(
        small_data,
        train=type(small_data.train)(small_data.train.images * 2 - 0.5, small_data.train.labels),
    )
    with pytest.raises(DataError, match=r"outside \[0, 1\] required by the bernoulli likelihood"):
        fit(vae, shifted, TrainConfig(epochs=1), log=None)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("batch_size", -3, "batch-size must be an integer >= 1"),
        ("lr", 0.0, "learning rate must be > 0"),
        ("estimator", "elbo", "unknown estimator 'elbo'"),
        ("particles", 0, "particles must be an integer >= 1"),
    ],
)
def test_bad_training_options_are_refused(field, value, message):
    with pytest.raises(UserInputError, match=message):
        TrainConfig(**{field: value})


def test_resuming_an_early_stopped_run_does_not_train_again(tmp_path):
    data = load_data("digits", validation_size=100, limit=400)
    config = TrainConfig(epochs=60, batch_size=32, lr=2e-2, early_stopping_patience=2)
    vae = _vae(data)
    history = fit(vae, data, config, run_dir=tmp_path, log=None)
    assert history.stopped_early
    before = (tmp_path / "metrics.jsonl").read_text()
    again = _vae(data, seed=5)
    resumed = fit(again, data, config, run_dir=tmp_path, resume=True, log=None)
    assert len(resumed) == len(history) and (tmp_path / "metrics.jsonl").read_text() == before
    for a, b in zip(vae.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # both hold the best epoch's parameters


def test_extending_a_cosine_schedule_anneals_to_the_new_end(small_data, tmp_path):
    short = TrainConfig(epochs=2, batch_size=100, lr_schedule="cosine")
    fit(_vae(small_data), small_data, short, run_dir=tmp_path, log=None)
    history = fit(
        _vae(small_data),
        small_data,
        dataclasses.replace(short, epochs=4),
        run_dir=tmp_path,
        resume=True,
        log=None,
    )
    lrs = history["lr"]
    # recorded before each epoch's schedule step; without the fix the learning rate
    # would rise again after the old horizon of 2 epochs
    assert lrs[2] > lrs[3] and all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_metrics_are_rewritten_from_the_checkpoint_on_resume(small_data, tmp_path):
    config = TrainConfig(epochs=2, batch_size=100)
    fit(_vae(small_data), small_data, config, run_dir=tmp_path, log=None)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n")  # a kill that lost the last line
    fit(
        _vae(small_data),
        small_data,
        dataclasses.replace(config, epochs=3),
        run_dir=tmp_path,
        resume=True,
        log=None,
    )
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_free_bits_threshold_applies_to_the_unannealed_kl(small_data):
    from pyro_vae.analysis.evaluation import evaluate_elbo
    from pyro_vae.objectives.free_bits import FreeBitsELBO

    vae = _vae(small_data)
    x = small_data.evaluation_images()[:30]
    kl = evaluate_elbo(vae, x, num_samples=1)["kl"]
    beta, threshold = 0.1, 0.5 * kl  # beta * KL < threshold <= KL: the KL counts

    def grads(elbo):
        pyro.set_rng_seed(2)
        vae.zero_grad()
        with LatentScale(beta):
            elbo.loss_and_grads(vae.model, vae.guide, x)
        return [p.grad.clone() for p in vae.parameters()]

    for a, b in zip(grads(FreeBitsELBO(1, threshold, "analytic")), grads(make_elbo("analytic"))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_data_are_checked_once_per_data_set_until_they_change(monkeypatch):
    small_data = load_data("digits", limit=300)  # a data set no other test has checked
    vae = _vae(small_data)
    calls = []
    check = vae.check_data
    monkeypatch.setattr(vae, "check_data", lambda x, what: calls.append(what) or check(x, what))
    config = TrainConfig(epochs=1, batch_size=100)
    fit(vae, small_data, config, log=None, progress=False)
    assert len(calls) == 2  # train and test (no validation split)
    fit(vae, small_data, config, log=None, progress=False)
    assert len(calls) == 2  # the same tensors, unchanged: no second pass over the data
    small_data.test.images[0, 0] = 2.0  # an in-place change outside the support
    with pytest.raises(DataError, match="outside"):
        fit(vae, small_data, config, log=None, progress=False)
    small_data.test.images[0, 0] = 0.0
    fit(vae, small_data, config, log=None, progress=False)
    assert len(calls) == 4  # the test split was checked again after each change


def test_short_runs_train_eagerly_and_long_ones_from_a_graph(small_data, monkeypatch):
    from pyro_vae.objectives.capture import GraphCache
    from pyro_vae.objectives.capture import policy as compiled

    monkeypatch.setattr(compiled.compat, "tracing_stack_loaded", lambda: True)
    for epochs, captured in ((1, False), (300, True)):  # 3 steps per epoch; 0.25 s a graph
        vae = _vae(small_data)
        trainer = Trainer(vae, small_data, TrainConfig(epochs=epochs, batch_size=100))
        assert trainer.compiles() is captured
    vae = _vae(small_data)
    fit(vae, small_data, TrainConfig(epochs=1, batch_size=100), log=None, progress=False)
    assert not GraphCache.of(vae).graphs
    fit(
        vae,
        small_data,
        TrainConfig(epochs=1, batch_size=100, compile=True),
        log=None,
        progress=False,
    )
    assert any(g is not None for g in GraphCache.of(vae).graphs.values())


@pytest.mark.parametrize("schedule", ["constant", "exponential", "cosine"])
def test_learning_rates_follow_the_schedule_in_closed_form_through_resume(
    small_data, tmp_path, schedule
):
    from pyro_vae.training.schedules import learning_rate

    config = TrainConfig(epochs=4, batch_size=150, lr=0.01, lr_schedule=schedule, lr_gamma=0.5)
    history = fit(_vae(small_data), small_data, config, run_dir=tmp_path / "a", log=None)
    expected = {
        "constant": [0.01] * 4,
        "exponential": [0.01, 0.005, 0.0025, 0.00125],
        "cosine": [0.01 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)],
    }[schedule]
    assert history["lr"] == pytest.approx(expected)
    assert [learning_rate(config, e) for e in range(4)] == pytest.approx(expected)
    # extended from 2 to 4 epochs, a cosine run anneals to its new end
    fit(
        _vae(small_data),
        small_data,
        dataclasses.replace(config, epochs=2),
        run_dir=tmp_path / "b",
        log=None,
    )
    resumed = fit(
        _vae(small_data), small_data, config, run_dir=tmp_path / "b", resume=True, log=None
    )
    assert resumed["lr"][2:] == pytest.approx(expected[2:])


def test_one_epoch_fits_in_a_loop_start_eager_then_capture_once_it_pays(small_data, monkeypatch):
    from pyro_vae.objectives.capture import GraphCache
    from pyro_vae.objectives.capture import policy as compiled

    monkeypatch.setattr(compiled.compat, "tracing_stack_loaded", lambda: True)
    monkeypatch.setattr(compiled, "CAPTURE_SECONDS", 0.004)  # the price of 4 saved steps
    vae = _vae(small_data)
    config = TrainConfig(epochs=1, batch_size=100)  # 3 steps: 3 ms saved < 4 ms
    captured = []
    for _ in range(3):
        fit(vae, small_data, config, log=None, progress=False)
        captured.append(sum(g is not None for g in GraphCache.of(vae).graphs.values()))
    assert captured == [0, 1, 1]  # 3 + 3 earlier steps repay it; then the graph is reused
