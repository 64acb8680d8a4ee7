"""Will it fit? Memory estimates made before anything is allocated or written.

A configuration can ask for more than the machine has (``--particles 1000000000000``,
``--hidden 100000000``); the allocator then fails mid-run, after files were written, with
a traceback. These estimates run on the configuration alone, before the model is built,
and refuse with one line that says what to lower. They are deliberately rough (within
a small factor) and err high: what they refuse could not have run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pyro_vae.errors import UserInputError

#: bytes per float32 value
FLOAT = 4
#: copies of each activation a step holds (forward values, their gradients, temporaries)
ACTIVATION_COPIES = 4
#: copies of each parameter training holds: value, gradient, Adam's two moments, and
#: the start-of-epoch snapshot (value and moments) and best parameters kept to go back to
PARAMETER_COPIES = 8


def check_device(device: str) -> None:
    """Refuse, in one line, a device this machine does not have (``"cuda"`` without CUDA)
    or does not know; before anything is read or written."""
    if device not in ("cpu", "cuda"):
        raise UserInputError(f"`device` must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserInputError("CUDA is not available on this machine: use `device='cpu'`")


def available_memory(device: str = "cpu") -> int | None:
    """Bytes the process can still allocate on ``device``, or None where unknown."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return int(free)
        return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mlp(sizes: Sequence[int]) -> tuple[int, int]:
    """(parameters, activation values per input) of an MLP with these layer sizes."""
    parameters = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    return parameters, sum(sizes[1:])


#: activation values per data point of a model of your own, as a multiple of the data's
#: size: an estimate (its networks are not known before they run), not a measurement
OWN_MODEL_VALUES_PER_INPUT = 16


def _factory_sizes(model, data_shape: Sequence[int]) -> tuple[int, int]:
    """A model of your own (``factory``): no parameters counted (its networks are built
    by your code, after this check, which the base layer cannot import), its
    activations estimated as :data:`OWN_MODEL_VALUES_PER_INPUT` times the data's size."""
    return 0, OWN_MODEL_VALUES_PER_INPUT * math.prod(data_shape)


def network_sizes(model, data_shape: Sequence[int]) -> tuple[int, int]:
    """(parameters, activation values per data point and particle) of the VAE that
    :func:`pyro_vae.models.build.build_vae` builds from ``model`` (a ModelConfig)."""
    data_dim = math.prod(data_shape)
    if getattr(model, "factory", None):
        return _factory_sizes(model, data_shape)
    latent = list(model.latent_dims)
    hidden = list(model.hidden)
    if len(latent) == 1 and model.network == "conv":
        channels = data_shape[0]
        pixels = data_dim // channels
        width = hidden[0] if hidden else 256
        grid = 4 * pixels  # 64 channels at a quarter of the height and of the width
        encoder = (channels * 16 + 1) * 32 + (32 * 16 + 1) * 64 + (grid + 1) * width
        encoder += 2 * (width + 1) * latent[0]
        decoder = (latent[0] + 1) * width + (width + 1) * grid + (64 * 16 + 1) * 32
        decoder += (32 * 16 + 1) * channels
        values = 20 * pixels + 2 * width + grid + 2 * latent[0] + 3 * data_dim
        return encoder + decoder, values
    if len(latent) == 1:
        enc = _mlp([data_dim, *hidden, 2 * latent[0]])
        dec = _mlp([latent[0], *reversed(hidden), data_dim])
        return enc[0] + dec[0], enc[1] + dec[1] + 2 * data_dim
    # hierarchical: per layer an encoder and a conditional of the same widths, a decoder
    parameters = values = 0
    widths = [hidden] + [[d, d] for d in latent[:-1]]
    inputs = [data_dim, *latent[:-1]]
    for size, width, layer in zip(inputs, widths, latent):
        for part in (_mlp([size, *width, 2 * layer]), _mlp([layer, *reversed(width), 2 * size])):
            parameters += part[0]
            values += part[1]
    return parameters, values + 2 * data_dim


def check_fits(needed: int, what: str, fix: str, device: str = "cpu") -> None:
    """Refuse when ``needed`` bytes exceed what ``device`` has available."""
    available = available_memory(device)
    if available is not None and needed > 0.9 * available:
        raise UserInputError(
            f"{what} needs about {_size(needed)} of memory and {device} has "
            f"{_size(available)} available: {fix}"
        )


def check_training_fits(config, data_shape: Sequence[int], num_data: int) -> None:
    """Refuse a run whose model or training step cannot fit in memory (``config`` is a
    RunConfig, ``num_data`` the training set's size); also refuses sizes past what an
    index can address."""
    parameters, values = network_sizes(config.model, data_shape)
    train = config.train
    batch = min(train.batch_size, num_data)
    step = batch * train.particles * values * ACTIVATION_COPIES * FLOAT
    evaluation = 1000 * train.eval_particles * values * FLOAT
    for count, what, fix in (
        (parameters, "the model", "lower `hidden` or `latent_dims`"),
        (step, "one step", "lower `batch_size` or `particles`"),
    ):
        if count >= 2**62:
            raise UserInputError(f"{what} would need more than 2^62 values: {fix}")
    check_fits(
        parameters * PARAMETER_COPIES * FLOAT,
        f"a model with {parameters:,} parameters",
        "lower `hidden` or `latent_dims`",
        train.device,
    )
    check_fits(
        parameters * PARAMETER_COPIES * FLOAT + step,
        f"a step of {batch} data points x {train.particles} particles",
        "lower `batch_size` or `particles`",
        train.device,
    )
    check_fits(
        evaluation,
        f"evaluating the test ELBO with {train.eval_particles} particles",
        "lower eval_particles",
        train.device,
    )


def check_sampling_fits(model, data_shape: Sequence[int], count: int, device: str = "cpu") -> None:
    """Refuse drawing ``count`` samples that cannot fit in memory."""
    _, values = network_sizes(model, data_shape)
    needed = count * (values + math.prod(data_shape)) * FLOAT * 2
    check_fits(needed, f"{count:,} samples", "draw fewer (`n`)", device)


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"  # pragma: no cover


def human_seconds(seconds: float) -> str:
    """``95`` -> ``"1 min 35 s"``; for time estimates printed before long work."""
    if not math.isfinite(seconds):
        return "forever"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours / 24:.1f} days"


#: the address space torch and Pyro map on import, with a small run on top (4 GiB;
#: measured on Linux x86-64, torch 2.14: 3.2 GiB after the imports, 3.9 GiB after a
#: tiny training run). Under a lower ``ulimit -v`` torch fails to import, or aborts
#: in C++ (``std::bad_alloc``) before Python can say why.
ADDRESS_SPACE_NEEDED = 4 << 30


def address_space_problem() -> str | None:
    """Why this process's address-space limit (``RLIMIT_AS``, ``ulimit -v``) cannot
    hold torch, or ``None``: checked before torch is imported."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft >= ADDRESS_SPACE_NEEDED:
        return None
    return (
        f"the address-space limit of this process (ulimit -v {soft // 1024} KiB, "
        f"{soft / 2**30:.1f} GiB) is below the {ADDRESS_SPACE_NEEDED / 2**30:.0f} GiB that "
        f"torch maps on import with a small run; raise it (ulimit -v unlimited, or at least "
        f"{ADDRESS_SPACE_NEEDED // 1024})"
    )
