"""Your own data: arrays from Python, .npy/.npz files and folders of images from the CLI,
checked like the built-in sets; and one run-folder format, read from any directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae.config import ModelConfig, TrainConfig
from pyro_vae.errors import DataError

from .helpers import run_cli

SMALL = ModelConfig(latent_dims=(2,), hidden=(16,))


def _points(n: int = 120, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d)).astype(np.float32)


def test_a_numpy_array_trains_from_python():
    data = pyro_vae.load_data(_points(), validation_size=10)
    assert data.data_shape == (16,) and len(data.validation) == 10
    # 10% of the 120 points held out as the test set, seeded: the same every time
    assert len(data.test) == 12 and len(data.train) == 98
    again = pyro_vae.load_data(_points(), validation_size=10)
    assert torch.equal(data.test.images, again.test.images)
    vae = pyro_vae.build_vae(SMALL, data.data_shape)
    history = pyro_vae.fit(
        vae, data, TrainConfig(epochs=2, batch_size=32), progress=False, log=None
    )
    assert len(history) == 2 and np.isfinite(history["test_elbo"]).all()


def test_from_tensors_takes_a_test_set_and_keeps_the_shape_of_a_point():
    train = torch.rand(50, 1, 4, 4)
    test = torch.rand(7, 1, 4, 4)
    data = pyro_vae.VAEData.from_tensors(train, test, binarize="static")
    assert data.data_shape == (1, 4, 4) and len(data.test) == 7 and len(data.train) == 50
    assert set(data.train.images.unique().tolist()) <= {0.0, 1.0}  # drawn once, seeded
    uint8 = pyro_vae.VAEData.from_tensors(np.full((4, 3), 255, dtype=np.uint8), test_size=0.5)
    assert float(uint8.train.images.max()) == 1.0  # grey levels, divided by 255


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[0.5, np.nan], [0.1, 0.2]]), "1 point\\(s\\) hold NaN or infinite"),
        (np.array([["a", "b"], ["c", "d"]]), "not numbers"),
        (np.zeros(5), "pass one point per row"),
        (np.full((4, 3), 2.0), "binarize='dynamic' reads them as probabilities"),
        ([[1.0, 2.0], [3.0]], "not an array of numbers"),
    ],
)
def test_bad_arrays_get_one_line_naming_the_problem(values, message):
    with pytest.raises(DataError, match=message) as error:
        pyro_vae.load_data(values)
    assert len(str(error.value).splitlines()) == 1


def test_unbounded_values_train_with_binarize_none_and_a_gaussian_likelihood():
    values = np.random.default_rng(1).normal(3.0, 2.0, size=(80, 6))
    data = pyro_vae.load_data(values, binarize="none")
    vae = pyro_vae.build_vae(
        ModelConfig(latent_dims=(2,), hidden=(8,), likelihood="gaussian"), (6,)
    )
    pyro_vae.fit(vae, data, TrainConfig(epochs=1, batch_size=16), progress=False, log=None)


def test_an_unknown_name_or_missing_path_says_what_is_accepted(tmp_path):
    with pytest.raises(DataError, match="choose one of digits, .*, or pass the path"):
        pyro_vae.load_data(str(tmp_path / "nothing.npy"))
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot be read as a numpy file"):
        pyro_vae.load_data(str(bad))
    (tmp_path / "two.npz").write_bytes(b"")
    np.savez(tmp_path / "two.npz", a=_points(), b=_points())
    with pytest.raises(DataError, match="holds arrays a, b: name them train"):
        pyro_vae.load_data(str(tmp_path / "two.npz"))


def _train_args(data_path, out) -> list[str]:
    return [
        "train",
        "--data",
        str(data_path),
        "--epochs",
        "1",
        "--latent-dims",
        "2",
        "--hidden",
        "16",
        "--eval-samples",
        "10",
        "--quiet",
        "--out",
        str(out),
    ]


def test_a_npy_file_trains_from_the_cli_and_the_run_reads_from_anywhere(
    tmp_path, capsys, monkeypatch
):
    np.save(tmp_path / "points.npy", _points())
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(_train_args("points.npy", "run"), capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["dataset"] == str(tmp_path / "points.npy")  # absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(
        ["evaluate", str(tmp_path / "run"), "--samples", "10", "--json"], capsys
    )
    assert code == 0, err
    assert np.isfinite(json.loads(out)["test_log_likelihood"])
    code, out, err = run_cli(["sample", str(tmp_path / "run"), "--n", "4"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "plots" / "samples-4.png").exists()


def test_npz_and_image_folders_train_from_the_cli(tmp_path, capsys):
    from PIL import Image

    np.savez(tmp_path / "split.npz", train=_points(60), test=_points(9, seed=1))
    code, _, err = run_cli(_train_args(tmp_path / "split.npz", tmp_path / "a"), capsys)
    assert code == 0, err
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    data = pyro_vae.load_data(str(folder))
    assert data.data_shape == (1, 8, 8) and len(data.train) + len(data.test) == 30
    code, _, err = run_cli(_train_args(folder, tmp_path / "b"), capsys)
    assert code == 0, err
    (folder / "wide.png").write_bytes(b"")
    Image.fromarray(np.zeros((8, 9), dtype=np.uint8)).save(folder / "wide.png")
    code, _, err = run_cli(_train_args(folder, tmp_path / "c"), capsys)
    assert code == 2 and "images of 2 sizes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_run_folder_written_by_fit_is_evaluated_and_sampled_by_the_cli(
    tmp_path, capsys, monkeypatch
):
    data = pyro_vae.load_data("digits")
    vae = pyro_vae.build_vae(SMALL, data.data_shape)
    run = tmp_path / "from_python"
    pyro_vae.fit(vae, data, TrainConfig(epochs=1), run_dir=run, progress=False, log=None)
    assert (run / "config.json").exists()
    monkeypatch.chdir(tmp_path.parent)
    code, out, err = run_cli(["evaluate", str(run), "--samples", "10", "--json"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["sample", str(run), "--n", "4"], capsys)
    assert code == 0, err
    config, model, loaded, _ = pyro_vae.load_run(run, with_data=False)
    assert loaded is None and model.data_shape == (1, 8, 8)
    for name, value in vae.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
