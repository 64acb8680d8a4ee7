"""A model from a :class:`~pyro_vae.config.ModelConfig`: the one place that knows every
model class this package ships."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from pyro_vae.errors import DataError
from pyro_vae.models.vae import VAE


def build_vae(config, data_shape: Sequence[int]) -> nn.Module:
    """Build a VAE from a :class:`~pyro_vae.config.ModelConfig` for data of ``data_shape``.

    The model keeps its config as ``model.config``: :func:`pyro_vae.fit` writes it to a
    run folder's ``config.json``, from which the command line rebuilds the model. With
    ``config.factory`` (an import path) the model is your own, built by that factory: its
    run folders are like any other."""
    vae = _from_factory(config, data_shape) if config.factory else _build(config, data_shape)
    vae.config = config
    return vae


def _from_factory(config, data_shape: Sequence[int]) -> nn.Module:
    """Your own model: ``factory(data_shape, **factory_options)``, checked against the
    protocol (callable model and guide, a ``torch.nn.Module`` so that a checkpoint holds
    its ``state_dict``)."""
    from pyro_vae.errors import UserInputError
    from pyro_vae.imports import import_object
    from pyro_vae.models.protocol import ModelError, check_protocol

    factory = import_object(config.factory, "model factory")
    if not callable(factory):
        raise UserInputError(
            f"model factory {config.factory} is a {type(factory).__name__}, not callable: "
            f"name a function or class that takes the data shape"
        )
    try:
        model = factory(tuple(data_shape), **config.factory_options)
    except TypeError as error:
        raise UserInputError(
            f"model factory {config.factory}(data_shape, **{config.factory_options}) failed: "
            f"{str(error)[:200]}; it must take the data shape (a tuple) and the "
            f"factory_options as keywords"
        ) from None
    check_protocol(model)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model factory {config.factory} returned a {type(model).__name__}, not a "
            f"torch.nn.Module: make the object holding model and guide a Module (a "
            f"checkpoint holds its state_dict)"
        )
    return model


def _build(config, data_shape: Sequence[int]) -> VAE:
    from pyro_vae.models.likelihoods import make_likelihood
    from pyro_vae.models.networks import ConvDecoder, ConvEncoder, GaussianMLP, MLPDecoder

    data_dim = math.prod(data_shape)
    likelihood = make_likelihood(config.likelihood, data_dim, config.gaussian_scale)
    if len(config.latent_dims) > 1:
        from pyro_vae.models.hierarchical import build_hierarchical

        return build_hierarchical(config, data_shape, likelihood)
    latent_dim = config.latent_dims[0]
    encoder: nn.Module
    decoder: nn.Module
    if config.network == "conv":
        if len(data_shape) != 3:
            raise DataError(f"`network='conv'` needs image data (C, H, W), got shape {data_shape}")
        width = config.hidden[0] if config.hidden else 256
        encoder = ConvEncoder(data_shape, latent_dim, width, config.activation)
        decoder = ConvDecoder(latent_dim, data_shape, width, config.activation)
    else:
        encoder = GaussianMLP(data_dim, latent_dim, config.hidden, config.activation)
        decoder = MLPDecoder(
            latent_dim, data_dim, tuple(reversed(config.hidden)), config.activation
        )
    return VAE(
        encoder, decoder, likelihood, latent_dim, data_shape, config.prior_loc, config.prior_scale
    )
