"""Reproductions of published tables: the cells, the paper's numbers, the measured ones.

``iwae-table1``: the MNIST cells of Table 1 of Burda et al. (2016): one and two
stochastic layers, trained with the VAE objective (the ELBO averaged over k samples:
``mc`` with k particles) or the IWAE bound (``iwae`` with k particles), k = 1, 5, 50,
each under the paper's protocol (:data:`pyro_vae.config.PROTOCOLS` ``"iwae"``) and
evaluated by the test log p(x) with K = 5000. Each cell is its own resumable run folder;
this module only names the cells and gathers what their folders hold, it trains nothing.

References:
[1] Burda, Grosse, Salakhutdinov (2016), Importance Weighted Autoencoders, ICLR.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_vae.config import IWAE_PASSES
from pyro_vae.errors import UserInputError


@dataclass(frozen=True)
class Cell:
    """One cell of a table: what to train, and the paper's number for it."""

    name: str
    layers: int
    objective: str  # "vae" or "iwae"
    k: int
    paper_nll: float  # the paper's test negative log-likelihood, nats

    @property
    def latent_dims(self) -> tuple[int, ...]:
        return (50,) if self.layers == 1 else (100, 50)

    @property
    def estimator(self) -> str:
        return "mc" if self.objective == "vae" else "iwae"


#: Burda et al. (2016), Table 1, MNIST: test NLL after 3280 passes
_IWAE_TABLE1 = {
    (1, "vae"): (86.76, 86.47, 86.35),
    (1, "iwae"): (86.76, 85.54, 84.78),
    (2, "vae"): (85.33, 85.01, 84.78),
    (2, "iwae"): (85.33, 83.89, 82.90),
}

TABLES: dict[str, list[Cell]] = {
    "iwae-table1": [
        Cell(f"{layers}l-{objective}-k{k}", layers, objective, k, nll)
        for (layers, objective), numbers in _IWAE_TABLE1.items()
        for k, nll in zip((1, 5, 50), numbers)
    ]
}


def select_cells(table: str, names: str | None = None) -> list[Cell]:
    """The cells of ``table`` (all, or those named in the comma-separated ``names``)."""
    if table not in TABLES:
        raise UserInputError(f"unknown table {table!r}: choose one of {', '.join(TABLES)}")
    cells = TABLES[table]
    if names is None:
        return cells
    wanted = [name.strip() for name in names.split(",")]
    known = {cell.name: cell for cell in cells}
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise UserInputError(
            f"unknown cell(s) {', '.join(unknown) or '(none given)'} of {table}: choose from "
            f"{', '.join(known)}"
        )
    return [known[name] for name in wanted]


def gather(cells: list[Cell], out: Path) -> list[dict[str, Any]]:
    """One row per cell from its run folder ``out/<cell>``: the paper's NLL beside the
    measured one (``-log p(x)`` with its K and number of test images), the passes trained
    of the protocol's 3280, seconds per pass, and the projected time of the whole cell."""
    rows = []
    for cell in cells:
        folder = out / cell.name
        row: dict[str, Any] = {
            "cell": cell.name,
            "layers": cell.layers,
            "objective": cell.objective,
            "k": cell.k,
            "paper_nll": cell.paper_nll,
            "passes": 0,
            "protocol_passes": IWAE_PASSES,
            "measured_nll": None,
            "measured_nll_sem": None,
            "importance_samples": None,
            "test_images": None,
            "seconds_per_pass": None,
            "projected_hours_for_protocol": None,
        }
        metrics = folder / "metrics.jsonl"
        try:
            if metrics.exists():
                epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line]
                if epochs:
                    seconds = [e["seconds"] for e in epochs]
                    per_pass = sorted(seconds)[len(seconds) // 2]  # the median pass
                    row.update(
                        passes=len(epochs),
                        seconds_per_pass=per_pass,
                        projected_hours_for_protocol=per_pass * IWAE_PASSES / 3600,
                        last_test_elbo=epochs[-1]["test_elbo"],
                    )
            evaluation = folder / "evaluation.json"
            if evaluation.exists():
                result = json.loads(evaluation.read_text())
                row.update(
                    measured_nll=result["test_nll"],
                    measured_nll_sem=result["test_log_likelihood_sem"],
                    importance_samples=result["importance_samples"],
                    test_images=result["points"],
                )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise UserInputError(
                f"the records of cell {cell.name} in {folder} are damaged ({reason}): run the "
                f"same command again, which rewrites them from the cell's checkpoint"
            ) from None
        rows.append(row)
    return rows


def markdown(table: str, rows: list[dict[str, Any]]) -> str:
    """The gathered rows as a markdown report (rendering only)."""

    def number(value: Any, digits: int = 2) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    lines = [
        f"# {table}: the paper's test NLL beside this project's",
        "",
        "NLL = -log p(x) in nats per test image, lower is better; ours is importance "
        "sampled with the K shown, on the number of test images shown. The paper trains "
        f"every cell for {IWAE_PASSES} passes; a cell with fewer is a partial run and its "
        "number is not comparable yet (the last column projects the full cost here).",
        "",
        "| cell | paper NLL | our NLL | K | test images | passes | s / pass | full protocol here |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ours = number(row["measured_nll"])
        if row["measured_nll_sem"] is not None and row["measured_nll"] is not None:
            ours += f" ± {number(row['measured_nll_sem'])}"
        hours = row["projected_hours_for_protocol"]
        lines.append(
            f"| {row['cell']} | {row['paper_nll']:.2f} | {ours} | "
            f"{row['importance_samples'] or '-'} | {row['test_images'] or '-'} | "
            f"{row['passes']} of {row['protocol_passes']} | {number(row['seconds_per_pass'])} | "
            f"{'-' if hours is None else f'{hours:.1f} h'} |"
        )
    return "\n".join(lines) + "\n"
