"""The researcher's long-run loop: requeue-safe resume, the run's own evaluation
settings, a reproduce command that recreates the run, honest k-hat, sensible defaults."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from pyro_vae.app.cli import build_parser
from pyro_vae.app.flags import TRAIN_FLAGS
from pyro_vae.config import ModelConfig, RunConfig
from pyro_vae.training.checkpoint import load_checkpoint

from .helpers import TINY_RUN, digest, run_cli

JOB = [*TINY_RUN, "--eval-samples", "30"]  # one job script's flags


def parameters(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "checkpoint.pt")["model"]


def test_a_requeued_job_resumes_with_its_identical_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *JOB, "--epochs", "2", "--out", out], capsys)[0] == 0
    # the cluster re-runs the same command (with --resume, and a later --epochs)
    code, _, err = run_cli(["train", *JOB, "--epochs", "3", "--resume", "--out", out], capsys)
    assert code == 0, err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


def test_resume_refuses_only_real_changes_naming_saved_and_given_values(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *JOB, "--epochs", "1", "--out", out], capsys)[0] == 0
    before = digest(out)
    changed = ["--hidden", "32", "--lr", "0.01"]
    code, _, err = run_cli(["train", *JOB, *changed, "--resume", "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--hidden: saved 16, given 32" in err and "--lr: saved 0.001, given 0.01" in err
    assert "--dataset" not in err and "--limit" not in err  # equal values are no change
    assert digest(out) == before


def test_resume_auto_starts_a_run_then_continues_it(tmp_path, capsys):
    out = tmp_path / "run"
    job = ["train", *JOB, "--eval-samples", "0", "--resume", "auto", "--out", out]
    code, _, err = run_cli([*job, "--epochs", "1"], capsys)
    assert code == 0, err  # nothing there: started
    code, _, err = run_cli([*job, "--epochs", "2"], capsys)
    assert code == 0, err  # a checkpoint there: continued
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [epoch["epoch"] for epoch in history] == [1, 2]


def test_resuming_a_finished_run_with_nothing_to_add_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *JOB, "--epochs", "1", "--out", out], capsys)[0] == 0
    before = digest(out)
    for argv in (["--resume"], [*JOB, "--epochs", "1", "--resume"], ["--resume", "auto"]):
        code, printed, err = run_cli(["train", *argv, "--out", out], capsys)
        assert code == 0, err
        assert "nothing to do" in printed
        assert digest(out) == before


def test_a_run_killed_after_its_evaluation_is_finished_by_running_it_again(
    tmp_path, capsys, monkeypatch
):
    """Killed between evaluation.json and report.md (here: its plots fail), a run holds
    a new evaluation beside an old report: the same command again is not "nothing to do"
    but writes the report of what was trained."""
    import pyro_vae.app.run_report

    out = tmp_path / "run"
    assert run_cli(["train", *JOB, "--epochs", "1", "--out", out], capsys)[0] == 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pyro_vae.app.run_report, "write_plots", killed)
        code, _, _ = run_cli(["train", *JOB, "--epochs", "2", "--resume", "--out", out], capsys)
    assert code != 0
    assert "| epochs | 1 |" in (out / "report.md").read_text()  # the old report
    assert json.loads((out / "evaluation.json").read_text())  # the new evaluation
    code, printed, err = run_cli(["train", *JOB, "--epochs", "2", "--resume", "--out", out], capsys)
    assert code == 0 and "nothing to do" not in printed, err
    assert "| epochs | 2 |" in (out / "report.md").read_text()
    code, printed, _ = run_cli(["train", *JOB, "--epochs", "2", "--resume", "--out", out], capsys)
    assert code == 0 and "nothing to do" in printed  # now it is finished


def test_a_resumed_run_keeps_its_own_evaluation_settings(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--eval-samples", "25", "--eval-images", "40"]
    assert run_cli(["train", *TINY_RUN, *flags, "--epochs", "1", "--out", out], capsys)[0] == 0
    code, printed, err = run_cli(["train", "--resume", "--epochs", "2", "--out", out], capsys)
    assert code == 0, err
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["importance_samples"] == 25 and evaluation["points"] == 40
    assert "K=25 on 40 test images, about" in printed  # the estimate, before it starts


def test_eval_images_is_a_fixed_subset_the_same_in_every_run(tmp_path, capsys):
    from pyro_vae.analysis.evaluation import fixed_subset
    from pyro_vae.data import load_data

    images = load_data("digits", limit=200).evaluation_images("test")
    subset = fixed_subset(images, 40)
    assert torch.equal(subset, fixed_subset(images, 40)) and len(subset) == 40
    assert not torch.equal(subset, images[:40])  # not the first images
    assert fixed_subset(images, None) is images and fixed_subset(images, 10**6) is images


def test_reproduce_recreates_a_resumed_run_from_scratch_bit_for_bit(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *JOB, "--lr", "0.003", "--epochs", "2", "--out", out], capsys)[0] == 0
    assert run_cli(["train", "--resume", "--epochs", "3", "--out", out, "--quiet"], capsys)[0] == 0
    report = (out / "report.md").read_text()
    command = report.split("## Reproduce")[1].split("```")[1].strip()
    assert "--resume" not in command and "--epochs 3" in command and "--lr 0.003" in command
    argv = shlex.split(command)[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert run_cli([*argv, "--quiet"], capsys)[0] == 0
    first, again = parameters(out), parameters(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_too_few_importance_samples_for_khat_say_so_instead_of_inf(tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, _ = run_cli(
        ["train", *TINY_RUN, "--epochs", "1", "--eval-samples", "10", "--out", out], capsys
    )
    assert code == 0 and "inf" not in printed
    assert "not computed: K=10" in printed and "K >= 21" in printed
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["khat_mean"] is None and "K >= 21" in evaluation["khat_note"]
    assert "inf" not in (out / "report.md").read_text().lower().replace("infer", "")


def test_every_train_flag_shows_the_config_default_in_help():
    train = next(
        action.choices["train"]
        for action in build_parser()._actions
        if getattr(action, "choices", None) and "train" in action.choices
    )
    defaults = RunConfig()
    for action in train._actions:
        if action.dest not in TRAIN_FLAGS:
            continue
        section, name = TRAIN_FLAGS[action.dest]
        value = getattr(getattr(defaults, section), name)
        if action.dest == "compile":
            assert "default: when" in action.help
            continue
        if action.dest == "guide":  # None resolves to bottom-up for several layers
            assert ModelConfig(latent_dims=(4, 2)).guide == "bottom-up"
            assert "(default: bottom-up)" in action.help
            continue
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        if value is None:
            shown = "all" if action.dest in ("limit", "eval_images") else "none"
        assert f"(default: {shown})" in action.help, action.dest


def test_several_layers_default_to_the_bottom_up_guide_and_one_layer_has_none():
    assert ModelConfig(latent_dims=(20, 10)).guide == "bottom-up"
    assert ModelConfig(latent_dims=(20, 10), guide="top-down").guide == "top-down"
    assert ModelConfig(latent_dims=(50,)).guide is None
    assert ModelConfig(latent_dims=(50,), guide="top-down").guide is None  # no order to choose


def test_train_without_out_writes_a_fresh_folder_each_time(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", *TINY_RUN, "--epochs", "1", "--eval-samples", "0"]
    for _ in range(2):
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "checkpoint.pt").exists() for run in runs)
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["model"]["guide"] is None  # one layer: no inference order recorded


@pytest.mark.parametrize("flag,value", [("--lr-gamma", "0.5"), ("--clip-norm", "2.5")])
def test_config_only_settings_have_flags(flag, value, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY_RUN, "--epochs", "1", "--eval-samples", "0", flag, value]
    assert run_cli([*argv, "--out", out], capsys)[0] == 0
    section = json.loads((out / "config.json").read_text())["train"]
    assert section[flag[2:].replace("-", "_")] == float(value)


# ---------------------------------------------------------------------- the IWAE protocol
def test_the_iwae_schedule_gives_each_pass_its_papers_learning_rate():
    from pyro_vae.config import IWAE_PASSES, TrainConfig
    from pyro_vae.training.schedules import learning_rate

    config = TrainConfig(lr=1e-3, lr_schedule="iwae", epochs=IWAE_PASSES)
    rates = [learning_rate(config, epoch) for epoch in range(IWAE_PASSES)]
    expected = [1e-3 * 10 ** (-i / 7) for i in range(8) for _ in range(3**i)]  # the paper
    assert IWAE_PASSES == 3280 and len(expected) == IWAE_PASSES
    assert rates == pytest.approx(expected, rel=1e-12)
    assert learning_rate(config, IWAE_PASSES + 5) == pytest.approx(1e-4)  # stays at the last


def test_the_iwae_protocol_sets_the_papers_settings_under_config_and_flags(tmp_path):
    from pyro_vae.app.flags import resolve_config

    config_file = tmp_path / "c.json"
    config_file.write_text('{"train": {"batch_size": 40}}')
    parser = build_parser()
    args = parser.parse_args(
        ["train", "--protocol", "iwae", "--config", str(config_file), "--lr", "3e-4"]
    )
    config = resolve_config(args)
    train = config.train
    assert (train.lr_schedule, train.epochs, train.adam_epsilon) == ("iwae", 3280, 1e-4)
    assert (train.eval_samples, train.eval_images) == (5000, None)
    assert config.data.dataset == "mnist" and config.model.hidden == (200, 200)
    assert train.batch_size == 40 and train.lr == 3e-4  # the file, then the flags, win


def test_adam_takes_the_configured_epsilon(tmp_path):
    from pyro_vae.config import TrainConfig
    from pyro_vae.data import load_data
    from pyro_vae.models.build import build_vae
    from pyro_vae.training.trainer import Trainer

    data = load_data("digits", limit=50)
    vae = build_vae(ModelConfig(latent_dims=(2,), hidden=(8,)), data.data_shape)
    for optimizer in ("adam", "clipped_adam"):
        trainer = Trainer(vae, data, TrainConfig(adam_epsilon=1e-4, optimizer=optimizer))
        assert trainer.optimizer.param_groups[0]["eps"] == 1e-4


def test_reproduce_runs_tiny_cells_resumably_and_puts_the_paper_beside_them(tmp_path, capsys):
    argv = ["reproduce", "iwae-table1", "--dataset", "digits", "--limit", "100",
            "--epochs", "1", "--eval-samples", "25", "--eval-images", "20",
            "--cells", "1l-vae-k1,2l-iwae-k5", "--out", tmp_path, "--quiet"]  # fmt: skip
    code, printed, err = run_cli(argv, capsys)
    assert code == 0, err
    table = json.loads((tmp_path / "iwae-table1.json").read_text())
    rows = {row["cell"]: row for row in table["rows"]}
    assert rows["1l-vae-k1"]["paper_nll"] == 86.76 and rows["2l-iwae-k5"]["paper_nll"] == 83.89
    for name, row in rows.items():
        evaluation = json.loads((tmp_path / name / "evaluation.json").read_text())
        assert row["measured_nll"] == evaluation["test_nll"] and row["test_images"] == 20
        assert row["passes"] == 1 and row["projected_hours_for_protocol"] > 0
    saved = json.loads((tmp_path / "2l-iwae-k5" / "config.json").read_text())
    assert saved["train"]["estimator"] == "iwae" and saved["train"]["particles"] == 5
    assert saved["model"]["latent_dims"] == [100, 50] and saved["train"]["batch_size"] == 20
    assert "| 1l-vae-k1 | 86.76 |" in (tmp_path / "iwae-table1.md").read_text()
    before = digest(tmp_path / "1l-vae-k1")
    code, printed, err = run_cli(argv, capsys)  # the same command again: nothing to redo
    assert code == 0 and printed.count("nothing to do") == 2
    assert digest(tmp_path / "1l-vae-k1") == before
    code, _, err = run_cli([*argv[:-1], "--cells", "9l-vae-k1"], capsys)
    assert code == 2 and "unknown cell(s) 9l-vae-k1" in err


# ---------------------------------------------------------------------- TensorBoard
def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_logs_every_epoch_once_through_resume_with_the_image_grids(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    flags = [*TINY_RUN, "--eval-samples", "0", "--tensorboard", "--out", out]
    assert run_cli(["train", *flags, "--epochs", "2"], capsys)[0] == 0
    assert run_cli(["train", *flags, "--epochs", "3", "--resume"], capsys)[0] == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = _scalars(out / "tensorboard", "elbo/test")
    assert [step for step, _ in logged] == [1, 2, 3]
    assert [value for _, value in logged] == pytest.approx([e["test_elbo"] for e in history])
    assert [step for step, _ in _scalars(out / "tensorboard", "lr")] == [1, 2, 3]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"reconstructions", "samples"} <= set(events.Tags()["images"])


def test_the_table1_grid_for_ray_holds_the_same_cells_and_protocol_as_reproduce():
    from pyro_vae.app.reproduce import TABLES
    from pyro_vae.app.sweep import expand_grid, load_grid
    from pyro_vae.config import PROTOCOLS

    grid = Path(__file__).parents[1] / "examples" / "iwae_table1_grid.json"
    runs = expand_grid(load_grid(grid))
    cells = {(c.latent_dims, c.estimator, c.k) for c in TABLES["iwae-table1"]}
    assert {(r.config.model.latent_dims, r.config.train.estimator, r.config.train.particles)
            for r in runs} == cells  # fmt: skip
    for run in runs:
        for key, value in PROTOCOLS["iwae"]["train"].items():
            assert getattr(run.config.train, key) == value, key


def test_every_flag_of_every_command_states_its_default_once():
    """Each flag with a default (not unset, not an off switch) says it in ``--help``,
    exactly once; a list default reads as the flag takes it."""
    import argparse

    commands = next(
        action.choices for action in build_parser()._actions if getattr(action, "choices", None)
    )
    for name, parser in commands.items():
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            formatted = parser._get_formatter()._get_help_string(action)
            assert "default" in formatted, (name, action.dest, formatted)
            assert formatted.count("(default:") <= 1, (name, action.dest, formatted)
            if isinstance(action.default, tuple):
                assert ",".join(map(str, action.default)) in formatted, (name, action.dest)
