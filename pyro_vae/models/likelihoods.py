"""Decoder likelihoods p(x|z): Bernoulli (logits), continuous Bernoulli, Gaussian.

A likelihood turns the decoder's raw output into a distribution with one batch element
per data dimension; the Pyro model adds ``.to_event(1)``. It also knows its support, so
that data outside it is refused with a message instead of producing a NaN mid-training.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from pyro_vae.choices import LIKELIHOODS
from pyro_vae.errors import DataError
from pyro_vae.models.networks import positive_scale


class BernoulliImage(dist.TorchDistribution):
    """Independent Bernoulli(logits) over the last dimension: one data point per event.

    The same distribution as ``Bernoulli(logits=...).to_event(1)``, but its log-density
    sums the per-pixel terms before negating them, where torch's ``Bernoulli`` negates
    every pixel first: one pass over all K x batch x pixels less, forward and backward.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.unit_interval, 1)

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> BernoulliImage:
        new = self._get_checked_instance(BernoulliImage, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        super(BernoulliImage, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    @property
    def variance(self) -> torch.Tensor:
        probs = self.probs
        return probs * (1 - probs)

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            return torch.bernoulli(self.probs.expand(shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits, value = torch.broadcast_tensors(self.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class Likelihood(nn.Module):
    """Base class: ``forward(decoder_output) -> Distribution`` over each data dimension;
    :meth:`event_distribution` over a whole data point (what the model samples)."""

    name: str = ""
    #: Interval that the data must lie in (inclusive); ``None`` means the real line.
    support: tuple[float, float] | None = None

    def mean(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """Expected value of x given the decoder output (what plots show)."""
        return self(decoder_output).mean

    def event_distribution(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) over a whole data point: event shape ``(data_dim,)``."""
        return self(decoder_output).to_event(1)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise :class:`DataError` if ``x`` has non-finite values or lies outside the support."""
        if x.numel() == 0:
            raise DataError(f"{what} is empty: pass at least one data point")
        # one pass over the data: a NaN makes both extremes NaN, an infinity is one of them
        x_min, x_max = (float(v) for v in torch.aminmax(x.detach()))
        if not (math.isfinite(x_min) and math.isfinite(x_max)):
            raise DataError(f"{what} contains NaN or infinite values: clean the data first")
        if self.support is not None:
            low, high = self.support
            if x_min < low or x_max > high:
                raise DataError(
                    f"{what} has values in [{x_min:g}, {x_max:g}], outside [{low:g}, {high:g}] "
                    f"required by the {self.name} likelihood: rescale the data to [0, 1] "
                    f"or use `likelihood='gaussian'`"
                )


class BernoulliLikelihood(Likelihood):
    """Bernoulli with logits. For binary data; on grey levels in [0, 1] it is the usual
    cross-entropy, which is not a normalized density (use ``continuous_bernoulli`` there)."""

    name = "bernoulli"
    support = (0.0, 1.0)

    def forward(self, logits: torch.Tensor) -> dist.Bernoulli:
        # validate_args=False admits grey levels (as Pyro's own VAE example does);
        # the support check happens once, on the data, in check_data.
        return dist.Bernoulli(logits=logits, validate_args=False)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def event_distribution(self, logits: torch.Tensor) -> BernoulliImage:
        return BernoulliImage(logits, validate_args=False)


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019): a proper density on [0, 1]."""

    name = "continuous_bernoulli"
    support = (0.0, 1.0)

    def forward(self, logits: torch.Tensor) -> dist.ContinuousBernoulli:
        return dist.ContinuousBernoulli(logits=logits, validate_args=False)


class GaussianLikelihood(Likelihood):
    """Normal(decoder output, scale) per dimension, with a fixed scale or a learned one.

    A learned scale is one parameter per data dimension, ``softplus(raw) + floor``.
    """

    name = "gaussian"
    support = None
    # the buffer of a fixed scale (register_buffer), declared for type checkers
    fixed_scale: torch.Tensor

    def __init__(self, data_dim: int, scale: float | None = 1.0, init_scale: float = 1.0):
        super().__init__()
        self.learn_scale = scale is None
        if scale is None:
            # inverse softplus, so that the initial scale is init_scale
            raw = math.log(math.expm1(init_scale))
            self.raw_scale = nn.Parameter(torch.full((data_dim,), raw))
        else:
            if not scale > 0:
                raise ValueError(f"the Gaussian likelihood scale must be > 0, got {scale}")
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))

    @property
    def scale(self) -> torch.Tensor:
        return positive_scale(self.raw_scale) if self.learn_scale else self.fixed_scale

    def forward(self, loc: torch.Tensor) -> dist.Normal:
        return dist.Normal(loc, self.scale.expand(loc.shape[-1:]), validate_args=False)

    def mean(self, loc: torch.Tensor) -> torch.Tensor:
        return loc


def make_likelihood(name: str, data_dim: int, gaussian_scale: float | None = 1.0) -> Likelihood:
    """Build a likelihood by name. ``gaussian_scale=None`` learns the Gaussian scale."""
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "continuous_bernoulli":
        return ContinuousBernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(data_dim, gaussian_scale)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
