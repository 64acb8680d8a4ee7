"""A corpus of small valid Pyro models, of the kinds in Pyro's own test suite, through
every estimator of the registry and the library's tools.

Each (model, estimator or tool) either gives a finite answer or refuses in one line
(:class:`~pyro_vae.errors.UserInputError`) saying what it needs: never a traceback. Where
an estimator runs, the shapes inside the user's program are those Pyro's own
``Trace_ELBO`` with the same number of particles gives them.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, config_enumerate
from torch import nn

import pyro_vae
from pyro_vae.errors import UserInputError
from pyro_vae.objectives.registry import ESTIMATORS, make_elbo

N, D, Z = 4, 6, 2


class _Base(nn.Module):
    """Linear encoder and decoder; ``shapes`` records what the programs saw."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(D, 2 * Z)
        self.decoder = nn.Linear(Z, D)
        self.shapes: list[tuple[int, ...]] = []

    def q(self, x):
        loc, raw = self.encoder(x).split(Z, -1)
        return loc, nn.functional.softplus(raw) + 1e-3


class Plain(_Base):
    """The protocol's model: one plate over the data at dim -1."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            self.shapes.append(tuple(z.shape))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(*self.q(x)).to_event(1))


class NestedPlates(_Base):
    """The data plate at dim -2, a plate over the pixels inside it at dim -1."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            self.shapes.append(tuple(z.shape))
            logits = self.decoder(z).squeeze(-2)  # (..., N, 1, Z) -> (..., N, D)
            with pyro.plate("pixels", D, dim=-1):
                pyro.sample("x", dist.Bernoulli(logits=logits), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0], dim=-2):
            loc, scale = self.q(x)
            pyro.sample("z", dist.Normal(loc.unsqueeze(-2), scale.unsqueeze(-2)).to_event(1))


class GlobalLatent(_Base):
    """A latent shared by all data points (outside the data plate)."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            self.shapes.append(tuple(z.shape))
            logits = self.decoder(z) + shift.unsqueeze(-1).unsqueeze(-1)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        pyro.sample("shift", dist.Normal(0.1, 0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(*self.q(x)).to_event(1))


class DiscreteLatent(_Base):
    """A non-reparameterizable latent (Bernoulli), enumerable by TraceEnum_ELBO."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.5)))
            self.shapes.append(tuple(c.shape))
            logits = self.decoder(torch.zeros(Z)) + 2 * c.unsqueeze(-1)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    @config_enumerate
    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            probs = torch.sigmoid(self.encoder(x)[..., 0])
            pyro.sample("c", dist.Bernoulli(probs))


class Masked(Plain):
    """An observed site with missing entries (a mask per pixel)."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[..., 0] = False
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            self.shapes.append(tuple(z.shape))
            likelihood = dist.Bernoulli(logits=self.decoder(z)).mask(mask).to_event(1)
            pyro.sample("x", likelihood, obs=x)


class Weighted(Plain):
    """Per-data-point weights: a tensor-valued poutine.scale inside the programs."""

    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])

    def model(self, x):
        with pyro.poutine.scale(scale=self.weights[: x.shape[0]]):
            super().model(x)

    def guide(self, x):
        with pyro.poutine.scale(scale=self.weights[: x.shape[0]]):
            super().guide(x)


CORPUS = [Plain, NestedPlates, GlobalLatent, DiscreteLatent, Masked, Weighted]


def _data() -> torch.Tensor:
    return torch.bernoulli(torch.full((N, D), 0.5), generator=torch.Generator().manual_seed(0))


def _one_line(error: UserInputError) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


# (Pyro's own ELBOs say of an enumerated site that it needs TraceEnum_ELBO: a warning that
# is right, and the score-function gradient they use instead is valid)
@pytest.mark.filterwarnings("ignore:c\nIf you want to enumerate sites:UserWarning")
@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("kind", CORPUS, ids=lambda kind: kind.__name__)
def test_every_estimator_answers_or_refuses_in_one_line(kind, name, num_particles):
    torch.manual_seed(0)
    model, x = kind(), _data()
    elbo = make_elbo(name, num_particles)
    try:
        with pyro.get_param_store().scope():
            loss = elbo.loss_and_grads(model.model, model.guide, x)
    except UserInputError as error:
        _one_line(error)
        return
    assert math.isfinite(loss)
    ours = list(model.shapes)
    # the shapes the user's program saw are those of Pyro's own Trace_ELBO with as many
    # draws per data point (K; M * K for miwae and piwae, whose K is num_particles)
    model.shapes.clear()
    draws = elbo.num_particles
    reference = Trace_ELBO(num_particles=draws, vectorize_particles=draws > 1)
    with pyro.get_param_store().scope():
        reference.loss(model.model, model.guide, x)
    assert ours[-1] == model.shapes[-1], (ours, model.shapes)


@pytest.mark.parametrize("kind", CORPUS, ids=lambda kind: kind.__name__)
def test_every_tool_answers_or_refuses_in_one_line(kind):
    torch.manual_seed(0)
    model, x = kind(), _data()
    tools = {
        "elbo_terms mc": lambda: pyro_vae.elbo_terms(model, x, kl="mc").elbo,
        "elbo_terms analytic": lambda: pyro_vae.elbo_terms(model, x, kl="analytic").elbo,
        "log_likelihood": lambda: pyro_vae.log_likelihood(model, x, num_samples=8),
        "evaluate_elbo": lambda: torch.tensor(pyro_vae.evaluate_elbo(model, x)["elbo"]),
    }
    for tool, call in tools.items():
        try:
            with pyro.get_param_store().scope():
                value = call()
        except UserInputError as error:
            _one_line(error)
            continue
        assert bool(torch.isfinite(torch.as_tensor(value)).all()), tool
