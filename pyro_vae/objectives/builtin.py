"""The estimators the project ships, each with its formula's paper and its claims.

:data:`BUILT_IN_ESTIMATORS` is the table :data:`~pyro_vae.objectives.registry.ESTIMATORS`
starts from, in the order tables and help list them. Each builder is named by its import
path, so that this module imports no torch.
"""

from __future__ import annotations

from pyro_vae.objectives.options import Option
from pyro_vae.objectives.spec import Estimator

_OBJ = "pyro_vae.objectives"

#: The built-in estimators, in the order tables and help list them.
BUILT_IN_ESTIMATORS: tuple[Estimator, ...] = (
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
