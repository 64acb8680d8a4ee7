"""Hierarchical VAE: L >= 2 stochastic layers, bottom-up or top-down (ladder) inference.

Model (sites ``"z1"`` .. ``"zL"``, ``z1`` next to the data)::

    z_L ~ N(prior_loc, prior_scale)
    z_l | z_{l+1} ~ N(mu_l(z_{l+1}), sigma_l(z_{l+1}))      l = L-1, ..., 1
    x | z_1 ~ likelihood(decoder(z_1))

Guides:

- ``"bottom-up"`` (Burda et al., 2016): ``q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1})``. The
  guide samples z_1 first, so z_1's model parent z_2 is its guide-descendant: the
  closed-form KL of ``TraceMeanField_ELBO`` is biased here and is refused.
- ``"top-down"`` (Sonderby et al., "Ladder Variational Autoencoders", 2016): a
  deterministic bottom-up pass gives Gaussian "messages" (mu^_l, sigma^_l) per layer;
  then, from the top, ``q(z_L|x) = N(mu^_L, sigma^_L)`` and
  ``q(z_l | z_{l+1}, x)`` is the precision-weighted product of N(mu^_l, sigma^_l) and
  the model's own conditional ``p(z_l | z_{l+1})``. Guide and model visit the layers
  in the same order, so the closed-form KL is exact. The guide shares the model's
  conditional networks, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.choices import GUIDES
from pyro_vae.errors import DataError, UserInputError
from pyro_vae.models.likelihoods import Likelihood
from pyro_vae.models.networks import GaussianMLP, MLPDecoder, mlp, positive_scale
from pyro_vae.models.vae import OBSERVED_SITE, VAE, data_plate, register_module


def latent_site(layer: int) -> str:
    """Sample-site name of layer ``layer`` (1 = next to the data)."""
    return f"z{layer}"


class LadderEncoder(nn.Module):
    """Deterministic bottom-up pass: per layer, features and a Gaussian message (mu^, sigma^)."""

    def __init__(self, data_dim: int, latent_dims: Sequence[int], hiddens, activation: str):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        width = data_dim
        for dim, hidden in zip(latent_dims, hiddens):
            self.blocks.append(mlp([width, *hidden], activation, final_activation=True))
            features = hidden[-1] if hidden else width
            self.heads.append(nn.Linear(features, 2 * dim))
            width = features

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        messages = []
        features = x
        for block, head in zip(self.blocks, self.heads):
            features = block(features)
            loc, raw = head(features).chunk(2, -1)
            messages.append((loc, positive_scale(raw)))
        return messages


def precision_weighted(
    loc_a: torch.Tensor, scale_a: torch.Tensor, loc_b: torch.Tensor, scale_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised product of N(loc_a, scale_a^2) and N(loc_b, scale_b^2)."""
    precision_a, precision_b = scale_a.pow(-2), scale_b.pow(-2)
    variance = 1.0 / (precision_a + precision_b)
    return (loc_a * precision_a + loc_b * precision_b) * variance, variance.sqrt()


