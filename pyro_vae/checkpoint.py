"""Crash-proof checkpoints: written to a temporary file, fsynced, then renamed.

A checkpoint holds the model and guide parameters (one ``state_dict``: the networks
are one module), the optimizer and learning-rate schedule, every RNG state (torch,
numpy, python, and the data-order generator), epoch, step, the resolved config and the
history so far. It is loaded with ``torch.load(weights_only=True)``: plain tensors and
containers only, never arbitrary pickled objects. Whenever the process is killed, the
file on disk is either the previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "pyro-vae-checkpoint"
VERSION = 1


def rng_state(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a run depends on, as tensors and plain Python values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], data_generator: torch.Generator | None = None) -> None:
    # RNG states are CPU byte tensors, whatever device a checkpoint was mapped to
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].cpu().numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"].cpu())


def atomic_save(payload: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that a crash leaves the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(path: str | Path, **contents: Any) -> None:
    """Save a checkpoint atomically. Refuses non-finite parameters (they are never saved)."""
    model_state = contents.get("model", {})
    for name, tensor in model_state.items():
        if (
            torch.is_tensor(tensor)
            and tensor.is_floating_point()
            and not torch.isfinite(tensor).all()
        ):
            raise CheckpointError(f"refusing to save a checkpoint with non-finite parameter {name}")
    atomic_save({"format": FORMAT, "version": VERSION, **contents}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``; a clear error if it is
    missing or unreadable. (``load_state_dict`` moves parameters and optimizer state to
    the device they are loaded into; RNG states must stay on the CPU.)"""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: train first (pyro-vae train --out {path.parent}) "
            f"or pass the folder of a run that saved one"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except Exception as error:  # truncated zip, foreign pickle, ...
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a pyro-vae checkpoint ({first_line[:120]}): "
            f"delete it and train again (--overwrite)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a pyro-vae checkpoint: pass a run folder's checkpoint.pt"
        )
    return payload
