"""The tables of ``benchmarks/results.json`` in Markdown: what ``run.py`` prints at the
end of a run and what the performance page of the docs shows (``docs/hooks.py`` renders
``<!-- benchmark-tables -->`` with :func:`page`). Plain Python, no torch: the docs build
reads the committed results without measuring anything."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"
#: later full runs of the same sections, kept to show the spread between runs
REPEATS = Path(__file__).resolve().parent / "repeats"


#: one cell of the table: its name, ours and the reference as text, the ratio, the
#: quartiles of the per-round ratios (or None), the target (or None), and its row
Cell = tuple[str, str, str, float, "list[float] | None", "float | None", dict[str, Any]]


def cells(result: dict[str, Any]) -> list[Cell]:
    """Every cell with a target (and the per-step training table), in the table's order."""
    out: list[Cell] = []
    for r in result.get("training", []):
        out.append(
            (
                f"step: {r['estimator']} K={r['particles']}, batch {r['batch']}",
                f"{r['ours_ms_per_step']:.2f} ms",
                f"floor {r['floor_ms_per_step']:.2f} ms",
                r["ratio"],
                r["ratio_of_pairs_quartiles"],
                r["target"],
                r,
            )
        )
    for r in result.get("whole_calls", []):
        out.append(
            (
                f"whole fit call: {r['estimator']} K={r.get('particles', 1)}, batch "
                f"{r['batch']}, {r['images']} images",
                f"{r['ours_seconds']:.2f} s",
                f"floor {r['floor_seconds']:.2f} s",
                r["ratio"],
                r["ratio_of_pairs_quartiles"],
                r["target"],
                r,
            )
        )
    for section in ("small_batches", "trained_state"):
        for r in result.get(section, {}).get("rows", []):
            for state in ("fresh", "trained"):
                ms = r["ms_per_step"]
                out.append(
                    (
                        f"step, {state}: {r['estimator']} K={r['particles']}, batch "
                        f"{r['batch']}"
                        + (" (784-200-200-50 tanh)" if section == "small_batches" else ""),
                        f"{ms[f'ours, {state}']:.2f} ms",
                        f"floor {ms[f'floor, {state}']:.2f} ms",
                        r[f"ours_over_floor_{state}"],
                        r.get(f"ours_over_floor_{state}_quartiles"),
                        r.get("target"),
                        r,
                    )
                )
    examples = [result["pyro_example"]] if "pyro_example" in result else []
    for r in examples + result.get("pyro_example_small", []):
        per_epoch = r["seconds_per_60000_images"]
        out.append(
            (
                f"Pyro's example, batch {r.get('batch', 256)} (per 60,000 images)",
                f"{per_epoch['pyro_vae.fit']:.2f} s",
                f"example {per_epoch['pyro example']:.2f} s",
                r["ours_over_example"],
                r.get("ours_over_example_quartiles"),
                r.get("target"),
                r,
            )
        )
    return out


def _ratio(value: float, quartiles: list[float] | None) -> str:
    return f"{value:.3f}" + (f" ({quartiles[0]:.3f}-{quartiles[1]:.3f})" if quartiles else "")


