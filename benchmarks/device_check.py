"""The commands on a device against the same commands on the CPU: a parity check of the
device path (``--device cuda``) of train, evaluate, compare and diagnose, with the wall
time of each on each side.

Every command runs twice through the ``pyro-vae`` entry point (``pyro_vae.app.cli.main``),
once with ``--device cpu`` and once with ``--device DEVICE``, on the embedded digits data
at a small size. A command that fails is recorded as a failure (its one-line error, or
its exception) and the checks that need its output are skipped; the rest still run.

- ``train`` (with ``--compile``: the captured graphs of the fast path, on the device too):
  both runs finite, test ELBOs within 5 nats (the two devices draw different noise
  through two epochs, so only closeness is expected);
- log p(x) of the *same* parameters (the CPU run's, loaded on each side) on the same 100
  test images, K=200, per image: the mean of the paired differences must be within 4
  standard errors of zero (the standard error of those differences: the sampling noise
  of the two estimates, not the spread over images);
- ``evaluate`` on each side finishes, with finite numbers where the CPU's are;
- ``compare`` and ``diagnose`` (NUTS with the JIT): they finish, and every number they
  report is finite where the CPU's is;
- ``sample`` of the device-trained run: its checkpoint loads on the CPU and draws.

Run on a machine with a GPU::

    python benchmarks/device_check.py --out /tmp/device-check          # cuda vs cpu

``--device cpu`` runs the CPU against itself (what the test suite does, so that the script
itself is known to work where no GPU is); then the paired log p(x) must agree exactly.
Exit status 0 when every check holds, 1 otherwise; ``device_check.json`` holds the times
and the failures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

TRAIN = [
    "--dataset", "digits", "--limit", "400", "--epochs", "2", "--eval-samples", "50",
    "--compile", "--quiet",
]  # fmt: skip
COMPARE = [
    "--estimators", "mc,iwae", "--dataset", "digits", "--limit", "200", "--epochs", "1",
    "--eval-samples", "20", "--grad-draws", "5", "--snr-particles", "1,3",
    "--bound-particles", "1,5", "--latent-dims", "4", "--hidden", "32", "--quiet",
]  # fmt: skip
DIAGNOSE = [
    "--images", "2", "--chains", "2", "--warmup", "20", "--samples", "20", "--is-samples",
    "50", "--local-steps", "20", "--khat-images", "30", "--khat-samples", "30", "--quiet",
]  # fmt: skip


def pyro_vae(*argv: str) -> tuple[int, float, str, str]:
    """Run one command as ``pyro-vae`` runs it, in this process (so that the times are the
    command's work, not an interpreter's start): exit status, wall time, stdout, stderr."""
    from pyro_vae.app.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(list(argv))
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code if isinstance(exit_.code, int) else 2
        except Exception:  # a traceback is a failure of its own kind: keep it, go on
            traceback.print_exc()
            status = 1
    return status, time.perf_counter() - started, stdout.getvalue(), stderr.getvalue()


def finite_numbers(value: Any, path: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its path."""
    if isinstance(value, dict):
        pairs = [finite_numbers(item, f"{path}.{key}") for key, item in value.items()]
    elif isinstance(value, list):
        pairs = [finite_numbers(item, f"{path}[{i}]") for i, item in enumerate(value)]
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return {}
    else:
        return {path: float(value)}
    return {key: number for numbers in pairs for key, number in numbers.items()}


def not_finite_where_cpu_is(cpu: Any, other: Any) -> list[str]:
    """Paths whose number is finite on the CPU and not on the other device."""
    theirs = finite_numbers(other)
    return [
        path
        for path, value in finite_numbers(cpu).items()
        if math.isfinite(value) and path in theirs and not math.isfinite(theirs[path])
    ]


def paired_log_likelihood(run: Path, device: str, images: int = 100, samples: int = 200):
    """log p(x) per image of ``run``'s parameters on the CPU and on ``device``, the same
    images, each side from seed 0: the per-image differences (CPU minus device)."""
    import torch

    from pyro_vae import load_run
    from pyro_vae.analysis.evaluation import log_likelihood

    values = []
    for where in ("cpu", device):
        _, vae, data, _ = load_run(run, where)
        x = data.evaluation_images("test")[:images]
        torch.manual_seed(0)
        values.append(log_likelihood(vae, x, samples).cpu().double())
    return values[0] - values[1]


