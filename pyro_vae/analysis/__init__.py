"""Measurements of a trained (or fresh) model: they return data and draw nothing.

- :mod:`~pyro_vae.analysis.evaluation`: test ELBO with its two terms, importance-sampled
  log p(x) with PSIS k-hat, active units and per-unit KL; eval mode throughout
- :mod:`~pyro_vae.analysis.ais`: log p(x) by annealed importance sampling with HMC
  transitions, and BDMC's lower and upper bounds on simulated data
- :mod:`~pyro_vae.analysis.gradients`: gradient variance and signal-to-noise ratio of an
  estimator at fixed parameters, per parameter group
- :mod:`~pyro_vae.analysis.bounds`: L_1, L_K and log p(x) per data point, and their gaps
- :mod:`~pyro_vae.analysis.diagnostics`: NUTS reference posteriors, locally optimized
  guides, inference gaps, PSIS, ArviZ ``InferenceData``; :class:`Diagnosis`, their result
- :mod:`~pyro_vae.analysis.comparison`: :class:`Comparison` (what ``pyro-vae compare``
  measures) and its measurements of trained models and run records
- :mod:`~pyro_vae.analysis.sanity`: numbers that cannot be right (a bound above 0 on
  binary data, above its own log p(x), a tenfold jump), as :class:`Flag` s for reports

Rendering (tables, plots, markdown) lives in :mod:`pyro_vae.app`.
"""