class HierarchicalVAE(VAE):
    """A VAE with ``len(latent_dims) >= 2`` stochastic layers (``latent_dims[0]`` is z1).

    :param data_shape: shape of one data point.
    :param latent_dims: sizes of z1 (next to x) ... zL (top).
    :param hiddens: hidden widths for each layer's networks: ``hiddens[0]`` between x and
        z1, ``hiddens[l]`` between z_l and z_{l+1}.
    :param guide: ``"top-down"`` or ``"bottom-up"``.

    **References**

    [1] Burda, Y., Grosse, R. and Salakhutdinov, R. (2016). Importance Weighted
        Autoencoders. ICLR (the two-layer model and the bottom-up guide).
    [2] Sonderby, C. K. et al. (2016). Ladder Variational Autoencoders. NeurIPS (the
        top-down guide, KL warm-up).
    """

    #: one q(z_l | z_{l-1}) network per layer (bottom-up), or the ladder (top-down)
    encoder: nn.ModuleList | LadderEncoder

    def __init__(
        self,
        data_shape: Sequence[int],
        latent_dims: Sequence[int],
        hiddens: Sequence[Sequence[int]],
        likelihood: Likelihood,
        activation: str = "tanh",
        guide: str = "top-down",
        prior_loc: float = 0.0,
        prior_scale: float = 1.0,
    ) -> None:
        if len(latent_dims) < 2:
            raise UserInputError("a hierarchical VAE needs at least two latent layers")
        if guide not in GUIDES:
            raise UserInputError(f"unknown guide {guide!r}: choose one of {', '.join(GUIDES)}")
        if len(hiddens) != len(latent_dims):
            raise ValueError("give one tuple of hidden widths per latent layer")
        data_dim = math.prod(data_shape)
        dims = [int(d) for d in latent_dims]
        decoder = MLPDecoder(dims[0], data_dim, tuple(reversed(hiddens[0])), activation)
        # p(z_i | z_{i+1}) for layers i = 1 .. L-1, at index i - 1
        conditionals = nn.ModuleList(
            GaussianMLP(dims[i + 1], dims[i], tuple(reversed(hiddens[i + 1])), activation)
            for i in range(len(dims) - 1)
        )
        encoder: nn.ModuleList | LadderEncoder
        if guide == "bottom-up":
            widths = [data_dim, *dims[:-1]]
            encoder = nn.ModuleList(
                GaussianMLP(widths[i], dims[i], hiddens[i], activation) for i in range(len(dims))
            )
        else:
            encoder = LadderEncoder(data_dim, dims, hiddens, activation)
        super().__init__(encoder, decoder, likelihood, dims[-1], data_shape, prior_loc, prior_scale)
        self.conditionals = conditionals
        self.latent_dims = tuple(dims)
        self.guide_order = guide

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return tuple(latent_site(i + 1) for i in range(len(self.latent_dims)))

    @property
    def analytic_kl_is_exact(self) -> bool:
        """TraceMeanField_ELBO is exact for the top-down guide only (see module docs)."""
        return self.guide_order == "top-down"

    #: why the closed-form KL is refused for the bottom-up guide
    analytic_kl_refusal = (
        "with the bottom-up guide, z1's model parent z2 is sampled after z1 in "
        "q(z1|x) q(z2|z1), so KL(q(z1|x) || p(z1|z2)) is taken at a z2 that depends on z1; "
        "the top-down guide makes it exact"
    )

    # ----------------------------------------------------------------- Pyro program
    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        x = self.program_input(x)
        register_module(self, "decoder", self.decoder)
        register_module(self, "conditionals", self.conditionals)
        if self.likelihood_has_parameters:
            register_module(self, "likelihood", self.likelihood)
        top = len(self.latent_dims)
        with data_plate(x, num_data):
            z = pyro.sample(latent_site(top), self.prior())
            for layer in range(top - 1, 0, -1):
                loc, scale = self.conditionals[layer - 1](z)
                z = pyro.sample(latent_site(layer), dist.Normal(loc, scale).to_event(1))
            pyro.sample(OBSERVED_SITE, self.likelihood.event_distribution(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        x = self.program_input(x)
        register_module(self, "encoder", self.encoder)
        top = len(self.latent_dims)
        with data_plate(x, num_data):
            if isinstance(self.encoder, nn.ModuleList):  # the bottom-up guide
                inputs = x
                for layer in range(1, top + 1):
                    loc, scale = self.encoder[layer - 1](inputs)
                    inputs = pyro.sample(latent_site(layer), dist.Normal(loc, scale).to_event(1))
                return
            register_module(self, "conditionals", self.conditionals)  # shared with the model
            messages: list[tuple[torch.Tensor, torch.Tensor]] = self.encoder(x)
            loc, scale = messages[-1]
            z = pyro.sample(latent_site(top), dist.Normal(loc, scale).to_event(1))
            for layer in range(top - 1, 0, -1):
                prior_loc, prior_scale = self.conditionals[layer - 1](z)
                loc, scale = precision_weighted(*messages[layer - 1], prior_loc, prior_scale)
                z = pyro.sample(latent_site(layer), dist.Normal(loc, scale).to_event(1))

    # ----------------------------------------------------------------- helpers
    def _guide_means(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loc, scale) of q per layer, passing each layer's mean on (not a sample)."""
        x = self.flatten(x)
        top = len(self.latent_dims)
        if isinstance(self.encoder, nn.ModuleList):  # the bottom-up guide
            out, inputs = [], x
            for layer in range(top):
                loc, scale = self.encoder[layer](inputs)
                out.append((loc, scale))
                inputs = loc
            return out
        messages: list[tuple[torch.Tensor, torch.Tensor]] = self.encoder(x)
        out = [messages[-1]]
        z = messages[-1][0]
        for layer in range(top - 1, 0, -1):
            prior_loc, prior_scale = self.conditionals[layer - 1](z)
            loc, scale = precision_weighted(*messages[layer - 1], prior_loc, prior_scale)
            out.insert(0, (loc, scale))
            z = loc
        return out

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q at the top layer z_L (lower layers at their means)."""
        return self._guide_means(x)[-1]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample_latent: bool = False) -> torch.Tensor:
        """Mean of p(x | z_1) at z_1 = E_q[z_1] (lower layers' means passed up)."""
        loc, scale = self._guide_means(x)[0]
        z = loc + scale * torch.randn_like(scale) if sample_latent else loc
        return self.likelihood.mean(self.decoder(z)).reshape(x.shape)

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """Ancestral samples: z_L from the prior, each layer from its conditional, then x."""
        z = self.prior().sample((num_samples,))
        for layer in range(len(self.latent_dims) - 1, 0, -1):
            loc, scale = self.conditionals[layer - 1](z)
            z = loc + scale * torch.randn_like(scale)
        decoded = self.decoder(z)
        x = self.likelihood.mean(decoded) if mean else self.likelihood(decoded).sample()
        return x.reshape(num_samples, *self.data_shape)


def default_hiddens(latent_dims: Sequence[int], hidden: Sequence[int]) -> list[tuple[int, ...]]:
    """The IWAE paper's widths: ``hidden`` between x and z1; above, two layers as wide as
    the layer below (784-200-200-100 and 100-100-100-50 for latent dims 100, 50)."""
    return [tuple(hidden)] + [(int(d), int(d)) for d in latent_dims[:-1]]


def build_hierarchical(
    config, data_shape: Sequence[int], likelihood: Likelihood
) -> HierarchicalVAE:
    """A :class:`HierarchicalVAE` from a :class:`~pyro_vae.config.ModelConfig` with several
    ``latent_dims`` (MLP networks only)."""
    if config.network != "mlp":
        raise DataError("the hierarchical VAE uses MLPs: use `network='mlp'`")
    return HierarchicalVAE(
        data_shape,
        config.latent_dims,
        default_hiddens(config.latent_dims, config.hidden),
        likelihood,
        config.activation,
        config.guide,
        config.prior_loc,
        config.prior_scale,
    )
