"""``pyro-vae diagnose``: the diagnostics of :mod:`pyro_vae.analysis.diagnostics` on a
run folder, written as JSON, NetCDF, markdown and PNG plots.

:func:`compute_diagnosis` loads the run and returns a
:class:`~pyro_vae.analysis.diagnostics.Diagnosis` (writing nothing);
:mod:`pyro_vae.app.diagnose_report` renders it; :func:`diagnose` does both, the files
written under a lock."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pyro_vae.analysis.diagnostics import Diagnosis, diagnose_model
from pyro_vae.app.diagnose_report import write_diagnosis
from pyro_vae.errors import UserInputError
from pyro_vae.resources import check_device

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Diagnosis", "DiagnosisSettings", "compute_diagnosis", "diagnose"]


class DiagnosisSettings(TypedDict, total=False):
    """The measurements' keywords of :func:`compute_diagnosis`: those of
    :func:`~pyro_vae.analysis.diagnostics.diagnose_model`."""

    chains: int
    warmup: int
    samples: int
    is_samples: int
    local_steps: int
    khat_images: int
    khat_samples: int
    seed: int
    jit: bool
    progress: bool
    log: Callable[[str], None] | None
    compile: bool | None


# ------------------------------------------------------------------ the command
def diagnose(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    images: int = 10,
    image_ids: Sequence[int] | None = None,
    device: str = "cpu",
    **settings: Unpack[DiagnosisSettings],
) -> dict[str, Any]:
    """``pyro-vae diagnose``: NUTS reference posterior, gaps, PSIS k-hat; files in out_dir.

    Writes ``nuts.nc`` and ``guide.nc`` (ArviZ InferenceData), ``diagnostics.json``,
    ``diagnostics.md`` and ``plots/*.png``. Every measurement runs with the networks in
    eval mode.
    ``images``, ``image_ids``, ``device`` and ``settings`` (:class:`DiagnosisSettings`:
    chains, warmup, samples, is_samples, local_steps, khat_images, khat_samples, seed, jit,
    progress, log, compile) are those of :func:`compute_diagnosis`, which measures; this
    writes. Returns ``diagnostics.json``'s dict.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "diagnostics"
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file: pass a folder")
    _refuse_to_overwrite(out, overwrite)
    _refuse_another_run(out, run_dir, overwrite)
    diagnosis = compute_diagnosis(
        run_dir, images=images, image_ids=image_ids, device=device, **settings
    )
    write_locked(out, diagnosis, run_dir, overwrite)
    return diagnosis.to_dict()


def compute_diagnosis(
    run_dir: str | Path,
    images: int = 10,
    image_ids: Sequence[int] | None = None,
    device: str = "cpu",
    **settings: Unpack[DiagnosisSettings],
) -> Diagnosis:
    """The measurements of :func:`diagnose` on the run in ``run_dir``, as data: nothing
    is written. ``images`` test images (or those of ``image_ids``) get the NUTS and gap
    measurements, with the model on ``device`` (``"cpu"`` or ``"cuda"``; the test images
    follow it batch by batch); ``settings`` are those of
    :func:`~pyro_vae.analysis.diagnostics.diagnose_model` (chains, warmup, samples,
    is_samples, local_steps, khat_images, khat_samples, seed, jit, progress, log,
    compile)."""
    from pyro_vae.app.runs import load_run

    defaults = inspect.signature(diagnose_model).parameters
    chosen: dict[str, Any] = dict(settings)
    given = {name: chosen.get(name, defaults[name].default) for name in _COUNTS}
    _check_options(images, **given)
    check_device(device)
    run = load_run(Path(run_dir), device)
    vae, data = run.model, run.data
    test = data.evaluation_images("test")
    ids = select_images(len(test), images, image_ids)
    return diagnose_model(vae, test, ids, run_dir=str(run_dir), **settings)


#: the counts diagnose checks before it loads anything
_COUNTS = (
    "chains",
    "warmup",
    "samples",
    "is_samples",
    "local_steps",
    "khat_images",
    "khat_samples",
)


def _check_options(
    images: int,
    chains: int,
    warmup: int,
    samples: int,
    is_samples: int,
    local_steps: int,
    khat_images: int,
    khat_samples: int,
) -> None:
    if images < 1:
        raise UserInputError(f"--images must be >= 1, got {images}")
    if chains < 1:
        raise UserInputError(f"--chains must be >= 1, got {chains}")
    if min(warmup, samples, is_samples, local_steps, khat_samples, khat_images) < 1:
        raise UserInputError(
            "--warmup, --samples, --is-samples, --local-steps, --khat-images and "
            "--khat-samples must each be >= 1"
        )


def select_images(count: int, images: int, image_ids: Sequence[int] | None) -> list[int]:
    """The test images to diagnose: ``image_ids``, else the first ``images`` of ``count``."""
    ids = list(image_ids) if image_ids is not None else list(range(min(images, count)))
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise UserInputError(
            f"image index {bad[0]} is out of range: the test set has {count} images "
            f"(0 to {count - 1})"
        )
    if not ids:
        raise UserInputError("no images selected")
    return ids


def _refuse_another_run(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Diagnostics never go into another run's folder (its plots/ and files are its
    own) unless asked to (``overwrite``); nor through a link in the folder."""
    from pyro_vae.app.runs import check_no_links, holds_run

    if out.is_dir() and holds_run(out) and out.resolve() != run_dir.resolve() and not overwrite:
        raise UserInputError(
            f"--out {out} is the folder of another run: diagnostics of {run_dir} go into a "
            f"folder of their own; choose another --out (or pass --overwrite to write there)"
        )
    check_no_links(out)


def _refuse_to_overwrite(out: Path, overwrite: bool) -> None:
    if (out / "diagnostics.json").exists() and not overwrite:
        raise UserInputError(
            f"{out} holds diagnostics: pass --overwrite to replace them, or another --out"
        )


def write_locked(out: Path, diagnosis: Diagnosis, run_dir: Path, overwrite: bool) -> None:
    """The diagnosis's files in ``out``, locked; inside the run folder, the run's own lock
    (a ``train --overwrite`` moves that folder)."""
    from pyro_vae.app.lock import RunLock
    from pyro_vae.io import make_folder

    inside = out.resolve().is_relative_to(run_dir.resolve())
    with RunLock(run_dir if inside else out, f"pyro-vae diagnose {run_dir}"):
        make_folder(out)
        _refuse_to_overwrite(out, overwrite)
        _refuse_another_run(out, run_dir, overwrite)
        write_diagnosis(out, diagnosis)
