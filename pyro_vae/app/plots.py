"""PNG figures of a run: reconstructions, prior samples, the latent space, learning curves.

matplotlib (Agg backend) and torchvision's image grids are imported inside the
functions, so that importing pyro_vae stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pyro_vae.models.protocol import (
    as_batch,
    forked_rng,
    image_shape,
    model_sites,
    on_model_device,
    prior_samples,
    probing,
    reconstruct,
)

if TYPE_CHECKING:
    from pyro_vae.models.protocol import PyroModel


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(images: torch.Tensor, nrow: int) -> Any:
    """``(N, C, H, W)`` in [0, 1] -> an HxWxC numpy image with thin white separators."""
    from torchvision.utils import make_grid

    grid = make_grid(images.clamp(0, 1).cpu(), nrow=nrow, padding=1, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def _show(ax: Any, images: torch.Tensor, nrow: int, title: str) -> None:
    ax.imshow(_grid(images, nrow), cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def _displayable(vae: PyroModel, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *image_shape(vae, x))


def plot_reconstructions(
    vae: PyroModel, images: torch.Tensor, path: str | Path, n: int = 16
) -> Path:
    """Inputs (top) next to the means of p(x | z = E_q[z]) (bottom)."""
    plt = _pyplot()
    x = on_model_device(vae, images[:n])
    reconstruction = reconstruct(vae, x)
    fig, axes = plt.subplots(2, 1, figsize=(max(4, n * 0.5), 2.6))
    _show(axes[0], _displayable(vae, x), n, "data")
    _show(
        axes[1], _displayable(vae, reconstruction), n, "reconstruction (mean of p(x|z), z = E_q[z])"
    )
    return _save(fig, path)


def plot_samples(
    vae: PyroModel,
    path: str | Path,
    n: int = 64,
    seed: int = 0,
    example: torch.Tensor | None = None,
) -> Path:
    """Means of p(x | z) for z drawn from the prior (``example``: a data point, for a
    model without its own ``sample``)."""
    plt = _pyplot()
    with forked_rng():
        torch.manual_seed(seed)
        samples = _prior_samples(vae, n, example).cpu()
    nrow = int(n**0.5)
    fig, ax = plt.subplots(figsize=(4.5, 4.8))
    _show(ax, _displayable(vae, samples), nrow, f"{n} samples from the prior (means of p(x|z))")
    return _save(fig, path)


def plot_latent_space(
    vae: PyroModel, images: torch.Tensor, labels: torch.Tensor, path: str | Path
) -> Path:
    """E_q[z] of each image, coloured by label; PCA to 2-D when the latent has more dims.

    With a 2-D latent, a second panel shows the decoded manifold: the means of p(x|z)
    on a grid of prior quantiles.
    """
    plt = _pyplot()
    with torch.no_grad():
        loc = (
            vae.encode(on_model_device(vae, images))[0].cpu()
            if hasattr(vae, "encode")
            else _top_means(vae, images)
        )
    dims = loc.shape[1]
    shape = tuple(getattr(vae, "data_shape", ()))
    manifold = dims == 2 and len(shape) == 3 and hasattr(vae, "decoder") and hasattr(vae, "encode")
    fig, axes = plt.subplots(1, 2 if manifold else 1, figsize=(10 if manifold else 5.5, 4.8))
    ax = axes[0] if manifold else axes
    if dims > 2 and loc.shape[0] < 3:  # too few points for a PCA: the first two units
        points = loc[:, :2].numpy()
        ax.set_xlabel("z_1")
        ax.set_ylabel("z_2")
        title = f"E_q[z], first 2 of {dims} dims ({loc.shape[0]} points: too few for a PCA)"
    elif dims > 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(loc.numpy())
        points = pca.transform(loc.numpy())
        share = pca.explained_variance_ratio_.sum()
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        title = f"E_q[z], PCA of {dims} dims ({share:.0%} of variance)"
    elif dims == 2:
        points = loc.numpy()
        ax.set_xlabel("z_1")
        ax.set_ylabel("z_2")
        title = "E_q[z]"
    else:
        points = torch.stack([loc[:, 0], labels.float() + 0.3 * torch.rand(len(labels))], 1)
        points = points.numpy()
        ax.set_xlabel("z")
        ax.set_ylabel("label (jittered)")
        title = "E_q[z] by label"
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.numpy(), cmap="tab10", s=6, alpha=0.8)
    ax.legend(*scatter.legend_elements(), title="label", fontsize=7, loc="best", markerscale=0.8)
    ax.set_title(title, fontsize=10)
    if manifold:
        n = 15
        quantiles = torch.linspace(0.05, 0.95, n)
        values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
        built: Any = vae  # (a manifold is drawn for the built-in models only)
        prior_loc, prior_scale = built.prior_loc.cpu(), built.prior_scale.cpu()
        grid_y, grid_x = torch.meshgrid(values.flip(0), values, indexing="ij")
        z = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], 1) * prior_scale + prior_loc
        with torch.no_grad():
            decoded = built.likelihood.mean(built.decoder(z.to(built.prior_loc.device)))
        _show(axes[1], _displayable(vae, decoded), n, "decoded manifold (prior quantiles 5%..95%)")
    return _save(fig, path)


def _top_means(vae: PyroModel, images: torch.Tensor) -> torch.Tensor:
    from pyro import poutine

    x = on_model_device(vae, as_batch(vae, images))
    names = getattr(vae, "latent_sites", None) or model_sites(vae, x[:1]).latent
    with probing(vae):
        trace = poutine.trace(vae.guide).get_trace(x)
    posterior: Any = trace.nodes[names[-1]]["fn"]
    means: torch.Tensor = posterior.mean.reshape(len(x), -1).cpu()
    return means


def _prior_samples(vae: PyroModel, n: int, example: torch.Tensor | None) -> torch.Tensor:
    if example is None and not callable(getattr(vae, "sample", None)):
        raise ValueError("a model without its own sample() needs an example data point")
    if example is None:
        own: Any = vae  # (a model with its own sample(), checked above)
        drawn: torch.Tensor = own.sample(n)
        return drawn
    return prior_samples(vae, n, on_model_device(vae, example[:1]))


def plot_learning_curves(epochs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """ELBO (train bound and test), expected log-likelihood, and KL per epoch."""
    plt = _pyplot()
    x = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(x, [e["train_elbo"] for e in epochs], label="train (estimator's bound)")
    axes[0].plot(x, [e["test_elbo"] for e in epochs], label="test ELBO")
    if epochs and "validation_elbo" in epochs[0]:
        axes[0].plot(x, [e["validation_elbo"] for e in epochs], label="validation ELBO")
    axes[0].set_title("ELBO (nats per data point, higher is better)", fontsize=10)
    axes[1].plot(x, [e["test_expected_log_likelihood"] for e in epochs], color="C2")
    axes[1].set_title("test E_q[log p(x|z)] (reconstruction)", fontsize=10)
    kl_sites = sorted(k for k in (epochs[0] if epochs else {}) if k.startswith("test_kl_"))
    axes[2].plot(x, [e["test_kl"] for e in epochs], color="C3", label="total")
    if len(kl_sites) > 1:
        for key in kl_sites:
            axes[2].plot(x, [e[key] for e in epochs], "--", label=key.removeprefix("test_kl_"))
    axes[2].set_title("test KL(q(z|x) || p(z)) (regulariser)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if len(kl_sites) > 1:
        axes[2].legend(fontsize=8)
    return _save(fig, path)


def kl_sites(epochs: Sequence[dict[str, Any]]) -> list[str]:
    """Latent sites with a per-site KL in the metrics (``test_kl_z1``, ...)."""
    return sorted(
        k.removeprefix("test_kl_")
        for k in (epochs[0] if epochs else {})
        if k.startswith("test_kl_")
    )


def plot_kl_per_layer(epochs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Each latent layer's test KL, and its active units, per epoch."""
    plt = _pyplot()
    x = [e["epoch"] for e in epochs]
    sites = kl_sites(epochs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for index, site in enumerate(sites):
        axes[0].plot(x, [e[f"test_kl_{site}"] for e in epochs], color=f"C{index}", label=site)
        key = f"test_active_units_{site}"
        if key in epochs[0]:
            axes[1].plot(x, [e[key] for e in epochs], color=f"C{index}", label=site)
    axes[0].set_title("test KL per latent layer (nats per data point)", fontsize=10)
    axes[1].set_title("active units per latent layer (Cov_x E_q[z] > 0.01)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as a PNG at ``dpi``, atomically (a reader never sees half an image)."""
    import io

    import matplotlib.pyplot as plt

    from pyro_vae.io import atomic_write_bytes, make_folder

    path = Path(path)
    make_folder(path.parent)  # (no link in a run folder: see pyro_vae.io)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)
    return path
