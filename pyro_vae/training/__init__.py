"""Training by stochastic variational inference.

- :mod:`~pyro_vae.training.fit`: ``fit``, the entry point
- :mod:`~pyro_vae.training.trainer`: one run's state and loop (steps, finite checks,
  per-epoch evaluation, early stopping)
- :mod:`~pyro_vae.training.schedules`: learning-rate schedules, KL warm-up, the optimizer
- :mod:`~pyro_vae.training.checkpoint`: checksummed checkpoints and RNG states
"""
