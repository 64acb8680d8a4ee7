"""Neural networks of the VAE (plain ``torch.nn``: no ``pyro.*`` in here).

Encoders map data to the location and scale of a diagonal Gaussian; decoders map latents
to the raw parameters of a likelihood (logits or a location). Every network accepts any
number of leading batch dimensions, so vectorized particles (``(K, B, d)``) just work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}

# Scales are softplus(raw) + SCALE_FLOOR: smooth, positive, and bounded away from zero so
# that log q(z|x) stays finite in float32 (never a raw exp, which overflows).
SCALE_FLOOR = 1e-4


def positive_scale(raw: torch.Tensor, floor: float = SCALE_FLOOR) -> torch.Tensor:
    """Map an unconstrained tensor to a scale: ``softplus(raw) + floor``."""
    return F.softplus(raw) + floor


def mlp(sizes: Sequence[int], activation: str, final_activation: bool = False) -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianMLP(nn.Module):
    """``input -> hidden layers -> (loc, scale)`` of a diagonal Gaussian.

    Used for q(z|x) in the one-layer VAE and for every conditional Gaussian of the
    hierarchical VAE (q(z2|z1), p(z1|z2), ...).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.body = mlp([input_dim, *hidden], activation, final_activation=True)
        width = hidden[-1] if hidden else input_dim
        self.loc = nn.Linear(width, output_dim)
        self.raw_scale = nn.Linear(width, output_dim)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(inputs)
        return self.loc(features), positive_scale(self.raw_scale(features))


class MLPDecoder(nn.Module):
    """``z -> hidden layers -> raw likelihood parameters`` (one per data dimension)."""

    def __init__(
        self,
        latent_dim: int,
        output_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.net = mlp([latent_dim, *hidden, output_dim], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _conv_grid(image_shape: Sequence[int]) -> tuple[int, int, int]:
    channels, height, width = image_shape
    if height % 4 or width % 4:
        raise ValueError(
            f"the convolutional networks halve the image twice, so height and width must be "
            f"multiples of 4 (got {height}x{width}); use `network='mlp'` for this data"
        )
    return channels, height // 4, width // 4


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (32, 64 channels), then a Gaussian head.

    Takes flattened images ``(..., C*H*W)`` like every other network here.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        hidden: int = 256,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        channels, h4, w4 = _conv_grid(image_shape)
        self.image_shape = tuple(image_shape)
        act = ACTIVATIONS[activation]
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1),
            act(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            act(),
            nn.Flatten(),
            nn.Linear(64 * h4 * w4, hidden),
            act(),
        )
        self.loc = nn.Linear(hidden, latent_dim)
        self.raw_scale = nn.Linear(hidden, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        features = self.conv(x.reshape(-1, *self.image_shape))
        loc = self.loc(features).reshape(*lead, -1)
        return loc, positive_scale(self.raw_scale(features)).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """A linear layer to a 64-channel grid, then two stride-2 transposed convolutions."""

    def __init__(
        self,
        latent_dim: int,
        image_shape: Sequence[int],
        hidden: int = 256,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        channels, h4, w4 = _conv_grid(image_shape)
        act = ACTIVATIONS[activation]
        self.grid = (64, h4, w4)
        self.linear = nn.Sequential(
            nn.Linear(latent_dim, hidden), act(), nn.Linear(hidden, 64 * h4 * w4), act()
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            act(),
            nn.ConvTranspose2d(32, channels, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        grid = self.linear(z.reshape(-1, z.shape[-1])).reshape(-1, *self.grid)
        return self.deconv(grid).reshape(*lead, -1)
