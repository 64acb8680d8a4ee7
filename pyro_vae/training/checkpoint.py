"""Files a run writes: atomic writes, checksummed checkpoints, strict JSON.

- Every file is written to a temporary file unique to its writer, fsynced, then renamed
  over the target: a crash (or a full disk) leaves the old file or the new one, whole.
- A checkpoint holds the model and guide parameters (one ``state_dict``), the optimizer,
  every RNG state (torch, numpy, python, the data-order generator), epoch, step, the
  config it was trained with and the history so far. It is stored with the SHA-256 of
  its serialized payload; loading verifies the digest, then the structure (keys, types,
  finite parameters), so a flipped bit, a truncation or a hand-crafted file is refused
  with one line instead of loading silently. Loading uses ``torch.load(weights_only=
  True)``: plain tensors and containers, never arbitrary pickled objects.
- JSON files are standard JSON: a non-finite number is written as ``null``, with the
  reason under ``"null_values"``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.errors import CheckpointError, NonFiniteError, UserInputError
from pyro_vae.io import atomic_write_bytes

#: a run folder's files: the last checkpoint, the best one (early stopping), the metrics
CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "best.pt"
METRICS = "metrics.jsonl"
FORMAT = "pyro-vae-checkpoint"
VERSION = 2


# ---------------------------------------------------------------------- RNG states
def rng_state(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a run depends on, as tensors and plain Python values."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    assert not isinstance(keys, str)  # (the legacy tuple form: keys is the key array)
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
    """Restore the RNG states :func:`rng_state` saved (torch, numpy, Python, and the data
    generator's when given), so that a resumed run draws what the uninterrupted one would."""
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


# ---------------------------------------------------------------------- checkpoints
def non_finite(state: Any) -> str | None:
    """The name of a floating-point tensor with a non-finite value in ``state``, if any."""
    if torch.is_tensor(state):
        if state.is_floating_point() and not torch.isfinite(state).all():
            return ""
        return None
    if isinstance(state, (dict, list, tuple)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        for key, value in items:
            inner = non_finite(value)
            if inner is not None:
                return f"{key}.{inner}" if inner else str(key)
    return None


def save_checkpoint(path: str | Path, **contents: Any) -> None:
    """Save a checkpoint atomically, with the SHA-256 of its payload.

    Refuses non-finite parameters or optimizer state (training never produces them; this
    is the last guard before the disk)."""
    for part in ("model", "optimizer"):
        bad = non_finite(contents.get(part, {}))
        if bad is not None:
            raise NonFiniteError(
                f"refusing to save a checkpoint whose {part} state holds non-finite values "
                f"({bad}); the previous checkpoint is intact: lower the learning rate (`lr`)"
            )
    atomic_write_bytes(encode_checkpoint(contents), path)


def encode_checkpoint(contents: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file: ``contents`` serialized, wrapped with its SHA-256
    (no checks: :func:`save_checkpoint` checks before it encodes)."""
    buffer = io.BytesIO()
    torch.save(contents, buffer)
    payload = buffer.getvalue()
    wrapper = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)
    return buffer.getvalue()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU: digest verified, structure checked, tensors only.

    Every problem (missing, truncated, altered, crafted, foreign) is a
    :class:`~pyro_vae.errors.CheckpointError` whose one line names the file and the fix.
    (``load_state_dict`` moves parameters and optimizer state to the device they are
    loaded into; RNG states stay on the CPU.)
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: train first (`out` {path.parent}) "
            f"or pass the folder of a run that saved one"
        )
    wrapper = _torch_load(path, path)
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a pyro-vae checkpoint: pass a run folder's checkpoint.pt"
        )
    if wrapper.get("version") != VERSION:
        raise CheckpointError(
            f"{path} was written by another version of pyro-vae (format version "
            f"{wrapper.get('version')!r}, this one reads {VERSION}): start the run over "
            f"(`overwrite`)"
        )
    payload, digest = wrapper.get("payload"), wrapper.get("sha256")
    if not (torch.is_tensor(payload) and payload.dtype == torch.uint8 and payload.dim() == 1):
        raise CheckpointError(f"checkpoint {path} has no payload: it is damaged; start over")
    data = payload.numpy().tobytes()
    if not isinstance(digest, str) or hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"checkpoint {path} fails its SHA-256 check: the file was altered or damaged on "
            f"disk; restore it from a backup, or start the run over (`overwrite`)"
        )
    contents: dict[str, Any] = _torch_load(io.BytesIO(data), path)
    check_checkpoint(contents, path)
    return contents


def _torch_load(source: io.BytesIO | Path, path: Path) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Unsupported" in str(error):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain containers, "
                f"which pyro-vae never loads (a checkpoint is tensors only): it is not a "
                f"pyro-vae checkpoint, or it was tampered with"
            ) from None
        raise _corrupt(path, error) from None
    except Exception as error:  # truncated zip, garbage, ...
        raise _corrupt(path, error) from None


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a pyro-vae checkpoint ({first[:120]}): "
        f"restore it from a backup, or start the run over (`overwrite`)"
    )


#: what a checkpoint must hold, and of which type
_REQUIRED: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "optimizer": (dict,),
    "rng": (dict,),
    "epoch": (int,),
    "step": (int,),
    "config": (dict,),
    "history": (list,),
    "stopped_early": (bool,),
    "best_elbo": (float, int),
    "epochs_since_best": (int,),
    "finished": (bool,),
}


def check_checkpoint(contents: Any, path: str | Path) -> None:
    """Refuse a checkpoint whose structure is not what :func:`save_checkpoint` writes."""

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {path} {problem}: it was not written by this pyro-vae, or was "
            f"altered; start the run over (`overwrite`)"
        )

    if not isinstance(contents, dict):
        raise refuse("does not hold a dictionary")
    for key, types in _REQUIRED.items():
        if key not in contents:
            raise refuse(f"has no {key!r}")
        value = contents[key]
        if not isinstance(value, types) or (bool in types) != isinstance(value, bool):
            raise refuse(f"has {key!r} of type {type(value).__name__}")
    for key in ("epoch", "step", "epochs_since_best"):
        if contents[key] < 0:
            raise refuse(f"has a negative {key!r}")
    model = contents["model"]
    if not model or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        raise refuse("has a 'model' that is not a dictionary of named tensors")
    # (in float32, the type the parameters are loaded into: 1e300 in float64 is inf there)
    bad = non_finite({k: v.float() if v.is_floating_point() else v for k, v in model.items()})
    if bad is not None:
        raise refuse(f"holds non-finite parameter values ({bad})")
    optimizer = contents["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(
        optimizer.get("param_groups"), list
    ):
        raise refuse("has an 'optimizer' without state and parameter groups")
    if non_finite(optimizer["state"]) is not None:
        raise refuse("holds non-finite optimizer state")
    rng = contents["rng"]
    if not torch.is_tensor(rng.get("torch")) or not isinstance(rng.get("numpy"), dict):
        raise refuse("has no usable RNG states")
    history = contents["history"]
    if not all(isinstance(epoch, dict) for epoch in history) or len(history) != contents["epoch"]:
        raise refuse("has a history that does not match its epochs")
    for number, epoch in enumerate(history, start=1):
        if epoch.get("epoch") != number or not all(
            isinstance(epoch.get(key), (int, float)) and not isinstance(epoch.get(key), bool)
            for key in _EPOCH_NUMBERS
        ):
            raise refuse(f"has a history whose epoch {number} lacks its numbers")
    best = contents.get("best_epoch")
    if best is not None and (
        isinstance(best, bool) or not isinstance(best, int) or not 1 <= best <= len(history)
    ):
        raise refuse("has a 'best_epoch' that is not one of its epochs")


#: what every epoch of a checkpoint's history holds (the report and plots read them)
_EPOCH_NUMBERS = ("step", "train_elbo", "test_elbo", "seconds", "lr")


def check_data_digest(saved: Any, current: dict[str, str], action: str) -> None:
    """Refuse to ``action`` a run on data other than it was trained on: ``saved`` is the
    run's record of its data's SHA-256 by split (none in runs written before it was
    kept: nothing to compare), ``current`` that of the data loaded now."""
    if not isinstance(saved, dict):
        return
    for split in ("train", "validation", "test"):
        before, now = saved.get(split), current.get(split)
        if isinstance(before, str) and now is not None and before != now:
            raise UserInputError(
                f"the {split} data differ from those the run was trained on (SHA-256 "
                f"{before[:16]}... in the run, {now[:16]}... now): restore the data the run "
                f"was trained on to {action} it, or start a new run"
            )
