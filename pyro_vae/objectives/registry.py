"""The estimators by name: what each is, what it accepts, what it needs of a model.

This module imports no torch (the configuration and ``pyro-vae --help`` read it); each
entry names the function that builds its ELBO, imported when :func:`make_elbo` is called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pyro_vae.errors import UserInputError

if TYPE_CHECKING:
    import torch


class Objective(Protocol):
    """What every estimator :func:`make_elbo` builds offers: a Pyro ELBO (``Trace_ELBO``
    and its subclasses, or :class:`~pyro_vae.objectives.traces.ParticleELBO`) with the
    three loss methods, which Pyro's ``ELBO`` base class itself does not declare."""

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


@dataclass(frozen=True)
class Estimator:
    """One training objective, as the registry knows it.

    :param name: the name :func:`make_elbo`, the configuration and the CLI use.
    :param summary: one line: what it is, with its paper.
    :param builder: ``"module:function"``, a function ``(num_particles, alpha,
        max_plate_nesting) -> ELBO``.
    :param options: the settings it reads besides the number of particles.
    :param closed_form_kl: uses the closed-form KL per latent site, which is the model's
        KL only where the model says so (``analytic_kl_is_exact``).
    :param is_bound: its value is a lower bound on log p(x).
    :param value_of: the estimator whose value this one's equals for the same noise, at
        every number of particles (only the gradient differs): a claim the invariant
        tests check.
    :param one_particle: the estimator this one equals with one particle, value and
        gradient, for the same noise (the math says so); checked likewise.
    """

    name: str
    summary: str
    builder: str
    options: tuple[str, ...] = ()
    closed_form_kl: bool = False
    is_bound: bool = True
    value_of: str | None = None
    one_particle: str | None = None

    def build(self, num_particles: int, alpha: float, max_plate_nesting: int | None) -> Objective:
        module, _, function = self.builder.partition(":")
        make: Callable[[int, float, int | None], Objective] = getattr(
            importlib.import_module(module), function
        )
        return make(num_particles, alpha, max_plate_nesting)


_OBJ = "pyro_vae.objectives"

#: The estimators by name, in the order tables and help list them.
ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(
            "mc", "Trace_ELBO: the ELBO with a Monte Carlo KL", f"{_OBJ}.closed_form:trace_elbo"
        ),
        Estimator(
            "analytic",
            "TraceMeanField_ELBO: the ELBO with the closed-form Gaussian KL",
            f"{_OBJ}.closed_form:closed_form_elbo",
            closed_form_kl=True,
        ),
        Estimator(
            "iwae",
            "importance-weighted bound L_K (Burda et al., 2016)",
            f"{_OBJ}.importance:iwae",
            one_particle="mc",
        ),
        Estimator(
            "renyi",
            "Renyi bound of order alpha (Li & Turner, 2016)",
            f"{_OBJ}.importance:renyi",
            ("alpha",),
            one_particle="mc",
        ),
        Estimator(
            "stl",
            "the ELBO with the path-derivative gradient (Roeder et al., 2017)",
            f"{_OBJ}.path:stl",
            value_of="mc",
        ),
        Estimator(
            "dreg",
            "L_K with the doubly reparameterized gradient (Tucker et al., 2019)",
            f"{_OBJ}.importance:dreg",
            value_of="iwae",
            one_particle="stl",
        ),
        Estimator(
            "penalty",
            "sum_j mu_j^2 + (sigma_j - 1)^2 in place of the KL: not a bound",
            f"{_OBJ}.penalty:penalty",
            is_bound=False,
        ),
    )
}


def make_elbo(
    name: str,
    num_particles: int = 1,
    *,
    alpha: float = 0.5,
    max_plate_nesting: int | None = None,
) -> Objective:
    """Build the estimator ``name`` with ``num_particles`` samples per data point.

    - ``"mc"``: :class:`pyro.infer.Trace_ELBO`, Monte Carlo KL, particles vectorized.
    - ``"analytic"``: closed-form KL, :class:`~pyro_vae.objectives.closed_form.ClosedFormKL_ELBO`
      (a :class:`pyro.infer.TraceMeanField_ELBO` that computes only what it uses).
    - ``"iwae"``: importance-weighted bound L_K (Burda et al., 2016), per data point.
    - ``"renyi"``: Renyi bound of order ``alpha`` (Li & Turner, 2016), per data point.
    - ``"stl"``: the ELBO with the path-derivative gradient (Roeder et al., 2017).
    - ``"dreg"``: the IWAE bound with the doubly reparameterized gradient (Tucker et al., 2019).
    - ``"penalty"``: the seed question's ``sum_j mu_j^2 + (sigma_j - 1)^2`` in place of
      the KL; not a bound (see :class:`~pyro_vae.objectives.penalty.PenaltyObjective`).

    :param name: a key of :data:`ESTIMATORS`.
    :param num_particles: samples of z per data point (K).
    :param alpha: the order of the Renyi bound (``"renyi"`` only).
    :param max_plate_nesting: plates of the model; the particle plate goes left of them.
        ``None`` finds it from one run of the model and guide when the first step with
        several particles needs it (as Pyro's ``Trace_ELBO`` does), in a forked random
        stream, so that it draws none of the steps' noise.
    """
    if not isinstance(num_particles, int) or num_particles < 1:
        raise UserInputError(
            f"the number of particles must be an integer >= 1, got {num_particles}"
        )
    if name not in ESTIMATORS:
        raise UserInputError(f"unknown estimator {name!r}: choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name].build(num_particles, alpha, max_plate_nesting)


def check_estimator_fits(name: str, model: Any, x: Any = None) -> None:
    """Refuse an estimator that would be wrong for this model and guide, saying why.

    :param name: a key of :data:`ESTIMATORS`.
    :param model: the model (see :mod:`pyro_vae.models.protocol`).
    :param x: data, to find the latent sites of a model that does not declare
        ``analytic_kl_is_exact``.
    """
    from pyro_vae.models.protocol import analytic_kl_is_exact

    spec = ESTIMATORS.get(name)
    if spec is None or not spec.closed_form_kl or analytic_kl_is_exact(model, x):
        return
    reason = getattr(model, "analytic_kl_refusal", None) or (
        f"{type(model).__name__} has several latent sites, and the closed-form KL of a site "
        f"whose prior depends on another latent is not that site's KL"
    )
    raise UserInputError(
        f"the closed-form KL of TraceMeanField_ELBO is biased for this model: {reason}. "
        f"Use the 'mc' estimator"
    )
