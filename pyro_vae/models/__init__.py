"""The Pyro programs: what a model must offer, and the models this package ships.

- :mod:`~pyro_vae.models.protocol`: the model protocol (``model(x)`` and ``guide(x)``) and
  the discovery of latent and observed sites from traces: every tool takes any object
  that satisfies it
- :mod:`~pyro_vae.models.vae`: the VAE (``z`` from N(0, I), ``x`` from the decoder)
- :mod:`~pyro_vae.models.hierarchical`: L stochastic layers, bottom-up or top-down guide
- :mod:`~pyro_vae.models.kl`: the closed-form KL between diagonal Gaussians
- :mod:`~pyro_vae.models.exact`: linear-Gaussian VAEs with exact log p(x) and posterior
- :mod:`~pyro_vae.models.networks`, :mod:`~pyro_vae.models.likelihoods`: the layers
  (plain ``torch.nn``, never calling ``pyro.*``) and the decoder likelihoods
- :mod:`~pyro_vae.models.build`: a model from a :class:`~pyro_vae.config.ModelConfig`
"""
