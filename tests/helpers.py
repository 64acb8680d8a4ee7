"""Shared test helpers: repeated estimator draws and statistical comparisons."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

#: CLI flags for a tiny, fast run on 200 digits (the tests of train, compare, diagnose).
TINY_RUN = [
    "--dataset",
    "digits",
    "--limit",
    "200",
    "--latent-dims",
    "3",
    "--hidden",
    "16",
    "--batch-size",
    "50",
    "--quiet",
]

#: `pyro-vae compare` flags for a tiny comparison (2 epochs, few draws, small K)
TINY_COMPARE = [
    *TINY_RUN,
    "--epochs",
    "2",
    "--grad-draws",
    "5",
    "--eval-samples",
    "20",
    "--snr-particles",
    "1,3",
    "--bound-particles",
    "1,5",
]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``pyro-vae ARGV`` in this process: (exit status, stdout, stderr) of that call alone
    (argparse's usage errors included, as the exit status they raise)."""
    from pyro_vae.app.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv, capsys, message: str, status: int = 2, watched: Path | None = None) -> str:
    """Run ``pyro-vae ARGV``: it must exit ``status`` with one line on stderr holding
    ``message``, no traceback, and leave ``watched`` (a folder) as it was."""
    before = digest(watched) if watched is not None else None
    code, out, err = run_cli(argv, capsys)
    assert code == status, (code, out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    if watched is not None:
        assert digest(watched) == before
    return err


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path ({} if it does not exist):
    equal before and after a command exactly when it left the folder as it was."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in module.parameters()
        ]
    )


def draws(elbo, vae, x, repeats: int, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``repeats`` independent (loss, gradient) draws of a Pyro ELBO.

    Returns the losses ``(R,)`` and the gradients of the loss, ``(R, P)``, for the
    encoder/guide and the decoder/model parameters separately.
    """
    parts = {"encoder": vae.encoder, "decoder": vae.decoder}
    losses, grads = [], {name: [] for name in parts}
    for _ in range(repeats):
        vae.zero_grad(set_to_none=True)
        losses.append(elbo.loss_and_grads(vae.model, vae.guide, x, **kwargs))
        for name, module in parts.items():
            grads[name].append(flat_grads(module))
    return torch.tensor(losses, dtype=torch.float64), {
        name: torch.stack(g).double() for name, g in grads.items()
    }


def exact_grads(vae, objective: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of ``objective`` for the encoder and decoder parameters, float64."""
    vae.zero_grad(set_to_none=True)
    objective.backward()
    return {
        "encoder": flat_grads(vae.encoder).double(),
        "decoder": flat_grads(vae.decoder).double(),
    }


def assert_unbiased(samples: torch.Tensor, exact: torch.Tensor, sigmas: float = 5.0) -> None:
    """Each coordinate's sample mean is within ``sigmas`` standard errors of ``exact``.

    Coordinates whose draws do not vary are compared to float32 precision instead.
    With 5 standard errors a single coordinate fails by chance with probability below
    6e-7, so a few hundred coordinates stay below 1e-4 together.
    """
    n = samples.shape[0]
    mean = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(n)
    tolerance = sigmas * standard_error + 1e-5 * (1 + exact.abs())
    bad = (mean - exact).abs() > tolerance
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} coordinates off: mean {mean[bad][:5].tolist()}, "
        f"exact {exact[bad][:5].tolist()}, tolerance {tolerance[bad][:5].tolist()}"
    )
