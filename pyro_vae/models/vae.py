"""The VAE as a Pyro program: ``model`` (prior and decoder) and ``guide`` (encoder).

The networks live in :mod:`pyro_vae.models.networks` and never call ``pyro.*``; this module
owns the sample sites and the data plate, and builds no layers of its own.
"""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_vae.errors import DataError
from pyro_vae.models.likelihoods import Likelihood

#: Sample site of the latent code (hierarchical models use ``"z1"``, ``"z2"``, ...).
LATENT_SITE = "z"
#: Sample site of the observed data.
OBSERVED_SITE = "x"
#: Plate over data points; every sample site lives inside it.
DATA_PLATE = "data"


#: the attribute in which a model keeps whether its programs call ``pyro.module`` (absent:
#: they do)
_REGISTERS = "_pyro_vae_registers_params"
_UNSET = object()


@contextmanager
def param_store_registration(model: Any, enabled: bool) -> Iterator[None]:
    """Turn the ``pyro.module`` registration in ``model``'s model and guide
    (:func:`register_module`) on or off, temporarily.

    :func:`pyro_vae.fit` optimizes the networks' parameters directly with a torch
    optimizer and never reads Pyro's param store, so it turns the registration off (Python
    work on every step that nothing would read); ``pyro.infer.SVI`` needs it on. The
    switch is the model's own (an attribute of it): other models keep theirs.
    """
    state = vars(model)
    previous = state.get(_REGISTERS, _UNSET)
    state[_REGISTERS] = enabled
    try:
        yield
    finally:
        if previous is _UNSET:
            state.pop(_REGISTERS, None)
        else:
            state[_REGISTERS] = previous


def program_owner(program: Callable[..., Any]) -> Any:
    """The model whose method ``program`` is (through wrappers such as
    ``poutine.scale``), or ``None``: whose registration switch its runs read."""
    owner = getattr(inspect.unwrap(program), "__self__", None)
    if owner is None or isinstance(owner, (type, types.ModuleType)):
        return None
    return owner if hasattr(owner, "__dict__") else None


def register_module(owner: Any, name: str, module: nn.Module) -> None:
    """``pyro.module(name, module)`` in ``owner``'s program, where the module being run
    owns the names.

    Pyro's param store keeps the first tensor registered under a name; a second VAE
    trained with ``pyro.infer.SVI`` in the same process would then silently optimize the
    first VAE's parameters. Stale entries are dropped first, so the names always point
    at the tensors the model actually uses. Skipped while ``owner``'s registration is
    off (``param_store_registration(owner, False)``).
    """
    if not getattr(owner, "__dict__", {}).get(_REGISTERS, True):
        return
    store = pyro.get_param_store()
    for param_name, param in module.named_parameters():
        full_name = f"{name}$$${param_name}"
        # (detached copies, as the path-derivative estimators use, never own the names)
        if param.requires_grad and full_name in store and store.get_param(full_name) is not param:
            del store[full_name]
    pyro.module(name, module)


def data_plate(x: torch.Tensor, num_data: int | None = None) -> pyro.plate:
    """The plate over the mini-batch ``x``, scaled to a data set of ``num_data`` points.

    With ``num_data`` larger than the batch, every log-density in the plate is multiplied
    by ``num_data / batch``, so the ELBO of a mini-batch estimates the full data set's.
    """
    batch = x.shape[0]
    if num_data is None or num_data == batch:
        return pyro.plate(DATA_PLATE, batch, dim=-1)
    if num_data < batch:
        raise ValueError(f"num_data={num_data} is smaller than the batch ({batch})")
    # (a plate object cached across model and guide would save a little Python a step, but its
    # frame counter differs between the two, which Pyro's model/guide check refuses)
    return pyro.plate(DATA_PLATE, num_data, subsample=torch.arange(batch, device=x.device), dim=-1)


