"""Numbers that cannot be right, found before anyone reads them as findings.

A report that prints a bound of +1216 nats on binary images as a result is worse than
one that prints nothing. These checks look at what training, evaluation and a comparison
measured and return :class:`Flag` s, data that the reports print beside the numbers and
record in their JSON; they change nothing and stop nothing.

- **A bound above 0 on binary data.** With a Bernoulli likelihood, p(x) <= 1, so
  log p(x) and every lower bound on it are <= 0 (a continuous density can exceed 1, so
  this applies to binary data only).
- **An objective above its own model's log p(x)** for an estimator that claims to be a
  bound (beyond the Monte Carlo error of the two estimates).
- **A jump of an order of magnitude** between epochs in the KL or the training loss.
- **An estimator far below the others** in one comparison.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: nats an objective may sit above log p(x) before it is flagged: the Monte Carlo error
#: of two estimates on a test set is far smaller; a wrong objective is off by nats
ABOVE_LOG_LIKELIHOOD = 0.5
#: a KL or loss this many times the previous epoch's (and at least JUMP_NATS larger)
JUMP_FACTOR = 10.0
JUMP_NATS = 1.0
#: an estimator whose log p(x) is this share of |median| below the comparison's median
#: (and at least FAR_NATS) is far below the others
FAR_SHARE = 0.1
FAR_NATS = 5.0


@dataclass(frozen=True)
class Flag:
    """One number that cannot be right.

    :param where: what measured it ("epoch 3", "evaluation", "estimator stl").
    :param quantity: the field's name (``train_elbo``, ``test_log_likelihood``, ...).
    :param value: the number.
    :param reason: why it cannot be right, in a few words.
    """

    where: str
    quantity: str
    value: float
    reason: str

    def message(self) -> str:
        """One line for a console or a report."""
        return f"{self.where}: {self.quantity} = {self.value:.3f}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    """``value`` as a float where it is a finite number, else ``None`` (not measured)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _positive_bound(where: str, quantity: str, value: Any) -> list[Flag]:
    number = _number(value)
    if number is not None and number > 0:
        return [Flag(where, quantity, number, "above 0 on binary data, where p(x) <= 1")]
    return []


def history_flags(
    epochs: Sequence[Mapping[str, Any]], *, binary: bool, is_bound: bool = True
) -> list[Flag]:
    """Flags of a training history (``fit``'s per-epoch metrics).

    :param epochs: the epochs' metrics, in order.
    :param binary: the data are binary under a Bernoulli likelihood (bounds <= 0).
    :param is_bound: the training estimator's value is a lower bound on log p(x).
    """
    flags: list[Flag] = []
    previous: Mapping[str, Any] | None = None
    for metrics in epochs:
        where = f"epoch {metrics.get('epoch', '?')}"
        if binary:
            if is_bound:
                flags += _positive_bound(where, "train_elbo", metrics.get("train_elbo"))
            flags += _positive_bound(where, "test_elbo", metrics.get("test_elbo"))
        if previous is not None:
            for quantity, sign in (("test_kl", 1.0), ("train_elbo", -1.0)):
                old, new = _number(previous.get(quantity)), _number(metrics.get(quantity))
                if old is None or new is None:
                    continue
                before, now = sign * old, sign * new
                if abs(now) > JUMP_FACTOR * abs(before) and abs(now - before) > JUMP_NATS:
                    name = "KL" if quantity == "test_kl" else "training loss"
                    flags.append(
                        Flag(
                            where,
                            quantity,
                            sign * now,
                            f"the {name} jumped from {abs(before):.3g} to {abs(now):.3g} "
                            f"in one epoch",
                        )
                    )
        previous = metrics
    return flags


def evaluation_flags(
    evaluation: Mapping[str, Any],
    *,
    binary: bool,
    objective: float | None = None,
    is_bound: bool = True,
) -> list[Flag]:
    """Flags of a final evaluation (``evaluate``'s dict).

    :param evaluation: the evaluation's fields.
    :param binary: the data are binary under a Bernoulli likelihood.
    :param objective: the training estimator's own objective on the same test points.
    :param is_bound: that objective claims to be a lower bound on log p(x).
    """
    flags: list[Flag] = []
    if binary:
        for quantity in ("test_elbo", "test_log_likelihood", "ais_log_likelihood"):
            flags += _positive_bound("evaluation", quantity, evaluation.get(quantity))
    log_px = _number(evaluation.get("test_log_likelihood"))
    elbo = _number(evaluation.get("test_elbo"))
    if log_px is None:
        return flags
    if elbo is not None and elbo - log_px > ABOVE_LOG_LIKELIHOOD:
        flags.append(
            Flag(
                "evaluation",
                "test_elbo",
                elbo,
                f"{elbo - log_px:.2f} nats above the model's own log p(x) ({log_px:.3f})",
            )
        )
    own = _number(objective)
    if is_bound and own is not None and own - log_px > ABOVE_LOG_LIKELIHOOD:
        flags.append(
            Flag(
                "evaluation",
                "objective",
                own,
                f"a bound {own - log_px:.2f} nats above its model's log p(x)",
            )
        )
    return flags


def comparison_flags(
    summary: Sequence[Mapping[str, Any]], *, binary: bool, bounds: Sequence[str]
) -> list[Flag]:
    """Flags of a comparison's summary rows (one per estimator).

    :param summary: rows with ``estimator``, ``test_elbo``, ``test_log_likelihood`` and
        ``objective_minus_log_likelihood``.
    :param binary: the data are binary under a Bernoulli likelihood.
    :param bounds: the estimators whose objective claims to be a lower bound.
    """
    flags: list[Flag] = []
    for row in summary:
        where = f"estimator {row['estimator']}"
        if binary:
            for quantity in ("test_elbo", "test_log_likelihood"):
                flags += _positive_bound(where, quantity, row.get(quantity))
        above = _number(row.get("objective_minus_log_likelihood"))
        if row["estimator"] in bounds and above is not None and above > ABOVE_LOG_LIKELIHOOD:
            flags.append(
                Flag(
                    where,
                    "objective_minus_log_likelihood",
                    above,
                    "a bound above its own model's log p(x)",
                )
            )
    numbers = {row["estimator"]: _number(row.get("test_log_likelihood")) for row in summary}
    values = {name: value for name, value in numbers.items() if value is not None}
    if len(values) >= 2:
        median = statistics.median(values.values())
        margin = max(FAR_SHARE * abs(median), FAR_NATS)
        for name, value in values.items():
            if value < median - margin:
                flags.append(
                    Flag(
                        f"estimator {name}",
                        "test_log_likelihood",
                        value,
                        f"{median - value:.1f} nats below the comparison's median "
                        f"({median:.2f}): check that it trained the objective it claims",
                    )
                )
    return flags
