"""The commands on a device against the same commands on the CPU: a parity check of the
device path (``--device cuda``) of train, evaluate, compare, diagnose and sample, with the
wall time of each on each device.

Every command runs twice through the ``pyro-vae`` entry point (``pyro_vae.app.cli.main``),
once with ``--device cpu`` and once with ``--device DEVICE``, on the embedded digits data
at a small size; the numbers they write are then checked against each other:

- ``evaluate`` of the *same* trained parameters (the CPU run's folder) on both devices:
  importance-sampled log p(x) (K=200) must agree within 4 standard errors of the
  difference (the two devices draw different noise, so only statistical agreement is
  expected);
- ``train``: both runs finite, test ELBOs within 5 nats (different noise through one
  epoch);
- ``compare`` and ``diagnose``: they finish, and every number they report is finite where
  the CPU's is; ``sample`` draws from the device-trained run.

Run on a machine with a GPU::

    python benchmarks/device_check.py --out /tmp/device-check          # cuda vs cpu

``--device cpu`` runs the CPU against itself (what the test suite does, so that the script
itself is known to work where no GPU is); then the two runs must agree exactly.
Exit status 0 when every check holds, 1 otherwise; ``device_check.json`` holds the times.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any

TRAIN = ["--dataset", "digits", "--limit", "400", "--epochs", "2", "--eval-samples", "50"]
COMPARE = [
    "--estimators", "mc,iwae", "--dataset", "digits", "--limit", "200", "--epochs", "1",
    "--eval-samples", "20", "--grad-draws", "5", "--snr-particles", "1,3",
    "--bound-particles", "1,5", "--latent-dims", "4", "--hidden", "32",
]  # fmt: skip
DIAGNOSE = [
    "--images", "2", "--chains", "2", "--warmup", "20", "--samples", "20", "--is-samples",
    "50", "--local-steps", "20", "--khat-images", "30", "--khat-samples", "30", "--no-jit",
]  # fmt: skip


def pyro_vae(*argv: str) -> tuple[float, str]:
    """Run one command as ``pyro-vae`` runs it (in this process, so that the times are
    the command's work, not an interpreter's start); its wall time and standard output."""
    from pyro_vae.app.cli import main

    stdout = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        status = main(list(argv))
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"pyro-vae {' '.join(argv)} failed ({status})")
    return seconds, stdout.getvalue()


def finite_numbers(value: Any, path: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its path."""
    if isinstance(value, dict):
        return {
            k: v
            for key, item in value.items()
            for k, v in finite_numbers(item, f"{path}.{key}").items()
        }
    if isinstance(value, list):
        return {
            k: v
            for i, item in enumerate(value)
            for k, v in finite_numbers(item, f"{path}[{i}]").items()
        }
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {}
    return {path: float(value)}


def not_finite_where_cpu_is(cpu: Any, other: Any) -> list[str]:
    """Paths whose number is finite on the CPU and not on the other device."""
    theirs = finite_numbers(other)
    return [
        path
        for path, value in finite_numbers(cpu).items()
        if math.isfinite(value) and path in theirs and not math.isfinite(theirs[path])
    ]


def check(out: Path, device: str) -> dict[str, Any]:
    times: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    exact = device == "cpu"

    def timed(name: str, where: str, *argv: str) -> str:
        seconds, stdout = pyro_vae(*argv)
        times.setdefault(name, {})[where] = seconds
        return stdout

    sides = (("cpu", "cpu"), ("device", device))  # (label, device): cpu twice for --device cpu
    runs = {}
    for side, where in sides:
        folder = out / f"train-{side}"
        timed("train", side, "train", *TRAIN, "--device", where, "--out", str(folder), "--quiet")
        runs[side] = json.loads((folder / "evaluation.json").read_text())
    a, b = runs["cpu"], runs["device"]
    if not (math.isfinite(a["test_elbo"]) and math.isfinite(b["test_elbo"])):
        failures.append(f"train: test ELBO not finite ({a['test_elbo']}, {b['test_elbo']})")
    elif exact and a["test_elbo"] != b["test_elbo"]:
        failures.append(f"train: the CPU twice gave {a['test_elbo']} and {b['test_elbo']}")
    elif abs(a["test_elbo"] - b["test_elbo"]) > 5.0:
        failures.append(f"train: test ELBO {a['test_elbo']:.3f} on cpu, {b['test_elbo']:.3f}")

    evaluations = {}
    for side, where in sides:
        stdout = timed(
            "evaluate", side, "evaluate", str(out / "train-cpu"), "--samples", "200",
            "--device", where, "--json", "--quiet",
        )  # fmt: skip
        evaluations[side] = json.loads(stdout)
    a, b = evaluations["cpu"], evaluations["device"]
    se = math.hypot(a["test_log_likelihood_sem"], b["test_log_likelihood_sem"])
    difference = abs(a["test_log_likelihood"] - b["test_log_likelihood"])
    if exact and difference != 0:
        failures.append(f"evaluate: the CPU twice differs by {difference}")
    elif difference > 4 * se:
        failures.append(f"evaluate: log p(x) differs by {difference:.3f} > 4 s.e. ({4 * se:.3f})")

    for name, argv, report in (
        ("compare", COMPARE, "comparison.json"),
        ("diagnose", [str(out / "train-cpu"), *DIAGNOSE], "diagnostics.json"),
    ):
        reports = {}
        for side, where in sides:
            folder = out / f"{name}-{side}"
            timed(name, side, name, *argv, "--device", where, "--out", str(folder), "--quiet")
            reports[side] = json.loads((folder / report).read_text())
        bad = not_finite_where_cpu_is(reports["cpu"], reports["device"])
        if bad:
            failures.append(f"{name}: not finite on {device} where finite on cpu: {bad[:5]}")

    # sample has no --device: it loads the run on the CPU; the device's run folder here
    for side, _ in sides:
        target = out / f"samples-{side}.png"
        timed("sample", side, "sample", str(out / f"train-{side}"), "--out", str(target))
        if not target.exists():
            failures.append(f"sample of the {side} run: no PNG")
    return {"device": device, "seconds": times, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty: pass a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    result = check(args.out, args.device)
    (args.out / "device_check.json").write_text(json.dumps(result, indent=2))
    print(f"{'command':<10} {'cpu s':>8} {args.device + ' s':>8}")
    for name, seconds in result["seconds"].items():
        print(f"{name:<10} {seconds['cpu']:8.1f} {seconds['device']:8.1f}")
    for failure in result["failures"]:
        print(f"FAILED {failure}")
    print("all checks hold" if not result["failures"] else f"{len(result['failures'])} failed")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
