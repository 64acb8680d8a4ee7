"""Evaluation: importance-sampled log-likelihood, PSIS k-hat, active units, test ELBO.

Every evaluation runs with the networks in eval mode (dropout off, BatchNorm on its
running statistics, which it leaves alone) and restores each submodule's own mode
afterwards: see :func:`evaluation_mode`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer.util import is_validation_enabled

from pyro_vae import distributed
from pyro_vae.analysis.psis import khat_summary, psis_khat
from pyro_vae.errors import UserInputError
from pyro_vae.models.protocol import (
    PyroModel,
    analytic_kl_is_exact,
    as_batch,
    evaluation_mode,
    forked_rng,
    model_device,
    model_sites,
)
from pyro_vae.objectives.capture import CompiledFunction, capture_pays
from pyro_vae.objectives.terms import (
    check_elbo_terms,
    log_importance_weights,
    unchecked_elbo_terms,
)

#: Decoder outputs held at once by log_likelihood (samples x data points x dims): 8 MB
#: tensors stay below the allocator's mmap threshold (2**25 was 1.8x slower, measured).
DEFAULT_MAX_ELEMENTS = 2**21


#: a unit whose KL(q || p) averages below this many nats carries (almost) no information
INFORMATIVE_UNIT_NATS = 0.1

#: the seed of the fixed test subsets (per-epoch monitoring, --eval-images): the same
#: images in every run, so that runs are comparable
SUBSET_SEED = 20241121


def fixed_subset(images: torch.Tensor, count: int | None) -> torch.Tensor:
    """``count`` of ``images``, a fixed random subset in their original order (all of
    them for ``None`` or a count as large): the same in every run, and not the first
    images (MNIST's first 5,000 test images are the easier half)."""
    if count is None or count >= len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return images[order[:count].sort().values]


def _sizes(x: torch.Tensor, num_samples: int, chunk_size, batch_size) -> tuple[int, int]:
    n = x.shape[0]
    if num_samples < 1:
        raise UserInputError(f"the number of importance samples must be >= 1, got {num_samples}")
    if batch_size is None:
        batch_size = min(n, 10)
    if chunk_size is None:
        per_sample = max(1, batch_size * (x[0].numel() if n else 1))
        chunk_size = max(1, min(num_samples, DEFAULT_MAX_ELEMENTS // per_sample))
    if chunk_size < 1 or batch_size < 1:
        raise UserInputError("chunk_size and batch_size must be >= 1")
    return chunk_size, batch_size


def importance_weights(
    vae: PyroModel,
    n: int,
    num_samples: int,
    chunk_size: int,
    batch_size: int,
    compile: bool | None = None,
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``weights(batch, size)``: ``log p(x, z_k) - log q(z_k | x)`` for ``size`` draws.

    Drawn through a graph captured from the Pyro model and guide and checked against
    them (:mod:`pyro_vae.objectives.capture`): the same numbers without Pyro's per-call tracing.
    ``compile=None`` captures when the ``ceil(n / batch_size) * ceil(num_samples /
    chunk_size)`` calls to come, plus those made on the module before, repay the capture
    (:func:`~pyro_vae.objectives.capture.capture_pays`; graphs already cached cost nothing).
    Callers turn Pyro validation off, having checked the data.
    """
    # one owner state for the whole evaluation: nothing changes the networks meanwhile
    weights = CompiledFunction(log_importance_weights, vae, False, refresh_every_call=False)
    if compile is None:  # the calls to come, and those made before (repeated small work)
        calls = math.ceil(n / batch_size) * math.ceil(num_samples / chunk_size)
        shapes = (2 if n % batch_size else 1) * (2 if num_samples % chunk_size else 1)
        needed = max(0, shapes - weights.cached_graphs())
        compile = capture_pays(calls + weights.calls(), graphs=needed)
    weights.enabled = compile
    return weights


def _weight_chunks(weights: Callable, batch: torch.Tensor, num_samples: int, chunk_size: int):
    """Log-weights ``(size, batch)`` in float64, ``chunk_size`` samples at a time."""
    for start in range(0, num_samples, chunk_size):
        size = min(chunk_size, num_samples - start)
        yield weights(batch, size).to(torch.float64)


@contextmanager
def _checked_once(vae: PyroModel, x: torch.Tensor) -> Iterator[None]:
    """Check ``x`` against the model once, then run the chunks without Pyro's per-call
    checks. A model outside the protocol is refused here, in one line; a model without
    its own ``check_data`` keeps Pyro's per-call checks (they are its only data check)."""
    own_check = getattr(vae, "check_data", None)
    if not callable(own_check):
        model_sites(vae, x)
    if not is_validation_enabled() or not callable(own_check):
        yield
        return
    own_check(x)
    with pyro.validation_enabled(False):
        yield


def _progress(total: int, num_samples: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"log p(x), K={num_samples}",
        unit="pt",
        leave=False,
        disable=None if enabled else True,
    )


def _shares_out(x: torch.Tensor, sharded: bool) -> bool:
    """Under ``torchrun``, the data points are shared out over the processes (unless
    this is already one process's share)."""
    return distributed.world_size() > 1 and len(x) >= distributed.world_size() and not sharded


def _each_batch(
    vae: PyroModel,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: int | None,
    batch_size: int | None,
    progress: bool,
    compile: bool | None,
    score: Callable[[int, torch.Tensor, Iterator[torch.Tensor]], None],
) -> None:
    """The loop of the importance-sampled evaluations: ``score(start, batch, chunks)``
    for each batch of ``x`` in order, ``chunks`` its float64 log-weights ``chunk_size``
    samples at a time; with no gradients, the networks in eval mode, the data checked
    once, and a progress bar."""
    n = x.shape[0]
    chunk_size, batch_size = _sizes(x, num_samples, chunk_size, batch_size)
    with (
        torch.no_grad(),
        evaluation_mode(vae),
        _checked_once(vae, x),
        _progress(n, num_samples, progress) as bar,
    ):
        weights = importance_weights(vae, n, num_samples, chunk_size, batch_size, compile)
        for start in range(0, n, batch_size):
            batch = x[start : start + batch_size]
            score(start, batch, _weight_chunks(weights, batch, num_samples, chunk_size))
            bar.update(batch.shape[0])


def log_likelihood(
    vae: PyroModel,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    compile: bool | None = None,
    _sharded: bool = False,
) -> torch.Tensor:
    r"""Importance-sampled ``log p(x)`` per data point, in nats, float64.

    .. math::
        \log p(x) \approx L_K = \log \frac{1}{K} \sum_{k=1}^{K} \frac{p(x, z_k)}{q(z_k|x)},
        \quad z_k \sim q(z|x),

    the IWAE bound with large K (Burda et al., 2016, used K = 5000). It is a stochastic
    lower bound that tightens as K grows. Samples are drawn ``chunk_size`` at a time
    (vectorized), and each chunk's log-sum-exp is accumulated in float64, so memory is
    bounded by ``chunk_size * batch_size * data_dim`` whatever K is. Works for any
    model of the protocol (:mod:`pyro_vae.models.protocol`). Runs with the
    networks in eval mode (:func:`evaluation_mode`). ``compile``: draw the weights
    through a captured graph (``None``: when the amount of work repays the capture).
    Under ``torchrun`` the data points are shared out over the processes and the
    results gathered, in order, on every process (:mod:`pyro_vae.distributed`).
    """
    x = as_batch(vae, x)
    if _shares_out(x, _sharded):
        part = x[distributed.shard(len(x))]
        mine = log_likelihood(
            vae, part, num_samples, chunk_size, batch_size, progress, compile, _sharded=True
        )
        return distributed.gather_rows(mine)
    result = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)

    def score(start: int, batch: torch.Tensor, chunks: Iterator[torch.Tensor]) -> None:
        # chunk by chunk: memory bounded whatever K is
        total = torch.full((batch.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        for log_w in chunks:
            total = torch.logaddexp(total, torch.logsumexp(log_w, 0))
        result[start : start + batch.shape[0]] = total - math.log(num_samples)

    _each_batch(vae, x, num_samples, chunk_size, batch_size, progress, compile, score)
    return result


#: an evaluation estimated to take longer than this is refused by the command line
MAX_EVALUATION_SECONDS = 30 * 24 * 3600.0


def _synchronize(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def log_likelihood_seconds(
    vae: PyroModel, x: torch.Tensor, num_samples: int, chunk_size: int | None = None
) -> float:
    """Estimated seconds of :func:`log_likelihood` on ``x`` with ``num_samples``, here:
    one chunk of importance weights is timed (eagerly, after a warm-up call) and scaled
    by the number of chunks. Errs high (a captured graph saves ~1 ms per chunk)."""
    x = as_batch(vae, x)
    chunk, batch = _sizes(x, num_samples, chunk_size, None)
    probe, size = x[:batch], min(chunk, num_samples)
    with torch.no_grad(), evaluation_mode(vae), pyro.validation_enabled(False):
        log_importance_weights(vae, probe, size)
        _synchronize(probe)
        started = time.perf_counter()
        log_importance_weights(vae, probe, size)
        _synchronize(probe)  # a GPU's work is asynchronous: wait for it before reading the clock
        seconds = time.perf_counter() - started
    return seconds * math.ceil(x.shape[0] / batch) * math.ceil(num_samples / chunk)


def announce_evaluation(vae: PyroModel, x: torch.Tensor, num_samples: int, log=print) -> float:
    """Estimate the time of the importance-sampled log p(x) before it starts: say it when
    it is long (over 10 s), refuse it when it is absurd (over 30 days: a typo in K)."""
    from pyro_vae.resources import human_seconds

    seconds = log_likelihood_seconds(vae, x, num_samples)
    if seconds > MAX_EVALUATION_SECONDS:
        raise UserInputError(
            f"log p(x) with K={num_samples:,} on {len(x):,} images would take about "
            f"{human_seconds(seconds)} here: lower the number of samples (the IWAE paper "
            f"uses 5,000) or of images"
        )
    if seconds > 10 and log is not None:
        log(
            f"log p(x) with K={num_samples:,} on {len(x):,} test images: about "
            f"{human_seconds(seconds)} (estimated from one timed chunk)"
        )
    return seconds


def log_likelihood_and_khat(
    vae: PyroModel,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    compile: bool | None = None,
    _sharded: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`log_likelihood` and the PSIS k-hat of the same K weights, per data point.

    Holds the ``K x batch`` weights of one batch at a time (float64), for the k-hat fit.
    Runs with the networks in eval mode. Under ``torchrun`` the data points are shared out
    over the processes and the results gathered (:mod:`pyro_vae.distributed`).
    """
    x = as_batch(vae, x)
    if _shares_out(x, _sharded):
        log_px, khat = log_likelihood_and_khat(
            vae,
            x[distributed.shard(len(x))],
            num_samples,
            chunk_size,
            batch_size,
            progress,
            compile,
            _sharded=True,
        )
        gathered = distributed.gather_rows(torch.as_tensor(khat, dtype=torch.float64))
        return distributed.gather_rows(log_px), gathered.numpy()
    result = torch.empty(x.shape[0], dtype=torch.float64)
    khats = np.empty(x.shape[0])

    def score(start: int, batch: torch.Tensor, chunks: Iterator[torch.Tensor]) -> None:
        # the batch's K weights at once, for the k-hat fit
        log_w = torch.cat(list(chunks))
        end = start + batch.shape[0]
        result[start:end] = (torch.logsumexp(log_w, 0) - math.log(num_samples)).cpu()
        khats[start:end] = psis_khat(log_w)

    _each_batch(vae, x, num_samples, chunk_size, batch_size, progress, compile, score)
    return result, khats


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measures on a trained VAE (nats per data point).

    :meth:`to_dict` gives the flat dict written to ``evaluation.json`` (the ``test_``
    names, ``test_kl_<site>`` per latent site, the k-hat summary's keys).
    """

    #: data points evaluated
    points: int
    #: ELBO with the closed-form KL where exact, and its two terms
    test_elbo: float
    test_expected_log_likelihood: float
    test_kl: float
    #: the ELBO with a Monte Carlo KL, same model and data
    test_elbo_mc: float
    #: importance-sampled log p(x) with K = ``importance_samples``, and its standard error
    #: over the data points (NaN for one point)
    test_log_likelihood: float
    test_log_likelihood_sem: float
    importance_samples: int
    elbo_samples: int
    #: Burda et al.'s active-unit count over all sites, and per site
    active_units: int
    latent_dims: int
    active_units_by_site: dict[str, int]
    #: mean KL of each unit per site; its median over all units; units above 0.1 nats
    kl_per_unit: dict[str, list[float]]
    kl_per_unit_median: float | None
    informative_units: int
    #: the PSIS k-hat summary of the K weights (``None`` with ``khat_note`` when K is
    #: too small for a Pareto fit)
    khat_mean: float | None
    khat_max: float | None
    khat_share_above_threshold: float | None
    khat_images: int | None
    khat_note: str | None
    #: the KL of each latent site (hierarchical models), closed form where exact
    test_kl_by_site: dict[str, float]
    seconds: float

    @property
    def test_nll(self) -> float:
        """The negative log-likelihood, positive: the number papers print."""
        return -self.test_log_likelihood

    @property
    def gap_log_likelihood_minus_elbo(self) -> float:
        return self.test_log_likelihood - self.test_elbo

    def to_dict(self) -> dict[str, Any]:
        khat: dict[str, Any] = {
            "khat_mean": self.khat_mean,
            "khat_max": self.khat_max,
            "khat_share_above_0.7": self.khat_share_above_threshold,
        }
        if self.khat_note is not None:
            khat["khat_note"] = self.khat_note
        if self.khat_images is not None:
            khat["khat_images"] = self.khat_images
        return {
            "points": self.points,
            "test_elbo": self.test_elbo,
            "test_expected_log_likelihood": self.test_expected_log_likelihood,
            "test_kl": self.test_kl,
            "kl": self.test_kl,
            "test_elbo_mc": self.test_elbo_mc,
            "test_log_likelihood": self.test_log_likelihood,
            "test_log_likelihood_sem": self.test_log_likelihood_sem,
            "test_nll": self.test_nll,
            "importance_samples": self.importance_samples,
            "elbo_samples": self.elbo_samples,
            "gap_log_likelihood_minus_elbo": self.gap_log_likelihood_minus_elbo,
            "active_units": self.active_units,
            "latent_dims": self.latent_dims,
            "active_units_by_site": dict(self.active_units_by_site),
            "kl_per_unit": {site: list(units) for site, units in self.kl_per_unit.items()},
            "kl_per_unit_median": self.kl_per_unit_median,
            "informative_units": self.informative_units,
            **khat,
            "seconds": self.seconds,
            **{f"test_kl_{site}": value for site, value in self.test_kl_by_site.items()},
        }


def evaluate(
    vae: PyroModel,
    images: torch.Tensor,
    num_samples: int = 5000,
    elbo_samples: int = 10,
    progress: bool = False,
    chunk_size: int | None = None,
    compile: bool | None = None,
) -> Evaluation:
    """Everything we report about a trained VAE on ``images`` (nats per data point).

    - ``test_elbo`` with its terms ``test_expected_log_likelihood`` and ``test_kl``
      (closed-form KL where exact), and ``test_elbo_mc`` (Monte Carlo KL, same model);
    - ``test_log_likelihood``: importance-sampled log p(x) with K = ``num_samples``
      (``test_nll`` = its negative, positive, the number papers print);
    - ``active_units``; PSIS k-hat summary of the K weights (mean, max, share > 0.7).

    Runs with the networks in eval mode and restores their modes (:func:`evaluation_mode`).
    """
    from pyro_vae.analysis.units import active_units, kl_per_unit

    started = time.perf_counter()
    with forked_rng(), evaluation_mode(vae):
        torch.manual_seed(0)
        analytic = evaluate_elbo(vae, images, elbo_samples)
        mc = evaluate_elbo(vae, images, elbo_samples, kl="mc")
        log_px, khat = log_likelihood_and_khat(
            vae, images, num_samples, chunk_size=chunk_size, progress=progress, compile=compile
        )
        units = active_units(vae, images)
        unit_kl = kl_per_unit(vae, images)
    all_units = [value for values in unit_kl.values() for value in values]
    khats = khat_summary(khat, num_samples)
    return Evaluation(
        points=int(images.shape[0]),
        test_elbo=analytic["elbo"],
        test_expected_log_likelihood=analytic["expected_log_likelihood"],
        test_kl=analytic["kl"],
        test_elbo_mc=mc["elbo"],
        test_log_likelihood=float(log_px.mean()),
        # (one image has no standard error: NaN, written as null in JSON)
        test_log_likelihood_sem=(
            float(log_px.std() / math.sqrt(len(log_px))) if len(log_px) > 1 else math.nan
        ),
        importance_samples=num_samples,
        elbo_samples=elbo_samples,
        active_units=units["active_units"],
        latent_dims=units["latent_dims"],
        active_units_by_site={k: v["active"] for k, v in units["by_site"].items()},
        # beside Burda's count: how the KL is spread over the units
        kl_per_unit=unit_kl,
        kl_per_unit_median=float(np.median(all_units)) if all_units else None,
        informative_units=sum(value > INFORMATIVE_UNIT_NATS for value in all_units),
        khat_mean=khats["khat_mean"],
        khat_max=khats["khat_max"],
        khat_share_above_threshold=khats["khat_share_above_0.7"],
        khat_images=khats.get("khat_images"),
        khat_note=khats.get("khat_note"),
        test_kl_by_site={
            name[len("kl_") :]: value for name, value in analytic.items() if name.startswith("kl_")
        },
        seconds=time.perf_counter() - started,
    )


#: Data points per forward pass when evaluating ELBOs.
EVAL_BATCH = 1000


@torch.no_grad()
def evaluate_elbo(
    vae: PyroModel,
    images: torch.Tensor,
    num_samples: int = 1,
    kl: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean ELBO, expected log-likelihood and KL per data point over ``images``.

    ``kl`` defaults to the closed form where it is exact for this model and guide. Runs
    with the networks in eval mode and restores their modes. Batches of ``images`` move
    to ``device``, by default the model's (:func:`~pyro_vae.models.protocol.model_device`),
    one at a time: the whole set may stay on the CPU.
    """
    kl = checked_kl(vae, images, kl)
    return elbo_means(vae, images, num_samples, kl, device)


def checked_kl(vae: PyroModel, images: torch.Tensor, kl: str | None = None) -> str:
    """``kl`` for :func:`evaluate_elbo` on ``images`` (by default the closed form where it
    is exact for this model and guide, else ``"mc"``), once the model has passed
    :func:`~pyro_vae.objectives.terms.check_elbo_terms` on two of the images."""
    if kl is None:
        exact = analytic_kl_is_exact(vae, images[:2])  # the closed form's own check, made
        check_elbo_terms(vae, images[:2], "mc")  # the checks every kl needs
        return "analytic" if exact else "mc"
    check_elbo_terms(vae, images[:2], kl)
    return kl


@torch.no_grad()
def elbo_means(
    vae: PyroModel,
    images: torch.Tensor,
    num_samples: int,
    kl: str,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """:func:`evaluate_elbo` with ``kl`` already checked by :func:`checked_kl` for this
    model: the per-epoch evaluation of ``fit`` checks once per run, not once per epoch
    and batch (the checks trace the programs, about 13 ms each for the default VAE)."""
    if device is None:
        device = model_device(vae) or images.device
    count = images.shape[0]
    sharded = distributed.world_size() > 1 and count >= distributed.world_size()
    if sharded:  # under torchrun: this process's share, summed over the processes below
        images = images[distributed.shard(count)]
    totals: dict[str, float] = {}
    for start in range(0, images.shape[0], EVAL_BATCH):
        batch = images[start : start + EVAL_BATCH].to(device)
        with evaluation_mode(vae):
            terms = unchecked_elbo_terms(vae, batch, kl, num_samples)
        values = {
            "elbo": terms.elbo,
            "expected_log_likelihood": terms.expected_log_likelihood,
            "kl": terms.kl,
        }
        values.update({f"kl_{site}": value for site, value in terms.kl_by_site.items()})
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + float(value.sum())
    if sharded:
        totals = dict(zip(totals, distributed.all_sum(list(totals.values()))))
    return {name: total / count for name, total in totals.items()}
