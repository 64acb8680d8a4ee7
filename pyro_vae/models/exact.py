"""Linear-Gaussian VAEs, where every quantity the estimators approximate is known exactly.

One layer: ``z ~ N(0, I_d)``, ``x | z ~ N(W z + b, s^2 I_D)``. Then

- ``p(x) = N(b, W W^T + s^2 I)``,
- ``p(z | x) = N(M^-1 W^T (x - b), s^2 M^-1)`` with ``M = W^T W + s^2 I``,
- for any Gaussian ``q``, ``ELBO = log p(x) - KL(q || p(z|x))``.

Two layers (``z2 -> z1 -> x``, all linear-Gaussian) stay jointly Gaussian, so the same
holds with ``(z1, z2)`` in place of ``z``. Both are real Pyro programs with amortized
(linear) Gaussian guides, run by the same estimators as any VAE; these classes add the
exact ``log p(x)``, posterior, ELBO and KL gap, differentiable in every parameter, so
that estimators' values *and* gradients can be tested against the truth.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import MultivariateNormal
from torch.distributions import kl_divergence as torch_kl

from pyro_vae.models.kl import gaussian_kl
from pyro_vae.models.likelihoods import GaussianLikelihood
from pyro_vae.models.networks import positive_scale
from pyro_vae.models.vae import OBSERVED_SITE, VAE, data_plate, register_module

_F64 = torch.float64


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class LinearGaussianEncoder(nn.Module):
    """q(z|x) = N(A x + c, diag(sigma^2)): location linear in x, scale a free parameter."""

    def __init__(self, data_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.loc = nn.Linear(data_dim, latent_dim)
        self.raw_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.loc(x)
        return loc, positive_scale(self.raw_scale).expand_as(loc)


class LinearGaussianVAE(VAE):
    """The one-layer linear-Gaussian VAE: a :class:`~pyro_vae.VAE` with linear networks.

    ``decoder.weight`` is W (D x d), ``decoder.bias`` is b, ``noise_scale`` is s.
    """

    # the networks the constructor passes to VAE, declared for type checkers
    encoder: LinearGaussianEncoder
    decoder: nn.Linear

    def __init__(self, data_dim: int, latent_dim: int, noise_scale: float = 1.0) -> None:
        super().__init__(
            encoder=LinearGaussianEncoder(data_dim, latent_dim),
            decoder=nn.Linear(latent_dim, data_dim),
            likelihood=GaussianLikelihood(data_dim, scale=noise_scale),
            latent_dim=latent_dim,
            data_shape=(data_dim,),
        )
        self.noise_scale = float(noise_scale)

    @classmethod
    def random(
        cls,
        data_dim: int,
        latent_dim: int,
        noise_scale: float = 1.0,
        seed: int = 0,
        orthogonal: bool = False,
    ) -> LinearGaussianVAE:
        """Random parameters. ``orthogonal=True`` gives W orthogonal columns, so the exact
        posterior has a diagonal covariance and lies inside the guide's family."""
        generator = torch.Generator().manual_seed(seed)
        vae = cls(data_dim, latent_dim, noise_scale)
        with torch.no_grad():
            weight = torch.randn(data_dim, latent_dim, generator=generator)
            if orthogonal:
                q, _ = torch.linalg.qr(weight)
                lengths = 0.5 + 1.5 * torch.rand(latent_dim, generator=generator)
                weight = q * lengths
            vae.decoder.weight.copy_(weight)
            vae.decoder.bias.copy_(0.5 * torch.randn(data_dim, generator=generator))
            vae.encoder.loc.weight.copy_(
                0.3 * torch.randn(latent_dim, data_dim, generator=generator)
            )
            vae.encoder.loc.bias.copy_(0.1 * torch.randn(latent_dim, generator=generator))
            vae.encoder.raw_scale.copy_(0.5 * torch.randn(latent_dim, generator=generator))
        return vae

    # ------------------------------------------------------------------ exact answers
    def _w_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.weight.to(_F64), self.decoder.bias.to(_F64)

    def marginal(self) -> MultivariateNormal:
        """p(x) = N(b, W W^T + s^2 I)."""
        w, b = self._w_b()
        cov = w @ w.T + self.noise_scale**2 * torch.eye(self.data_dim, dtype=_F64, device=w.device)
        return MultivariateNormal(b, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per data point, float64."""
        return self.marginal().log_prob(self.flatten(x).to(_F64))

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """p(z | x) = N(M^-1 W^T (x - b), s^2 M^-1), M = W^T W + s^2 I (batched over x)."""
        w, b = self._w_b()
        s2 = self.noise_scale**2
        m = w.T @ w + s2 * torch.eye(self.latent_dim, dtype=_F64, device=w.device)
        m_inv = torch.linalg.inv(m)
        mean = (self.flatten(x).to(_F64) - b) @ (m_inv @ w.T).T
        return MultivariateNormal(mean, covariance_matrix=s2 * m_inv)

    def guide_distribution(self, x: torch.Tensor) -> MultivariateNormal:
        """The guide's q(z | x) as a (diagonal) multivariate normal, float64."""
        loc, scale = self.encode(x)
        return MultivariateNormal(loc.to(_F64), scale_tril=torch.diag_embed(scale.to(_F64)))

    def exact_elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Closed-form ``expected_log_likelihood``, ``kl`` and ``elbo`` of the current guide.

        E_q[log N(x; W z + b, s^2 I)] = -D/2 log(2 pi s^2)
            - (||x - W m - b||^2 + sum_ij W_ij^2 v_j) / (2 s^2)    for q = N(m, diag(v)).
        """
        x = self.flatten(x)
        loc, scale = (t.to(_F64) for t in self.encode(x))
        x = x.to(_F64)
        w, b = self._w_b()
        s2 = self.noise_scale**2
        residual = x - loc @ w.T - b
        spread = (scale**2) @ (w**2).T
        expected_ll = -0.5 * self.data_dim * math.log(2 * math.pi * s2) - (
            residual.pow(2) + spread
        ).sum(-1) / (2 * s2)
        kl = gaussian_kl(loc, scale, self.prior_loc.to(_F64), self.prior_scale.to(_F64))
        return {"elbo": expected_ll - kl, "expected_log_likelihood": expected_ll, "kl": kl}

    def exact_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ELBO per data point (float64), differentiable in every parameter."""
        return self.exact_elbo_terms(x)["elbo"]

    def kl_gap(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) - ELBO = KL(q(z|x) || p(z|x)) per data point, float64."""
        return torch_kl(self.guide_distribution(x), self.posterior(x))

    def exact_iwae_bound_limit(self, x: torch.Tensor) -> torch.Tensor:
        """The limit of L_K as K grows: log p(x)."""
        return self.log_marginal(x)

    def mean_field_gap(self) -> float:
        """The approximation gap of the best diagonal Gaussian, ``min_q KL(q || p(z|x))``.

        For a Gaussian posterior N(mu, Sigma) the minimiser of KL(q || p) over diagonal
        Gaussians has mean mu and variances 1 / diag(Sigma^-1) (Bishop, PRML, 10.1.2),
        so the gap is ``1/2 (log det Sigma - sum_i log (1 / (Sigma^-1)_ii))``: the same for
        every x. Nats per data point.
        """
        w, _ = self._w_b()
        s2 = self.noise_scale**2
        m = w.T @ w + s2 * torch.eye(self.latent_dim, dtype=_F64, device=w.device)
        covariance = s2 * torch.linalg.inv(m)
        optimal_variances = s2 / torch.diagonal(m)  # 1 / diag(Sigma^-1), Sigma^-1 = M / s^2
        return float(0.5 * (torch.logdet(covariance) - optimal_variances.log().sum()).detach())

    @torch.no_grad()
    def set_guide_to_posterior(self) -> None:
        """Make q(z|x) the exact posterior. Needs a diagonal posterior covariance
        (W with orthogonal columns, see :meth:`random`)."""
        w, b = self._w_b()
        s2 = self.noise_scale**2
        m_inv = torch.linalg.inv(
            w.T @ w + s2 * torch.eye(self.latent_dim, dtype=_F64, device=w.device)
        )
        cov = s2 * m_inv
        off_diagonal = cov - torch.diag(torch.diagonal(cov))
        if off_diagonal.abs().max() > 1e-6 * cov.abs().max():
            raise ValueError(
                "the exact posterior is not diagonal, so no diagonal guide equals it: "
                "build the model with LinearGaussianVAE.random(..., orthogonal=True)"
            )
        gain = m_inv @ w.T
        self.encoder.loc.weight.copy_(gain)
        self.encoder.loc.bias.copy_(-(gain @ b))
        self.encoder.raw_scale.copy_(_inverse_softplus(torch.diagonal(cov).sqrt() - 1e-4))


# ---------------------------------------------------------------------- two layers
class _TwoLayerGenerative(nn.Module):
    """The model's networks: ``decoder1`` (W1 z1 + b1) and ``decoder2`` (W2 z2 + b2)."""

    def __init__(self, data_dim: int, d1: int, d2: int) -> None:
        super().__init__()
        self.decoder1 = nn.Linear(d1, data_dim)  # W1 b1
        self.decoder2 = nn.Linear(d2, d1)  # W2 b2


class _TopDownInference(nn.Module):
    """q(z2|x) = N(A2 x + c2, v2), q(z1|z2,x) = N(A1 x + C z2 + c1, v1)."""

    def __init__(self, data_dim: int, d1: int, d2: int) -> None:
        super().__init__()
        self.q2 = nn.Linear(data_dim, d2)  # A2 x + c2
        self.q1 = nn.Linear(data_dim, d1)  # A1 x + c1
        self.q1_from_z2 = nn.Linear(d2, d1, bias=False)  # C
        self.raw_scale1 = nn.Parameter(torch.zeros(d1))
        self.raw_scale2 = nn.Parameter(torch.zeros(d2))


class _BottomUpInference(nn.Module):
    """q(z1|x) = N(A1 x + c1, v1), q(z2|z1) = N(C z1 + c2, v2)."""

    def __init__(self, data_dim: int, d1: int, d2: int) -> None:
        super().__init__()
        self.q1 = nn.Linear(data_dim, d1)  # A1 x + c1
        self.q2_from_z1 = nn.Linear(d1, d2)  # C z1 + c2
        self.raw_scale1 = nn.Parameter(torch.zeros(d1))
        self.raw_scale2 = nn.Parameter(torch.zeros(d2))


class TwoLayerLinearGaussianVAE(nn.Module):
    """``z2 ~ N(0, I)``, ``z1 | z2 ~ N(W2 z2 + b2, s2^2 I)``, ``x | z1 ~ N(W1 z1 + b1, s1^2 I)``.

    Guides (both linear-Gaussian, amortized):

    - ``"top-down"``: q(z2|x) = N(A2 x + c2, v2), q(z1|z2,x) = N(A1 x + C z2 + c1, v1).
      Guide and model visit z2 before z1: analytic KL (TraceMeanField_ELBO) is exact.
    - ``"bottom-up"``: q(z1|x) = N(A1 x + c1, v1), q(z2|z1) = N(C z1 + c2, v2)
      (the IWAE paper's order). z1's model parent z2 is its guide-descendant, so
      analytic KL is biased here.
    """

    # buffers (register_buffer), declared for type checkers
    prior_loc: torch.Tensor
    prior_scale: torch.Tensor

    def __init__(
        self,
        data_dim: int,
        latent_dims: tuple[int, int],
        noise_scales: tuple[float, float] = (1.0, 1.0),
        guide_order: str = "top-down",
    ) -> None:
        super().__init__()
        if guide_order not in ("top-down", "bottom-up"):
            raise ValueError(f"guide_order must be 'top-down' or 'bottom-up', got {guide_order!r}")
        d1, d2 = latent_dims
        self.data_dim, self.latent_dims, self.guide_order = data_dim, (d1, d2), guide_order
        self.data_shape = (data_dim,)
        self.noise_scales = tuple(float(s) for s in noise_scales)
        # generative and inference parameters in two modules, one pyro.module each
        self.generative = _TwoLayerGenerative(data_dim, d1, d2)
        self.register_buffer("prior_loc", torch.zeros(d2))
        self.register_buffer("prior_scale", torch.ones(d2))
        self.inference: _TopDownInference | _BottomUpInference = (
            _TopDownInference(data_dim, d1, d2)
            if guide_order == "top-down"
            else _BottomUpInference(data_dim, d1, d2)
        )

    @classmethod
    def random(
        cls,
        data_dim: int,
        latent_dims: tuple[int, int],
        noise_scales: tuple[float, float] = (1.0, 1.0),
        guide_order: str = "top-down",
        seed: int = 0,
    ) -> TwoLayerLinearGaussianVAE:
        generator = torch.Generator().manual_seed(seed)
        vae = cls(data_dim, latent_dims, noise_scales, guide_order)
        with torch.no_grad():
            for p in vae.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
        return vae

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return ("z1", "z2")

    @property
    def analytic_kl_is_exact(self) -> bool:
        """Closed-form KL (TraceMeanField_ELBO) is exact for the top-down guide only."""
        return self.guide_order == "top-down"

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(
                f"expected data of shape (batch, {self.data_dim}), got {tuple(x.shape)}"
            )
        return x

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Guide scales (sqrt v1, sqrt v2)."""
        return positive_scale(self.inference.raw_scale1), positive_scale(self.inference.raw_scale2)

    # ------------------------------------------------------------------ Pyro program
    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        register_module(self, "decoder", self.generative)
        s1, s2 = self.noise_scales
        net = self.generative
        with data_plate(x, num_data):
            z2 = pyro.sample("z2", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(net.decoder2(z2), s2).to_event(1))
            pyro.sample(OBSERVED_SITE, dist.Normal(net.decoder1(z1), s1).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        register_module(self, "encoder", self.inference)
        v1, v2 = self.scales()
        net = self.inference
        with data_plate(x, num_data):
            if isinstance(net, _TopDownInference):
                z2 = pyro.sample("z2", dist.Normal(net.q2(x), v2).to_event(1))
                loc1 = net.q1(x) + net.q1_from_z2(z2)
                pyro.sample("z1", dist.Normal(loc1, v1).to_event(1))
            else:
                z1 = pyro.sample("z1", dist.Normal(net.q1(x), v1).to_event(1))
                pyro.sample("z2", dist.Normal(net.q2_from_z1(z1), v2).to_event(1))

    # ------------------------------------------------------------------ exact answers
    def _joint(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of (z1, z2, x) under the model, float64."""
        d1, d2 = self.latent_dims
        net = self.generative
        w1, b1 = net.decoder1.weight.to(_F64), net.decoder1.bias.to(_F64)
        w2, b2 = net.decoder2.weight.to(_F64), net.decoder2.bias.to(_F64)
        s1, s2 = self.noise_scales
        cov22 = torch.eye(d2, dtype=_F64, device=w1.device)
        cov11 = w2 @ w2.T + s2**2 * torch.eye(d1, dtype=_F64, device=w1.device)
        cov12 = w2
        cov_xx = w1 @ cov11 @ w1.T + s1**2 * torch.eye(self.data_dim, dtype=_F64, device=w1.device)
        cov_x1 = w1 @ cov11
        cov_x2 = w1 @ cov12
        mean = torch.cat([b2, torch.zeros(d2, dtype=_F64, device=w1.device), w1 @ b2 + b1])
        cov = torch.cat(
            [
                torch.cat([cov11, cov12, cov_x1.T], 1),
                torch.cat([cov12.T, cov22, cov_x2.T], 1),
                torch.cat([cov_x1, cov_x2, cov_xx], 1),
            ],
            0,
        )
        return mean, cov

    def marginal(self) -> MultivariateNormal:
        mean, cov = self._joint()
        n = sum(self.latent_dims)
        return MultivariateNormal(mean[n:], covariance_matrix=cov[n:, n:])

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per data point, float64."""
        return self.marginal().log_prob(x.to(_F64))

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """Exact p(z1, z2 | x), over the concatenation ``[z1, z2]``."""
        mean, cov = self._joint()
        n = sum(self.latent_dims)
        gain = torch.linalg.solve(cov[n:, n:], cov[n:, :n]).T  # cov_ux cov_xx^-1
        post_mean = mean[:n] + (x.to(_F64) - mean[n:]) @ gain.T
        post_cov = cov[:n, :n] - gain @ cov[n:, :n]
        post_cov = 0.5 * (post_cov + post_cov.T)
        return MultivariateNormal(post_mean, covariance_matrix=post_cov)

    def guide_distribution(self, x: torch.Tensor) -> MultivariateNormal:
        """The guide's joint q(z1, z2 | x) over ``[z1, z2]`` (Gaussian: the maps are linear)."""
        x = x.to(_F64)
        v1, v2 = (s.to(_F64) ** 2 for s in self.scales())
        net = self.inference

        def linear(layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
            bias = 0.0 if layer.bias is None else layer.bias.to(_F64)
            return inputs @ layer.weight.to(_F64).T + bias

        if isinstance(net, _TopDownInference):
            c = net.q1_from_z2.weight.to(_F64)
            m2 = linear(net.q2, x)
            m1 = linear(net.q1, x) + m2 @ c.T
            cov22 = torch.diag(v2)
            cov11 = c @ cov22 @ c.T + torch.diag(v1)
            cov12 = c @ cov22
        else:
            c = net.q2_from_z1.weight.to(_F64)
            m1 = linear(net.q1, x)
            m2 = linear(net.q2_from_z1, m1)
            cov11 = torch.diag(v1)
            cov22 = c @ cov11 @ c.T + torch.diag(v2)
            cov12 = cov11 @ c.T
        cov = torch.cat([torch.cat([cov11, cov12], 1), torch.cat([cov12.T, cov22], 1)], 0)
        return MultivariateNormal(torch.cat([m1, m2], -1), covariance_matrix=cov)

    def kl_gap(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z1, z2 | x) || p(z1, z2 | x)) per data point, float64."""
        return torch_kl(self.guide_distribution(x), self.posterior(x))

    def exact_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ELBO per data point: log p(x) - KL(q || p(z|x)), float64."""
        return self.log_marginal(x) - self.kl_gap(x)