class VAE(nn.Module):
    """Variational autoencoder: ``z ~ N(prior_loc, prior_scale)``, ``x | z ~ likelihood``.

    :param encoder: network ``x -> (z_loc, z_scale)`` (q(z|x), a diagonal Gaussian).
    :param decoder: network ``z -> raw likelihood parameters`` (one per data dimension).
    :param likelihood: turns the decoder output into a distribution per data dimension.
    :param latent_dim: dimension of z.
    :param data_shape: shape of one data point, e.g. ``(1, 28, 28)``; data are passed
        flattened, ``(batch, prod(data_shape))``, or in this shape.
    :param prior_loc: the prior's mean per latent dimension.
    :param prior_scale: the prior's standard deviation per latent dimension.

    ``model(x)`` and ``guide(x)`` take a mini-batch (the library scales its bound to the
    data set); for ``pyro.infer.SVI`` they also take ``num_data``, the size of the whole
    data set, which subsamples the data plate to the same effect.

    Example::

        vae = pyro_vae.build_vae(pyro_vae.ModelConfig(latent_dims=(2,)), (1, 8, 8))
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
                             pyro.infer.Trace_ELBO())

    **References**

    [1] Kingma, D. P. and Welling, M. (2014). Auto-Encoding Variational Bayes. ICLR.
    [2] Rezende, D. J., Mohamed, S. and Wierstra, D. (2014). Stochastic Backpropagation
        and Approximate Inference in Deep Generative Models. ICML.
    """

    # buffers (register_buffer), declared for type checkers
    prior_loc: torch.Tensor
    prior_scale: torch.Tensor

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        latent_dim: int,
        data_shape: Sequence[int],
        prior_loc: float | torch.Tensor = 0.0,
        prior_scale: float | torch.Tensor = 1.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = int(latent_dim)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.data_dim = math.prod(self.data_shape)
        prior_scale = torch.as_tensor(prior_scale, dtype=torch.get_default_dtype())
        if not (prior_scale > 0).all():
            raise ValueError(f"prior_scale must be > 0, got {prior_scale}")
        self.register_buffer(
            "prior_loc",
            torch.as_tensor(prior_loc, dtype=torch.get_default_dtype()).expand(latent_dim).clone(),
        )
        self.register_buffer("prior_scale", prior_scale.expand(latent_dim).clone())

    # ----------------------------------------------------------------- the Pyro program
    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """p(x, z) = N(z; prior_loc, prior_scale) p(x | decoder(z))."""
        x = self.program_input(x)
        register_module(self, "decoder", self.decoder)
        if self.likelihood_has_parameters:
            register_module(self, "likelihood", self.likelihood)
        with data_plate(x, num_data):
            z = pyro.sample(LATENT_SITE, self.prior())
            pyro.sample(OBSERVED_SITE, self.likelihood.event_distribution(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """q(z | x) = N(z; encoder(x)), diagonal."""
        x = self.program_input(x)
        register_module(self, "encoder", self.encoder)
        with data_plate(x, num_data):
            z_loc, z_scale = self.encoder(x)
            pyro.sample(LATENT_SITE, dist.Normal(z_loc, z_scale).to_event(1))

    def prior(self) -> dist.TorchDistribution:
        """p(z), with event shape ``(latent_dim,)``."""
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    @property
    def likelihood_has_parameters(self) -> bool:
        return any(True for _ in self.likelihood.parameters())

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return (LATENT_SITE,)

    @property
    def analytic_kl_is_exact(self) -> bool:
        """Whether TraceMeanField_ELBO's closed-form KL is exact for this model and guide."""
        return True

    # ----------------------------------------------------------------- data checks
    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` as ``(batch, data_dim)``; refuse a shape that does not fit."""
        if x.dim() >= 2 and tuple(x.shape[1:]) == self.data_shape:
            x = x.reshape(x.shape[0], self.data_dim)
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise DataError(
                f"expected data of shape (batch, {self.data_dim}) or (batch, "
                f"{', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}: "
                f"reshape the data or build the VAE for data of this shape"
            )
        if is_validation_enabled() and not x.is_floating_point():
            raise DataError(f"expected floating-point data, got {x.dtype}: convert with x.float()")
        return x

    def program_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as model and guide use it: flattened, and checked against the likelihood
        under Pyro validation."""
        x = self.flatten(x)
        if is_validation_enabled():
            self.likelihood.check_data(x)
        return x

    def check_data(self, x: torch.Tensor, what: str = "data") -> torch.Tensor:
        """Flatten ``x`` and check it is finite and inside the likelihood's support."""
        x = self.flatten(x)
        self.likelihood.check_data(x, what)
        return x

    # ----------------------------------------------------------------- helpers
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z|x), each ``(batch, latent_dim)``."""
        return self.encoder(self.flatten(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample_latent: bool = False) -> torch.Tensor:
        """Mean of p(x | z) at z = E_q[z] (or at a draw from q), shaped like ``x``."""
        z_loc, z_scale = self.encode(x)
        z = z_loc + z_scale * torch.randn_like(z_scale) if sample_latent else z_loc
        return self.likelihood.mean(self.decoder(z)).reshape(x.shape)

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """Draw ``z`` from the prior and decode: the likelihood's mean, or a draw of x.

        Returns ``(num_samples, *data_shape)``.
        """
        z = self.prior().sample((num_samples,))
        decoded = self.decoder(z)
        x = self.likelihood.mean(decoded) if mean else self.likelihood(decoded).sample()
        return x.reshape(num_samples, *self.data_shape)