def markdown(result: dict[str, Any]) -> str:
    """Every cell with a target (and the per-step training table), as the performance
    page shows them: medians over rounds of each round's ratio, with the quartiles."""
    lines = [
        "| cell | ours | reference | ratio (quartiles) | target | threads | CPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell, ours, reference, value, quartiles, target, row in cells(result):
        lines.append(
            f"| {cell} | {ours} | {reference} | {_ratio(value, quartiles)} | "
            f"{_target(target, value)} | {row.get('threads', '?')} | "
            f"{row.get('cpu_capability', '?')} |"
        )
    return "\n".join(lines)


def across_runs(results: list[dict[str, Any]]) -> str:
    """The cells of several runs side by side: each run's ratio (with its quartiles) and
    the median of the runs' ratios against the target; a cell missing from a run is
    left out of its median."""
    ratios: dict[str, list[tuple[float, list[float] | None]]] = {}
    targets: dict[str, float | None] = {}
    for result in results:
        for cell, _, _, value, quartiles, target, _ in cells(result):
            ratios.setdefault(cell, []).append((value, quartiles))
            targets[cell] = target
    header = " | ".join(f"run {i + 1}" for i in range(len(results)))
    lines = [
        f"| cell | {header} | median of the runs | target |",
        "| --- | " + "--- | " * len(results) + "--- | --- |",
    ]
    for cell, values in ratios.items():
        median = statistics.median(v for v, _ in values)
        shown = [_ratio(v, q) for v, q in values] + [""] * (len(results) - len(values))
        lines.append(
            f"| {cell} | {' | '.join(shown)} | {median:.3f} | {_target(targets[cell], median)} |"
        )
    return "\n".join(lines)


def _target(target: float | None, ratio: float | None = None) -> str:
    if target is None:
        return "no target"
    if ratio is None:
        return f"target <= {target}"
    return f"<= {target} ({'holds' if ratio <= target else 'missed'})"


def environment_line(result: dict[str, Any]) -> str:
    env = result["environment"]
    return (
        f"Measured by `python benchmarks/run.py` ({'quick' if result.get('quick') else 'full'} "
        f"run, {result.get('seconds', 0) / 60:.0f} minutes"
        + (f", commit {env['commit']}" if env.get("commit") else "")
        + f") on {env['cpus']} CPU cores "
        f"({env['machine']}, torch CPU capability {env.get('cpu_capability', '?')}), "
        f"{env['threads']} torch threads unless a row says otherwise, Python {env['python']}, "
        f"torch {env['torch']}, pyro-ppl {env['pyro']}. Other processes used a median of "
        f"{_others(result):.2f} CPUs during the timed calls."
        + "".join(
            f" Section {name} measured again later ({run.get('seconds', 0) / 60:.0f} minutes"
            + (f", commit {run['commit']}" if run.get("commit") else "")
            + ")."
            for name, run in result.get("section_runs", {}).items()
        )
    )


def _others(result: dict[str, Any]) -> float:
    values = []
    for section in result.values():
        rows = section.get("rows", []) if isinstance(section, dict) else section
        if isinstance(section, dict) and "others_cpu_median" in section:
            rows = [section, *rows]
        if isinstance(rows, list):
            values += [
                r["others_cpu_median"]
                for r in rows
                if isinstance(r, dict) and r.get("others_cpu_median") is not None
            ]
    return sorted(values)[len(values) // 2] if values else float("nan")


def capture_line(result: dict[str, Any]) -> str:
    c = result.get("capture")
    if not c:
        return ""
    return (
        f"Capture: loading torch's tracing stack {c['machinery_load_seconds']:.2f} s and "
        f"{c['machinery_load_mb']:.0f} MB (once per process, measured in a fresh one); "
        f"capturing and checking the mc graph at batch 128 {c['capture_seconds']:.3f} s, "
        f"against {1e3 * c['replayed_step_seconds']:.2f} ms for a replayed step."
    )


def scaling_table(result: dict[str, Any]) -> str:
    lines = [
        "| estimator | K | batch | ours ms / step | floor ms / step | ratio (quartiles) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.get("scaling", {}).get("rows", []):
        quartiles = r.get("ratio_of_pairs_quartiles")
        spread = f" ({quartiles[0]:.3f}-{quartiles[1]:.3f})" if quartiles else ""
        lines.append(
            f"| {r['estimator']} | {r['particles']} | {r['batch']} | "
            f"{r['ours_ms_per_step']:.2f} | {r['floor_ms_per_step']:.2f} | "
            f"{r['ratio']:.3f}{spread} |"
        )
    return "\n".join(lines)


def evaluation_table(result: dict[str, Any]) -> str:
    e = result.get("evaluation")
    if not e:
        return ""
    seconds, memory = e["seconds_per_1000_points"], e.get("peak_memory_mb", {})
    q = e["ratio_of_pairs_quartiles"]
    return "\n".join(
        [
            f"| log p(x), K = {e['samples']}, chunks of {e['chunk']} samples | seconds per "
            "1000 points | peak memory added |",
            "| --- | --- | --- |",
            f"| `pyro_vae.log_likelihood` | {seconds['pyro_vae.log_likelihood']:.1f} | "
            f"{memory.get('ours', float('nan')):.0f} MB |",
            f"| plain batched PyTorch | {seconds['pytorch floor']:.1f} | "
            f"{memory.get('floor', float('nan')):.0f} MB |",
            f"| ratio (quartiles) | {e['ratio']:.3f} ({q[0]:.3f}-{q[1]:.3f}); "
            f"{_target(e.get('target'), e['ratio'])} | |",
        ]
    )


def page(path: Path = RESULTS) -> str:
    """The performance page's generated part, from the committed results."""
    result = json.loads(path.read_text())
    return "\n\n".join(
        [
            environment_line(result),
            markdown(result),
            capture_line(result),
            "Log p(x):",
            evaluation_table(result),
            "Time per step against batch size (mc) and against K (iwae, batch 128):",
            scaling_table(result),
        ]
    )


def runs_page(paths: list[Path] | None = None) -> str:
    """The performance page's runs side by side: ``results.json`` and the repeated runs
    in ``benchmarks/repeats/``, the commits each was measured at, then :func:`across_runs`."""
    if paths is None:
        paths = [RESULTS, *sorted(REPEATS.glob("*.json"))]
    loaded = [json.loads(path.read_text()) for path in paths]
    if len(loaded) < 2:
        return "Only one run is committed."
    root = RESULTS.parent.parent

    def shown(path: Path) -> str:
        resolved = path.resolve()
        return str(resolved.relative_to(root) if resolved.is_relative_to(root) else path)

    described = []
    for i, (path, result) in enumerate(zip(paths, loaded, strict=True)):
        sections = (result.get("section_runs") or {}).values()
        commits = {result["environment"].get("commit")} | {run.get("commit") for run in sections}
        described.append(
            f"run {i + 1} `{shown(path)}` (commit {', '.join(sorted(c or '?' for c in commits))})"
        )
    command = "python benchmarks/tables.py " + " ".join(shown(path) for path in paths)
    return f"`{command}`: " + ", ".join(described) + ".\n\n" + across_runs(loaded)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="the cells of run.py's results files: one file's table, or several "
        "runs side by side with the median of their ratios"
    )
    parser.add_argument("results", nargs="*", type=Path, default=[RESULTS])
    args = parser.parse_args(argv)
    loaded = [json.loads(path.read_text()) for path in args.results]
    print(markdown(loaded[0]) if len(loaded) == 1 else across_runs(loaded))


if __name__ == "__main__":
    main()
