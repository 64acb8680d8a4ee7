"""The estimators by name, and :func:`estimator_spec`, which turns what a user passes into one.

The built-in estimators (:mod:`pyro_vae.objectives.builtin`) are in :data:`ESTIMATORS`;
:func:`register_estimator` adds yours, and :func:`estimator_spec` turns anything a user
may pass for an estimator into an :class:`~pyro_vae.objectives.spec.Estimator`:

- a name in :data:`ESTIMATORS` (``"mc"``);
- an import path ``package.module:Name`` naming an :class:`~pyro_vae.objectives.spec.Estimator`,
  a Pyro ELBO class (``pyro.infer:RenyiELBO``) or a factory ``(num_particles, **options)
  -> ELBO``: its keyword parameters with plain defaults become its options
  (:mod:`pyro_vae.objectives.elbo_specs`);
- an ELBO object (Python only: a run folder records its class's import path).

:func:`make_elbo` builds one. ``Estimator``, ``Option`` and ``Objective`` are importable
from here too (defined in :mod:`pyro_vae.objectives.spec` and
:mod:`pyro_vae.objectives.options`). This module imports no torch (the configuration and
``pyro-vae --help`` read it); an estimator's builder is imported when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from pyro_vae.errors import UserInputError
from pyro_vae.imports import import_object, import_path_of, is_import_path
from pyro_vae.objectives.builtin import BUILT_IN_ESTIMATORS
from pyro_vae.objectives.elbo_specs import claims_of, from_callable, from_instance, looks_like_elbo
from pyro_vae.objectives.options import OPTION_TYPES as OPTION_TYPES
from pyro_vae.objectives.options import Option as Option
from pyro_vae.objectives.spec import CAPTURE_POLICIES as CAPTURE_POLICIES
from pyro_vae.objectives.spec import Estimator as Estimator
from pyro_vae.objectives.spec import Objective as Objective

#: The estimators by name, in the order tables and help list them.
ESTIMATORS: dict[str, Estimator] = {e.name: e for e in BUILT_IN_ESTIMATORS}

#: the names the project ships (tests and docs tell them from users' registrations)
BUILT_IN = tuple(ESTIMATORS)


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


def estimator_spec(estimator: Any) -> Estimator:
    """The :class:`~pyro_vae.objectives.spec.Estimator` for a name, an import path, an
    ``Estimator`` or an ELBO object (see the module's docstring); one line naming the
    choices otherwise."""
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
        if isinstance(obj, type) or (callable(obj) and not looks_like_elbo(obj)):
            claims: dict[str, Any] = (
                claims_of(obj) if isinstance(obj, type) else {"is_bound": False}
            )
            claims.setdefault("summary", estimator)
            return from_callable(obj, estimator, estimator, claims)
        if looks_like_elbo(obj):
            return from_instance(obj, estimator)
        raise UserInputError(
            f"estimator {estimator!r} names a {type(obj).__name__}: name an Estimator, an "
            f"ELBO class or a factory that returns an ELBO"
        )
    if isinstance(estimator, type) and looks_like_elbo(estimator):
        path = import_path_of(estimator)
        return from_callable(estimator, path or estimator.__name__, path, claims_of(estimator))
    if looks_like_elbo(estimator):
        return from_instance(estimator, import_path_of(type(estimator)))
    raise UserInputError(
        f"unknown estimator {estimator!r}: pass a name ({', '.join(ESTIMATORS)}), an import "
        f"path package.module:Name, or an ELBO object"
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
