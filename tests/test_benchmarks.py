"""The benchmark script runs end to end (tiny settings; timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_script_runs(tmp_path, mnist_dir):
    out = tmp_path / "bench.json"
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--quick",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--eval-points",
        "2",
        "--example-images",
        "512",
        "--call-images",
        "512",
        "--example-small-images",
        "256",
        "--iwae-call-images",
        "256",
        "--call-repeats",
        "1",
        "--trained-steps",
        "2",
        "--trained-repeats",
        "1",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {r["estimator"] for r in data["training"]} == {"mc", "analytic", "iwae"}
    assert all(r["ratio"] > 0 for r in data["training"])
    calls = [(r["estimator"], r["particles"]) for r in data["whole_calls"]]
    assert calls == [("mc", 1), ("mc", 1), ("analytic", 1), ("analytic", 1), ("iwae", 50)]
    assert all(r["ratio"] > 0 and len(r["first_calls_seconds"]) == 2 for r in data["whole_calls"])
    trained = data["trained_state"]["rows"]
    assert [r["estimator"] for r in trained] == ["iwae", "mc"]
    assert all(r["trained_over_fresh_ours"] > 0 for r in trained)
    assert data["pyro_example"]["ours_over_example"] > 0
    assert [r["batch"] for r in data["pyro_example_small"]] == [32, 20]
    small = data["small_batches"]["rows"]
    assert [(r["estimator"], r["particles"], r["batch"]) for r in small] == [
        ("mc", 1, 20),
        ("iwae", 5, 20),
        ("iwae", 50, 20),
    ]
    assert all(r["threads"] == 1 and r["cpu_capability"] for r in small)
    assert data["environment"]["cpu_capability"] and data["training"][0]["threads"] >= 1
    assert data["evaluation"]["peak_memory_mb"]["ours"] >= 0
    assert data["capture"]["capture_seconds"] > 0 and data["capture"]["machinery_load_mb"] >= 0
    assert "| cell | ours | reference |" in result.stdout


def test_denormal_script_runs(mnist_dir):
    """benchmarks/denormals.py, which the performance page cites, runs end to end."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "denormals.py"), "--data-dir"]
    argv += [str(mnist_dir), "--steps", "2", "--timed-steps", "1", "--rounds", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cells = json.loads(done.stdout.splitlines()[-1])["cells"]
    assert set(cells) == {"fresh", "trained"}
    assert all(0.0 <= c["denormal_share_of_logit_gradient"] <= 1.0 for c in cells.values())


def test_update_replaces_only_the_sections_run(tmp_path):
    """``run.py --update`` keeps the sections it did not run, and records the run of each
    section it replaced (the page then names it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
        import tables
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps(
            {
                "environment": {"commit": "old"},
                "scaling": {"rows": [1]},
                "whole_calls": [{"old": True}],
            }
        )
    )
    new = {"environment": {"commit": "new"}, "seconds": 60.0, "scaling": {"rows": [2]}}
    merged = run.updated(path, new, ["scaling"])
    assert merged["scaling"] == {"rows": [2]}
    assert merged["whole_calls"] == [{"old": True}]
    assert merged["environment"] == {"commit": "old"}
    assert merged["section_runs"]["scaling"]["commit"] == "new"
    assert "Section scaling measured again later (1 minutes, commit new)" in (
        tables.environment_line(
            {
                **merged,
                "environment": {
                    "cpus": 2,
                    "machine": "x86_64",
                    "threads": 2,
                    "python": "3",
                    "torch": "t",
                    "pyro": "p",
                    "commit": "old",
                },
            }
        )
    )
