"""Data parallelism over ``torch.distributed``, as ``torchrun`` launches it.

One training runs in N processes (ranks), each with its own share of every mini-batch:

- every rank visits its part of the same global batch (one shared permutation per
  epoch, split by rank), so each data point is seen once per epoch;
- each rank scales its part's bound by ``num_data * N / global_batch``, so the mean
  over ranks is the global batch's bound scaled to the data set, exactly;
- gradients (with the loss, and the floating-point buffers such as BatchNorm's running
  statistics) are averaged over the ranks in one flat all-reduce per step, after the
  step's loss and gradients are computed (eagerly or by a captured graph) and before the
  optimizer steps: every rank then takes the same step and holds the same parameters;
- evaluations shard their data points over the ranks and gather the results.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is the
identity, and a run is exactly the one-process run. The process group uses gloo on CPU
and NCCL on CUDA. ``DistributedDataParallel`` is not used: it hooks the module's
``forward``, which a Pyro program does not call (it calls the networks inside it), and
it cannot see gradients that a replayed graph writes.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch

#: set by torchrun in every worker
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if available() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if available() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def restart_count() -> int:
    """How often torchrun has restarted this worker group (elastic restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); ``False`` when
    not launched by torchrun. On CUDA each rank takes the device of its ``LOCAL_RANK``."""
    if available():
        return True
    if not launched_by_torchrun():
        return False
    backend = "gloo"
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts the store. Each restart of the group joins under a prefix
        # of its own: gloo's addresses from the failed attempt stay in the agent's store,
        # and without the prefix the restarted ranks connect to dead peers (torch 2.14,
        # measured: connectFullMesh "Connection refused" on every elastic restart)
        store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=300),
        )
        torch.distributed.init_process_group(
            backend=backend,
            store=torch.distributed.PrefixStore(f"/pyro_vae/attempt_{restart_count()}", store),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    else:
        torch.distributed.init_process_group(backend=backend)
    _JOINED.append(True)
    return True


#: non-empty while this process is in a group that :func:`init_from_environment` joined
#: (a group a user's own program set up is theirs to destroy)
_JOINED: list[bool] = []


#: the shortest wait for another process in a collective, in seconds (once the step time
#: is measured: :func:`set_collective_timeout`); ``PYRO_VAE_COLLECTIVE_TIMEOUT`` sets it
MIN_COLLECTIVE_TIMEOUT = 60.0
#: a collective waits this many times the measured step time before it gives up
TIMEOUT_STEPS = 200


def collective_timeout(step_seconds: float) -> float:
    """How long a collective waits for the other processes, from the measured step
    time: :data:`TIMEOUT_STEPS` steps, at least :data:`MIN_COLLECTIVE_TIMEOUT` seconds
    (``$PYRO_VAE_COLLECTIVE_TIMEOUT`` where set), instead of the backend's 30 minutes."""
    floor = float(os.environ.get("PYRO_VAE_COLLECTIVE_TIMEOUT", MIN_COLLECTIVE_TIMEOUT))
    return max(floor, TIMEOUT_STEPS * step_seconds)


def set_collective_timeout(seconds: float) -> None:
    """Let every later collective of this process wait at most ``seconds`` for the
    others: a hung process (stopped, swapping, deadlocked) becomes an error."""
    if available():
        try:
            torch.distributed.set_timeout(datetime.timedelta(seconds=seconds))
        except (RuntimeError, ValueError, AttributeError):  # (a backend without it)
            pass


#: what gloo and NCCL say when a peer is gone or does not answer
_LOST = ("reset by peer", "closed by peer", "Broken pipe", "Connection refused", "EOF")
_TIMEOUT = ("Timed out", "timed out", "Timeout", "timeout")