class Check:
    """The commands of one side-by-side run, their times, and what failed."""

    def __init__(self, out: Path, device: str) -> None:
        self.out, self.device = out, device
        self.sides = (("cpu", "cpu"), ("device", device))  # (label, device)
        self.seconds: dict[str, dict[str, float]] = {}
        self.failures: list[str] = []

    def command(self, name: str, side: str, *argv: str) -> str | None:
        """stdout of ``pyro-vae ARGV``, or ``None`` with its failure recorded."""
        status, seconds, stdout, stderr = pyro_vae(*argv)
        self.seconds.setdefault(name, {})[side] = seconds
        if status != 0:
            last = stderr.strip().splitlines()[-1] if stderr.strip() else f"status {status}"
            self.failures.append(f"{name} ({side}, {' '.join(argv[:1])}): {last}")
            return None
        return stdout

    def run(self) -> None:
        out, device = self.out, self.device
        trained = {}
        for side, where in self.sides:
            folder = out / f"train-{side}"
            if self.command(
                "train", side, "train", *TRAIN, "--device", where, "--out", str(folder)
            ):
                trained[side] = json.loads((folder / "evaluation.json").read_text())
        if len(trained) == 2:
            a, b = trained["cpu"]["test_elbo"], trained["device"]["test_elbo"]
            if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) > 5.0:
                self.failures.append(f"train: test ELBO {a:.3f} on cpu, {b:.3f} on {device}")
        if "cpu" not in trained:
            return  # everything below reads the CPU run
        run = out / "train-cpu"
        try:
            difference = paired_log_likelihood(run, device)
        except Exception as error:  # noqa: BLE001 - reported as a failure, with its type
            self.failures.append(f"paired log p(x): {type(error).__name__}: {error}")
        else:
            mean = float(difference.mean())
            se = float(difference.std() / math.sqrt(len(difference)))
            if device == "cpu" and mean != 0.0:
                self.failures.append(f"paired log p(x): the CPU twice differs by {mean}")
            elif not math.isfinite(mean) or abs(mean) > 4 * se:
                self.failures.append(
                    f"paired log p(x): mean difference {mean:.4f} > 4 s.e. ({4 * se:.4f})"
                )
        evaluations = {}
        for side, where in self.sides:
            printed = self.command(
                "evaluate", side, "evaluate", str(run), "--samples", "200",
                "--device", where, "--json", "--quiet",
            )  # fmt: skip
            if printed is not None:
                evaluations[side] = json.loads(printed)
        self.compare_finite("evaluate", evaluations)
        for name, argv, report in (
            ("compare", COMPARE, "comparison.json"),
            ("diagnose", [str(run), *DIAGNOSE], "diagnostics.json"),
        ):
            reports = {}
            for side, where in self.sides:
                folder = out / f"{name}-{side}"
                if self.command(name, side, name, *argv, "--device", where, "--out", str(folder)):
                    reports[side] = json.loads((folder / report).read_text())
            self.compare_finite(name, reports)
        if "device" in trained:  # sample loads on the CPU: the device's checkpoint must too
            target = out / "samples-of-the-device-run.png"
            sampled = self.command(
                "sample", "device", "sample", str(out / "train-device"), "--out", str(target)
            )
            if sampled is not None and not target.exists():
                self.failures.append("sample of the device-trained run: no PNG")

    def compare_finite(self, name: str, reports: dict[str, Any]) -> None:
        if len(reports) == 2:
            bad = not_finite_where_cpu_is(reports["cpu"], reports["device"])
            if bad:
                self.failures.append(
                    f"{name}: not finite on {self.device} where finite on cpu: {bad[:5]}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty: pass a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.device)
    check.run()
    result = {"device": args.device, "seconds": check.seconds, "failures": check.failures}
    (args.out / "device_check.json").write_text(json.dumps(result, indent=2))
    print(f"{'command':<10} {'cpu s':>8} {args.device + ' s':>8}")
    for name, seconds in check.seconds.items():
        cpu, other = seconds.get("cpu", math.nan), seconds.get("device", math.nan)
        print(f"{name:<10} {cpu:8.1f} {other:8.1f}")
    for failure in check.failures:
        print(f"FAILED {failure}")
    print("all checks hold" if not check.failures else f"{len(check.failures)} failed")
    return 1 if check.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
