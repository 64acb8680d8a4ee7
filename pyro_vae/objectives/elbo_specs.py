"""Specs for what a user names by import path: a Pyro ELBO class, a factory, an ELBO object.

Their options are read from the signature (keyword parameters with a default of a plain
type, :func:`keyword_options`), their claims from the class (:data:`PYRO_CLAIMS` for
Pyro's own, attributes for a user's, :func:`claims_of`).
:func:`~pyro_vae.objectives.registry.estimator_spec` decides which applies.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyro_vae.errors import UserInputError
from pyro_vae.objectives.options import OPTION_TYPES, Option
from pyro_vae.objectives.spec import Estimator

#: keyword parameters of a Pyro ELBO class that the trainer sets, never options
_SET_BY_THE_TRAINER = ("num_particles", "max_plate_nesting")
#: keyword parameters of Pyro's ELBO base class that change warnings, not the estimator
_PYRO_INTERNALS = (
    "strict_enumeration_warning",
    "ignore_jit_warnings",
    "jit_options",
    "retain_graph",
)


def keyword_options(function: Callable[..., Any]) -> tuple[Option, ...]:
    """The options of a class or factory: its keyword parameters with a default of a
    plain type (``bool``, ``int``, ``float``, ``str``), except those the trainer sets."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return ()
    options = []
    for p in parameters:
        if p.name in _SET_BY_THE_TRAINER or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in _PYRO_INTERNALS or p.default is p.empty or type(p.default) not in OPTION_TYPES:
            continue
        kind: type = type(p.default)
        if kind is int and p.annotation not in (int, "int"):
            kind = float  # an unannotated 0 (RenyiELBO's alpha) is a number, not a count
        default = kind(p.default)
        options.append(Option(p.name, kind, default, f"{p.name} of {function.__name__}"))
    return tuple(options)


class KeywordBuilder:
    """Builds a Pyro ELBO class (or calls a factory) with the keywords it accepts."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            parameters = {}  # type: ignore[assignment]
        self.accepts = set(parameters)
        self.any_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters.values())

    def __call__(self, num_particles: int, *, max_plate_nesting: int | None, **options: Any) -> Any:
        keywords: dict[str, Any] = dict(options)
        if "num_particles" in self.accepts or self.any_keyword:
            keywords["num_particles"] = num_particles
        elif num_particles != 1:
            raise UserInputError(
                f"{self.function.__name__} takes no num_particles: use it with 1 particle"
            )
        if max_plate_nesting is not None and ("max_plate_nesting" in self.accepts):
            keywords["max_plate_nesting"] = max_plate_nesting
        return self.function(**keywords)


#: what this project knows of Pyro's own ELBO classes beyond their signatures
PYRO_CLAIMS: dict[str, dict[str, Any]] = {
    "TraceTailAdaptive_ELBO": {
        "has_value": False,
        "is_bound": False,
        "summary": "Pyro's tail-adaptive f-divergence (Wang et al., 2018): a gradient, no value",
    },
    "Trace_ELBO": {"is_bound": True, "summary": "Pyro's Trace_ELBO"},
    "TraceMeanField_ELBO": {
        "closed_form_kl": True,
        "summary": "Pyro's TraceMeanField_ELBO (closed-form KL)",
    },
    "TraceGraph_ELBO": {
        "is_bound": True,
        "summary": "Pyro's score-function ELBO with Rao-Blackwellization and baselines",
    },
    "RenyiELBO": {"is_bound": True, "summary": "Pyro's Renyi bound (Li & Turner, 2016)"},
    "ReweightedWakeSleep": {
        "is_bound": True,
        "summary": "Pyro's reweighted wake-sleep (value: the wake-theta loss, L_K of the "
        "whole batch at once)",
        "capture": "never",
    },
}


def claims_of(obj: Any) -> dict[str, Any]:
    """What a class (or its instance) says of itself: Pyro's known classes, then the
    attributes ``is_bound``, ``has_value``, ``closed_form_kl``, ``capture`` and
    ``summary`` a user's class may set."""
    kind = obj if isinstance(obj, type) else type(obj)
    claims: dict[str, Any] = {}
    for base in reversed(kind.__mro__):
        if base.__module__.startswith("pyro.") and base.__name__ in PYRO_CLAIMS:
            claims.update(PYRO_CLAIMS[base.__name__])
    for attribute in ("is_bound", "has_value", "closed_form_kl", "capture", "summary"):
        value = getattr(kind, attribute, None)
        if isinstance(value, (bool, str)) and not callable(value):
            claims[attribute] = value
    claims.setdefault("is_bound", False)  # a user's value is not taken for a bound unasked
    claims.setdefault("summary", (inspect.getdoc(kind) or kind.__name__).splitlines()[0])
    return claims


def looks_like_elbo(obj: Any) -> bool:
    return any(hasattr(obj, m) for m in ("differentiable_loss", "loss_and_grads"))


def from_callable(
    function: Callable[..., Any], name: str, path: str | None, claims: dict[str, Any]
) -> Estimator:
    """A spec that calls ``function`` (an ELBO class or a factory) with the keywords it
    accepts; its options are those of :func:`keyword_options`."""
    return Estimator(
        name=name,
        builder=KeywordBuilder(function),
        options=keyword_options(function),
        path=path,
        **claims,
    )


def from_instance(elbo: Any, path: str | None) -> Estimator:
    """A spec handing out one ELBO object. Its options are its class's, with the
    object's own values as defaults (``RenyiELBO(alpha=0.3)``: alpha 0.3), so that the
    import path of its class and
    :func:`~pyro_vae.objectives.registry.instance_options` rebuild it elsewhere."""
    name = path or type(elbo).__name__
    options = tuple(
        replace(o, default=o.type(getattr(elbo, o.name)))
        if isinstance(getattr(elbo, o.name, None), (bool, int, float, str))
        else o
        for o in keyword_options(type(elbo))
    )
    return Estimator(
        name=name,
        builder=lambda num_particles, **_: elbo,
        options=options,
        path=path,
        instance=elbo,
        **claims_of(elbo),
    )