def lost_peer(error: BaseException) -> tuple[str, str] | None:
    """One line for a collective that failed because another process was lost
    (``"lost"``) or stopped answering (``"timeout"``), under torchrun; ``None`` for any
    other error."""
    if not launched_by_torchrun() or not isinstance(error, RuntimeError):
        return None
    text = str(error).strip()
    first = text.splitlines()[0][:160] if text else type(error).__name__
    if any(marker in text for marker in _TIMEOUT):
        return (
            f"another training process stopped answering: a collective operation timed out "
            f"({first}); the last checkpoint is intact: resume the run (`resume`)",
            "timeout",
        )
    if any(marker in text for marker in _LOST):
        return (
            f"another training process was lost ({first}); the last checkpoint is intact: "
            f"resume the run (`resume`)",
            "lost",
        )
    return None


def shutdown() -> None:
    """Leave the group :func:`init_from_environment` joined (nothing otherwise)."""
    if _JOINED and available():
        _JOINED.clear()
        import gc

        gc.collect()  # what still refers to the group (captured graphs on a model) goes first
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(value: Any = None, source: int = 0) -> Any:
    """``value`` of rank ``source``, on every rank (a picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=source)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def collective_device() -> torch.device:
    """Where the backend's collectives take their tensors: this rank's GPU under NCCL
    (which refuses CPU tensors), else the CPU (gloo)."""
    if available() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: Sequence[float], device: str | torch.device | None = None) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64), through ``device``
    (default: :func:`collective_device`)."""
    if world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device or collective_device())
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def shard(count: int) -> slice:
    """This rank's contiguous part of ``count`` items (sizes differ by at most one)."""
    size, here = world_size(), rank()
    base, extra = divmod(count, size)
    start = here * base + min(here, extra)
    return slice(start, start + base + (1 if here < extra else 0))


def batch_part(indices: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch's ``indices`` (contiguous, sizes within one)."""
    return indices[shard(len(indices))]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (rows of a shard from :func:`shard`) concatenated in rank
    order, on every rank: the rows of the whole, in their original order, on
    ``tensor``'s device (gathered through :func:`collective_device`)."""
    if world_size() == 1:
        return tensor
    sizes = gather_objects(int(tensor.shape[0]))
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]), device=collective_device())
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(tensor.device)


def average_step(
    loss: float, parameters: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]
) -> float:
    """Average the step over the ranks in one flat all-reduce: the loss, each parameter's
    gradient, and the floating-point buffers. A parameter keeps ``grad=None`` only if no
    rank produced a gradient for it (frozen, or unused by the programs). Returns the mean
    loss. With one process, nothing changes."""
    return average_step_and_flag(loss, parameters, buffers, False)[0]


def average_step_and_flag(
    loss: float,
    parameters: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    flag: bool,
) -> tuple[float, bool]:
    """:func:`average_step`, and whether ``flag`` is set on any rank (a rank asked to
    stop: every rank learns it in the same step, in the same all-reduce)."""
    size = world_size()
    if size == 1:
        return loss, flag
    floats = [b for b in buffers if b.is_floating_point()]
    first = parameters[0] if parameters else torch.zeros(())
    # in the parameters' own dtype: the sum of two float32 gradients is one rounding,
    # the same as computing their mean in one process; float64 would double the bytes
    dtype, device = first.dtype, first.device
    present = [p.grad is not None for p in parameters]
    pieces = [
        torch.tensor([loss, float(flag), *present], dtype=dtype, device=device),
        *[
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
            for p in parameters
        ],
        *[b.reshape(-1).to(dtype) for b in floats],
    ]
    flat = torch.cat(pieces)
    torch.distributed.all_reduce(flat)
    flat /= size
    mean_loss = float(flat[0])
    any_flag = float(flat[1]) > 0
    offset = 2 + len(parameters)
    got = flat[2:offset]
    for p, seen in zip(parameters, got.tolist()):
        n = p.numel()
        p.grad = flat[offset : offset + n].view(p.shape).to(p.dtype) if seen > 0 else None
        offset += n
    with torch.no_grad():
        for b in floats:
            n = b.numel()
            b.copy_(flat[offset : offset + n].view(b.shape))
            offset += n
    return mean_loss, any_flag
