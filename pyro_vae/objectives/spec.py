"""The spec of one estimator: how to build it and what the tools may assume of it.

An :class:`Estimator` is what the configuration, the command line (``--help``, its
``--estimator-option``), :func:`~pyro_vae.app.compare.compare_estimators`, the analysis
tools and the docs read; :class:`Objective` is what its :meth:`Estimator.build` returns.
The table of the built-in ones and the look-up of a name or import path are in
:mod:`pyro_vae.objectives.registry`.

This module imports no torch (the configuration and ``pyro-vae --help`` read it); an
estimator's builder is imported when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pyro_vae.errors import UserInputError
from pyro_vae.imports import import_object
from pyro_vae.objectives.options import Option

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
