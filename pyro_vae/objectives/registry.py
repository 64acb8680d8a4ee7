"""The estimators: each a typed spec that says what it is, what it accepts and needs.

An :class:`Estimator` is what the configuration, the command line (``--help``, its
``--estimator-option``), :func:`~pyro_vae.app.compare.compare_estimators`, the analysis
tools and the docs read. The built-in ones are in :data:`ESTIMATORS`;
:func:`register_estimator` adds yours, and :func:`estimator_spec` turns anything a user
may pass for an estimator into one:

- a name in :data:`ESTIMATORS` (``"mc"``);
- an import path ``package.module:Name`` naming an :class:`Estimator`, a Pyro ELBO class
  (``pyro.infer:RenyiELBO``) or a factory ``(num_particles, **options) -> ELBO``: its
  keyword parameters with plain defaults become its options;
- an ELBO object (Python only: a run folder records its class's import path).

This module imports no torch (the configuration and ``pyro-vae --help`` read it); an
estimator's builder is imported when it is built.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from pyro_vae.errors import UserInputError
from pyro_vae.imports import import_object, import_path_of, is_import_path

if TYPE_CHECKING:
    import torch


class Objective(Protocol):
    """What every estimator :func:`make_elbo` builds offers: a Pyro ELBO (``Trace_ELBO``
    and its subclasses, or :class:`~pyro_vae.objectives.traces.ParticleELBO`) with the
    three loss methods, which Pyro's ``ELBO`` base class itself does not declare. (A
    Pyro ELBO without ``differentiable_loss`` gets one from
    :class:`~pyro_vae.objectives.adapters.LossAndGradsAdapter`.)"""

    num_particles: int

    def loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> float: ...

    def loss_and_grads(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> float: ...

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor: ...


#: the types an option may have (what a JSON config and a command-line string can hold)
OPTION_TYPES: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True)
class Option:
    """One setting of an estimator besides its number of particles.

    :param name: the keyword its builder takes (``alpha``).
    :param type: ``bool``, ``int``, ``float`` or ``str``.
    :param default: its value when not given.
    :param help: one line: what it does.
    :param minimum: the smallest value allowed (numbers).
    :param maximum: the largest value allowed (numbers).
    :param choices: the values allowed (strings).
    :param refused: ``(value, why)`` pairs: values the estimator refuses, with the reason
        (renyi's ``alpha = 1`` is the ELBO).
    """

    name: str
    type: type
    default: Any
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    refused: tuple[tuple[Any, str], ...] = ()

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise UserInputError(
                f"option {self.name!r} has type {self.type!r}: use one of "
                f"{', '.join(OPTION_TYPES.values())}"
            )

    def check(self, given: Any, owner: str) -> Any:
        """``given`` as this option's type, or one line naming what is wrong with it."""
        value: Any = given
        what = f"{owner}'s option {self.name}"
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _of_type(value, self.type):
            raise UserInputError(f"{what} must be a {OPTION_TYPES[self.type]}, got {value!r}")
        if self.type is float and not math.isfinite(value):
            raise UserInputError(f"{what} must be finite, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise UserInputError(f"{what} must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise UserInputError(f"{what} must be <= {self.maximum:g}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise UserInputError(f"{what} must be one of {', '.join(self.choices)}, got {value!r}")
        for bad, why in self.refused:
            if value == bad:
                raise UserInputError(f"{what} = {value!r}: {why}")
        return value

    def parse(self, text: str, owner: str) -> Any:
        """The value a command-line string ``text`` gives this option (checked)."""
        value: Any = text
        try:
            if self.type is bool:
                lowered = text.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value = lowered in ("true", "1", "yes")
            elif self.type is int:
                value = int(text)
            elif self.type is float:
                value = float(text)
        except ValueError:
            raise UserInputError(
                f"{owner}'s option {self.name} must be a {OPTION_TYPES[self.type]}, got {text!r}"
            ) from None
        return self.check(value, owner)

    def describe(self) -> str:
        """``name (type, default D): help``, for ``--help`` and the docs."""
        return f"{self.name} ({OPTION_TYPES[self.type]}, default {self.default!r}): {self.help}"


def _of_type(value: Any, kind: type) -> bool:
    """``isinstance(value, kind)``, a bool being no number (and no narrowing for mypy)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


#: how an estimator's loss may be captured as a graph (see
#: :func:`pyro_vae.objectives.capture.traceable_loss`)
CAPTURE_POLICIES = {
    "auto": "by its class: Pyro's Trace_ELBO family and this project's estimators, "
    "where the class overrides none of their loss methods",
    "differentiable_loss": "its differentiable_loss, which is static (checked against "
    "the eager loss when the graph is captured)",
    "never": "always eager (its loss keeps state between steps, or branches on values)",
}


@dataclass(frozen=True)
class Estimator:
    """One training objective: how to build it and what the tools may assume of it.

    :param name: the name :func:`make_elbo`, the configuration and the CLI use.
    :param summary: one line: what it is, with its paper.
    :param builder: a function ``(num_particles, *, max_plate_nesting, **options) ->
        ELBO``, or its import path ``"module:function"`` (imported when built).
    :param options: its settings besides the number of particles, typed, with defaults.
    :param closed_form_kl: uses the closed-form KL per latent site, which is the model's
        KL only where the model says so (``analytic_kl_is_exact``).
    :param is_bound: its value is a lower bound on log p(x): the reports flag a value
        that could not be one (above 0 on binary data, above the run's log p(x)).
    :param has_value: its ``loss`` is ``-objective`` (a number worth reporting). Where it
        is not (Pyro's ``TraceTailAdaptive_ELBO`` has only a surrogate), the training
        history records the Monte Carlo ELBO on the same batch instead, and says so.
    :param capture: one of :data:`CAPTURE_POLICIES`.
    :param value_of: the estimator whose value this one's equals for the same noise, at
        every number of particles (only the gradient differs): a claim the invariant
        tests check.
    :param one_particle: the estimator this one equals with one particle, value and
        gradient, for the same noise (the math says so); checked likewise.
    :param reference: the paper, for the docs.
    :param path: the import path it was loaded from (``None``: registered by name). What
        a run's ``config.json`` records is :attr:`key`.
    :param instance: an ELBO object this spec hands out as it is (Python only).
    """

    name: str
    summary: str
    builder: str | Callable[..., Any]
    options: tuple[Option, ...] = ()
    closed_form_kl: bool = False
    is_bound: bool = True
    has_value: bool = True
    capture: str = "auto"
    value_of: str | None = None
    one_particle: str | None = None
    reference: str = ""
    path: str | None = None
    instance: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UserInputError(
                f"an estimator's name must be a non-empty string, got {self.name!r}"
            )
        if self.capture not in CAPTURE_POLICIES:
            raise UserInputError(
                f"estimator {self.name}: capture must be one of {', '.join(CAPTURE_POLICIES)}, "
                f"got {self.capture!r}"
            )
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise UserInputError(f"estimator {self.name}: options {names} repeat a name")

    @property
    def key(self) -> str:
        """What a configuration records to rebuild it: its import path, else its name."""
        return self.path or self.name

    def option(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        known = ", ".join(o.name for o in self.options) or "none"
        raise UserInputError(
            f"estimator {self.name} has no option {name!r}: its options are {known}"
        )

    def resolve_options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option's value: ``given`` (checked, unknown names refused) over the
        defaults."""
        given = dict(given or {})
        values = {}
        for option in self.options:
            if option.name in given:
                values[option.name] = option.check(given.pop(option.name), self.name)
            else:
                values[option.name] = option.default
        if given:
            self.option(next(iter(given)))  # raises, naming it
        return values

    def parse_options(self, pairs: list[str]) -> dict[str, Any]:
        """``["alpha=0.3", ...]`` from the command line as checked values."""
        values: dict[str, Any] = {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            if not sep or not name:
                raise UserInputError(
                    f"estimator option {pair!r} is not NAME=VALUE: write e.g. alpha=0.3"
                )
            values[name.strip()] = self.option(name.strip()).parse(text, self.name)
        return values

    def build(
        self,
        num_particles: int = 1,
        *,
        max_plate_nesting: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Objective:
        """The ELBO with ``num_particles`` samples per data point and ``options``; an
        ELBO without ``differentiable_loss`` comes wrapped in
        :class:`~pyro_vae.objectives.adapters.LossAndGradsAdapter`."""
        from pyro_vae.objectives.adapters import as_objective

        if (
            not isinstance(num_particles, int)
            or isinstance(num_particles, bool)
            or num_particles < 1
        ):
            raise UserInputError(
                f"the number of particles must be an integer >= 1, got {num_particles}"
            )
        values = self.resolve_options(options)
        if self.instance is not None:
            have = getattr(self.instance, "num_particles", num_particles)
            if num_particles not in (1, have):
                raise UserInputError(
                    f"estimator {self.name} is an object with num_particles={have}: build it "
                    f"with {num_particles} particles yourself, or pass its class"
                )
            built: Objective = as_objective(self.instance, self.name)
            return built
        make = self.builder
        if isinstance(make, str):
            make = import_object(make, f"estimator {self.name}'s builder")
        try:
            elbo = make(num_particles, max_plate_nesting=max_plate_nesting, **values)
        except (AssertionError, TypeError, ValueError) as error:  # the builder's refusal
            if isinstance(error, UserInputError):
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise UserInputError(
                f"estimator {self.name} cannot be built with {num_particles} particle(s)"
                f"{' and options ' + str(values) if values else ''}: {reason}"
            ) from None
        objective: Objective = as_objective(elbo, self.name)
        return objective

    def describe(self) -> str:
        """One line for ``--help`` and the docs: summary and options."""
        options = "; ".join(o.describe() for o in self.options)
        return f"{self.summary}" + (f" [options: {options}]" if options else "")


_OBJ = "pyro_vae.objectives"

#: The estimators by name, in the order tables and help list them.
ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(
            "mc",
            "Trace_ELBO: the ELBO with a Monte Carlo KL",
            f"{_OBJ}.closed_form:trace_elbo",
            reference="Kingma & Welling (2014); Rezende et al. (2014)",
        ),
        Estimator(
            "analytic",
            "TraceMeanField_ELBO: the ELBO with the closed-form Gaussian KL",
            f"{_OBJ}.closed_form:closed_form_elbo",
            closed_form_kl=True,
            reference="Kingma & Welling (2014), appendix B",
        ),
        Estimator(
            "iwae",
            "importance-weighted bound L_K (Burda et al., 2016)",
            f"{_OBJ}.importance:iwae",
            one_particle="mc",
            reference="Burda, Grosse & Salakhutdinov (2016)",
        ),
        Estimator(
            "renyi",
            "Renyi bound of order alpha (Li & Turner, 2016)",
            f"{_OBJ}.importance:renyi",
            (
                Option(
                    "alpha",
                    float,
                    0.5,
                    "the order: 0 is L_K, 1 the ELBO; below 0 not a lower bound",
                    refused=((1.0, "alpha = 1 is the ELBO: use the 'mc' estimator"),),
                ),
            ),
            one_particle="mc",
            reference="Li & Turner (2016)",
        ),
        Estimator(
            "stl",
            "the ELBO with the path-derivative gradient (Roeder et al., 2017)",
            f"{_OBJ}.path:stl",
            value_of="mc",
            reference="Roeder, Wu & Duvenaud (2017)",
        ),
        Estimator(
            "dreg",
            "L_K with the doubly reparameterized gradient (Tucker et al., 2019)",
            f"{_OBJ}.importance:dreg",
            value_of="iwae",
            one_particle="stl",
            reference="Tucker, Lawson, Gu & Maddison (2019)",
        ),
        Estimator(
            "penalty",
            "sum_j mu_j^2 + (sigma_j - 1)^2 in place of the KL: not a bound",
            f"{_OBJ}.penalty:penalty",
            is_bound=False,
        ),
        Estimator(
            "score",
            "the ELBO with the score-function (REINFORCE) gradient, any guide",
            f"{_OBJ}.score:score",
            (
                Option(
                    "baseline",
                    str,
                    "none",
                    "none (plain REINFORCE) or leave-one-out (the other particles' mean)",
                    choices=("none", "leave-one-out"),
                ),
            ),
            capture="differentiable_loss",
            value_of="mc",
            reference="Williams (1992); Ranganath, Gerrish & Blei (2014)",
        ),
        Estimator(
            "tracegraph",
            "Pyro's TraceGraph_ELBO, every guide site scored, with a baseline",
            f"{_OBJ}.tracegraph:tracegraph",
            (
                Option(
                    "baseline",
                    str,
                    "decaying",
                    "decaying (Pyro's average), learned (a network b(x)) or none",
                    choices=("decaying", "learned", "none"),
                ),
                Option(
                    "baseline_beta",
                    float,
                    0.9,
                    "the decaying average's weight of the past",
                    minimum=0.0,
                    maximum=1.0,
                ),
                Option(
                    "baseline_lr",
                    float,
                    1e-3,
                    "the learned baseline's Adam learning rate",
                    minimum=0.0,
                ),
            ),
            capture="never",
            value_of="mc",
            reference="Schulman et al. (2015); Mnih & Gregor (2014)",
        ),
        Estimator(
            "vimco",
            "L_K with the leave-one-out score-function gradient (Mnih & Rezende, 2016)",
            f"{_OBJ}.vimco:vimco",
            capture="differentiable_loss",
            value_of="iwae",
            one_particle="score",
            reference="Mnih & Rezende (2016)",
        ),
        Estimator(
            "rws",
            "reweighted wake-sleep: wake-theta and wake-phi gradients, value L_K",
            f"{_OBJ}.rws:rws",
            capture="differentiable_loss",
            value_of="iwae",
            reference="Bornschein & Bengio (2015); Le et al. (2019)",
        ),
        Estimator(
            "miwae",
            "MIWAE(M, K): the mean of M bounds L_K (Rainforth et al., 2018)",
            f"{_OBJ}.miwae:miwae",
            (
                Option(
                    "outer",
                    int,
                    8,
                    "M, the bounds averaged (particles is K, each bound's draws: M*K in all)",
                    minimum=1,
                ),
            ),
            capture="differentiable_loss",
            reference="Rainforth et al. (2018)",
        ),
        Estimator(
            "ciwae",
            "CIWAE(beta): beta ELBO + (1 - beta) L_K of the same draws (Rainforth et al., 2018)",
            f"{_OBJ}.ciwae:ciwae",
            (
                Option(
                    "beta",
                    float,
                    0.5,
                    "the ELBO's weight: 1 is mc, 0 is iwae",
                    minimum=0.0,
                    maximum=1.0,
                ),
            ),
            capture="differentiable_loss",
            one_particle="mc",
            reference="Rainforth et al. (2018)",
        ),
        Estimator(
            "piwae",
            "PIWAE(M, K): L_MK's gradient for the model, MIWAE's for the guide; value L_MK",
            f"{_OBJ}.piwae:piwae",
            (
                Option(
                    "outer",
                    int,
                    8,
                    "M, the guide's bounds (particles is K: M*K draws in all)",
                    minimum=1,
                ),
            ),
            capture="differentiable_loss",
            reference="Rainforth et al. (2018)",
        ),
    )
}

#: the names the project ships (tests and docs tell them from users' registrations)
BUILT_IN = tuple(ESTIMATORS)

#: keyword parameters of a Pyro ELBO class that the trainer sets, never options
_SET_BY_THE_TRAINER = ("num_particles", "max_plate_nesting")
#: keyword parameters of Pyro's ELBO base class that change warnings, not the estimator
_PYRO_INTERNALS = (
    "strict_enumeration_warning",
    "ignore_jit_warnings",
    "jit_options",
    "retain_graph",
)


def register_estimator(
    estimator: Estimator | str,
    builder: str | Callable[..., Any] | None = None,
    *,
    replace_existing: bool = False,
    **fields: Any,
) -> Estimator:
    """Add an estimator to :data:`ESTIMATORS`, for every tool in this process.

    Either ``register_estimator(Estimator(...))`` or ``register_estimator("mine",
    builder, summary=..., options=(Option(...),), is_bound=...)``. A registered name
    lives in this process: for the command line, Ray workers and run folders, give the
    import path of the :class:`Estimator` object (``package.module:MINE``) instead, which
    any process can import. The invariant tests (``tests/test_invariants.py``) run over
    every name registered when they are collected.

    :raises UserInputError: the name is taken (pass ``replace_existing=True`` for one of
        yours; a built-in is never replaced) or the spec is malformed.
    """
    if isinstance(estimator, str):
        if builder is None:
            raise UserInputError(f"register_estimator({estimator!r}) needs a builder")
        spec = Estimator(
            name=estimator, summary=fields.pop("summary", estimator), builder=builder, **fields
        )
    elif isinstance(estimator, Estimator):
        if builder is not None or fields:
            changes: dict[str, Any] = dict(fields)
            if builder is not None:
                changes["builder"] = builder
            spec = replace(estimator, **changes)
        else:
            spec = estimator
    else:
        raise UserInputError(
            f"register_estimator takes an Estimator or a name and a builder, got "
            f"{type(estimator).__name__}"
        )
    if spec.name in BUILT_IN or (spec.name in ESTIMATORS and not replace_existing):
        what = "a built-in estimator" if spec.name in BUILT_IN else "registered already"
        raise UserInputError(
            f"estimator name {spec.name!r} is {what}: choose another name"
            + ("" if spec.name in BUILT_IN else " or pass replace_existing=True")
        )
    if is_import_path(spec.name):
        raise UserInputError(
            f"estimator name {spec.name!r} looks like an import path: choose a plain name"
        )
    ESTIMATORS[spec.name] = spec
    return spec


def _keyword_options(function: Callable[..., Any]) -> tuple[Option, ...]:
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


class _KeywordBuilder:
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
_PYRO_CLAIMS: dict[str, dict[str, Any]] = {
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


def _claims_of(obj: Any) -> dict[str, Any]:
    """What a class (or its instance) says of itself: Pyro's known classes, then the
    attributes ``is_bound``, ``has_value``, ``closed_form_kl``, ``capture`` and
    ``summary`` a user's class may set."""
    kind = obj if isinstance(obj, type) else type(obj)
    claims: dict[str, Any] = {}
    for base in reversed(kind.__mro__):
        if base.__module__.startswith("pyro.") and base.__name__ in _PYRO_CLAIMS:
            claims.update(_PYRO_CLAIMS[base.__name__])
    for attribute in ("is_bound", "has_value", "closed_form_kl", "capture", "summary"):
        value = getattr(kind, attribute, None)
        if isinstance(value, (bool, str)) and not callable(value):
            claims[attribute] = value
    claims.setdefault("is_bound", False)  # a user's value is not taken for a bound unasked
    claims.setdefault("summary", (inspect.getdoc(kind) or kind.__name__).splitlines()[0])
    return claims


def _looks_like_elbo(obj: Any) -> bool:
    return any(hasattr(obj, m) for m in ("differentiable_loss", "loss_and_grads"))


def estimator_spec(estimator: Any) -> Estimator:
    """The :class:`Estimator` for a name, an import path, an :class:`Estimator` or an ELBO
    object (see the module's docstring); one line naming the choices otherwise."""
    if isinstance(estimator, Estimator):
        return estimator
    if isinstance(estimator, str):
        if estimator in ESTIMATORS:
            return ESTIMATORS[estimator]
        if not is_import_path(estimator):
            raise UserInputError(
                f"unknown estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}, or "
                f"give the import path of your own, package.module:Name"
            )
        obj = import_object(estimator, "estimator")
        if isinstance(obj, Estimator):
            return replace(obj, path=estimator)
        if isinstance(obj, type) or (callable(obj) and not _looks_like_elbo(obj)):
            claims: dict[str, Any] = (
                _claims_of(obj) if isinstance(obj, type) else {"is_bound": False}
            )
            claims.setdefault("summary", estimator)
            return Estimator(
                name=estimator,
                builder=_KeywordBuilder(obj),
                options=_keyword_options(obj),
                path=estimator,
                **claims,
            )
        if _looks_like_elbo(obj):
            return _from_instance(obj, estimator)
        raise UserInputError(
            f"estimator {estimator!r} names a {type(obj).__name__}: name an Estimator, an "
            f"ELBO class or a factory that returns an ELBO"
        )
    if isinstance(estimator, type) and _looks_like_elbo(estimator):
        path = import_path_of(estimator)
        return Estimator(
            name=path or estimator.__name__,
            builder=_KeywordBuilder(estimator),
            options=_keyword_options(estimator),
            path=path,
            **_claims_of(estimator),
        )
    if _looks_like_elbo(estimator):
        return _from_instance(estimator, import_path_of(type(estimator)))
    raise UserInputError(
        f"unknown estimator {estimator!r}: pass a name ({', '.join(ESTIMATORS)}), an import "
        f"path package.module:Name, or an ELBO object"
    )


def _from_instance(elbo: Any, path: str | None) -> Estimator:
    """A spec handing out one ELBO object. Its options are its class's, with the
    object's own values as defaults (``RenyiELBO(alpha=0.3)``: alpha 0.3), so that the
    import path of its class and :func:`instance_options` rebuild it elsewhere."""
    name = path or type(elbo).__name__
    options = tuple(
        replace(o, default=o.type(getattr(elbo, o.name)))
        if isinstance(getattr(elbo, o.name, None), (bool, int, float, str))
        else o
        for o in _keyword_options(type(elbo))
    )
    return Estimator(
        name=name,
        builder=lambda num_particles, **_: elbo,
        options=options,
        path=path,
        instance=elbo,
        **_claims_of(elbo),
    )


def instance_options(spec: Estimator) -> dict[str, Any]:
    """The settings of the ELBO object a spec hands out, as options of its class."""
    return {o.name: o.default for o in spec.options} if spec.instance is not None else {}


def describe_estimator(spec: Estimator) -> str:
    """Lines that say what an estimator is, accepts and claims (``pyro-vae estimators``)."""
    claims = [
        "a lower bound on log p(x)" if spec.is_bound else "not a bound",
        "has a value" if spec.has_value else "no value (the Monte Carlo ELBO is recorded)",
    ]
    if spec.closed_form_kl:
        claims.append("closed-form KL (needs analytic_kl_is_exact for several latents)")
    lines = [f"{spec.key}: {spec.summary}"]
    if spec.reference:
        lines.append(f"  paper: {spec.reference}")
    lines.append(f"  claims: {'; '.join(claims)}")
    lines.append(f"  captured: {spec.capture}")
    for option in spec.options:
        lines.append(f"  option {option.describe()}")
    return "\n".join(lines)


def estimator_key(estimator: Any) -> str:
    """What a configuration records for ``estimator``: a name or an import path."""
    return estimator_spec(estimator).key


def make_elbo(
    estimator: Any,
    num_particles: int = 1,
    *,
    max_plate_nesting: int | None = None,
    options: Mapping[str, Any] | None = None,
    **option_values: Any,
) -> Objective:
    """Build an estimator with ``num_particles`` samples per data point.

    - ``"mc"``: :class:`pyro.infer.Trace_ELBO`, Monte Carlo KL, particles vectorized.
    - ``"analytic"``: closed-form KL, :class:`~pyro_vae.objectives.closed_form.ClosedFormKL_ELBO`
      (a :class:`pyro.infer.TraceMeanField_ELBO` that computes only what it uses).
    - ``"iwae"``: importance-weighted bound L_K (Burda et al., 2016), per data point.
    - ``"renyi"``: Renyi bound of order ``alpha`` (Li & Turner, 2016), per data point.
    - ``"stl"``: the ELBO with the path-derivative gradient (Roeder et al., 2017).
    - ``"dreg"``: the IWAE bound with the doubly reparameterized gradient (Tucker et al., 2019).
    - ``"penalty"``: the seed question's ``sum_j mu_j^2 + (sigma_j - 1)^2`` in place of
      the KL; not a bound (see :class:`~pyro_vae.objectives.penalty.PenaltyObjective`).
    - any other name registered with :func:`register_estimator`, an import path
      ``package.module:Name``, an :class:`Estimator` or an ELBO object (see
      :func:`estimator_spec`).

    :param estimator: what to build.
    :param num_particles: samples of z per data point (K).
    :param max_plate_nesting: plates of the model; the particle plate goes left of them.
        ``None`` finds it from one run of the model and guide when the first step with
        several particles needs it (as Pyro's ``Trace_ELBO`` does), in a forked random
        stream, so that it draws none of the steps' noise.
    :param options: the estimator's options (``{"alpha": 0.3}`` for renyi); they may
        also be given as keywords (``make_elbo("renyi", 5, alpha=0.3)``).
    """
    spec = estimator_spec(estimator)
    merged = {**(options or {}), **option_values}
    return spec.build(num_particles, max_plate_nesting=max_plate_nesting, options=merged)


def check_estimator_fits(estimator: Any, model: Any, x: Any = None) -> None:
    """Refuse an estimator that would be wrong for this model and guide, saying why.

    :param estimator: a name, import path, :class:`Estimator` or ELBO object.
    :param model: the model (see :mod:`pyro_vae.models.protocol`).
    :param x: data, to find the latent sites of a model that does not declare
        ``analytic_kl_is_exact``.
    """
    from pyro_vae.models.protocol import analytic_kl_is_exact

    spec = estimator_spec(estimator)
    if not spec.closed_form_kl or analytic_kl_is_exact(model, x):
        return
    reason = getattr(model, "analytic_kl_refusal", None) or (
        f"{type(model).__name__} has several latent sites, and the closed-form KL of a site "
        f"whose prior depends on another latent is not that site's KL"
    )
    raise UserInputError(
        f"the closed-form KL of TraceMeanField_ELBO is biased for this model: {reason}. "
        f"Use the 'mc' estimator"
    )
