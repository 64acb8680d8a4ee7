"""gaussian_kl against torch's KL and against Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyro_vae import gaussian_kl

DIM = 4
locs = arrays("float64", DIM, elements=st.floats(-50, 50))
scales = arrays("float64", DIM, elements=st.floats(1e-3, 1e3))


@settings(max_examples=300, deadline=None)
@given(q_loc=locs, q_scale=scales, p_loc=locs, p_scale=scales)
def test_matches_torch_kl_and_is_nonnegative(q_loc, q_scale, p_loc, p_scale):
    q_loc, q_scale, p_loc, p_scale = map(torch.from_numpy, (q_loc, q_scale, p_loc, p_scale))
    ours = gaussian_kl(q_loc, q_scale, p_loc, p_scale)
    q, p = torch.distributions.Normal(q_loc, q_scale), torch.distributions.Normal(p_loc, p_scale)
    reference = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.isfinite(ours) and ours >= 0
    # float64 rounding of terms as large as (50 + 50)^2 / (1e-3)^2 = 1e10
    assert ours.item() == pytest.approx(reference.item(), rel=1e-9, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(q_loc=locs, q_scale=scales)
def test_standard_prior_is_the_tutorials_eq_40(q_loc, q_scale):
    q_loc, q_scale = torch.from_numpy(q_loc), torch.from_numpy(q_scale)
    eq40 = -0.5 * (1 + torch.log(q_scale**2) - q_scale**2 - q_loc**2).sum(-1)
    assert gaussian_kl(q_loc, q_scale).item() == pytest.approx(eq40.item(), rel=1e-9, abs=1e-9)


def test_zero_when_q_equals_p_even_in_float32():
    loc = torch.randn(1000, 8)
    scale = torch.rand(1000, 8) + 0.1
    kl = gaussian_kl(loc, scale, loc, scale)
    assert (kl == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_monte_carlo_with_nonstandard_prior(seed):
    generator = torch.Generator().manual_seed(seed)
    q_loc, p_loc = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    q_scale, p_scale = torch.rand(2, 3, generator=generator, dtype=torch.float64) + 0.3
    q, p = torch.distributions.Normal(q_loc, q_scale), torch.distributions.Normal(p_loc, p_scale)
    n = 400_000
    torch.manual_seed(seed)
    z = q.sample((n,))
    log_ratio = (q.log_prob(z) - p.log_prob(z)).sum(-1)
    estimate, standard_error = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    # 5 standard errors: a false failure has probability below 1e-6
    assert abs(gaussian_kl(q_loc, q_scale, p_loc, p_scale) - estimate) < 5 * standard_error


def test_gradients_match_torch():
    q_loc = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    q_scale = (torch.rand(5, 3, dtype=torch.float64) + 0.2).requires_grad_()
    ours = torch.autograd.grad(gaussian_kl(q_loc, q_scale, 0.5, 2.0).sum(), (q_loc, q_scale))
    q = torch.distributions.Normal(q_loc, q_scale)
    p = torch.distributions.Normal(torch.tensor(0.5), torch.tensor(2.0))
    reference = torch.autograd.grad(torch.distributions.kl_divergence(q, p).sum(), (q_loc, q_scale))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)
