"""The training objectives: Pyro ELBOs where they are right, small subclasses where not.

Conventions: every bound is in nats; ``elbo`` is higher-is-better and the quantity
minimised is ``loss = -elbo``. Pyro's ``loss`` methods return the loss of the whole
(scaled) data set; divide by the number of data points for nats per data point.

- :mod:`~pyro_vae.objectives.registry`: the estimators by name, with what each needs
- :mod:`~pyro_vae.objectives.closed_form`: ``analytic`` (TraceMeanField_ELBO's closed-form
  KL, refused where it is not exact)
- :mod:`~pyro_vae.objectives.importance`: IWAE's L_K, Renyi's VR bound, DReG gradients
- :mod:`~pyro_vae.objectives.path`: sticking-the-landing gradients
- :mod:`~pyro_vae.objectives.score`, :mod:`~pyro_vae.objectives.tracegraph`,
  :mod:`~pyro_vae.objectives.vimco`, :mod:`~pyro_vae.objectives.rws`: score-function
  gradients (REINFORCE, Pyro's TraceGraph_ELBO with baselines, VIMCO) and reweighted
  wake-sleep, for any guide
- :mod:`~pyro_vae.objectives.miwae`, :mod:`~pyro_vae.objectives.ciwae`,
  :mod:`~pyro_vae.objectives.piwae`: Rainforth et al.'s MIWAE, CIWAE and PIWAE
- :mod:`~pyro_vae.objectives.penalty`, :mod:`~pyro_vae.objectives.free_bits`: objectives
  that are not bounds (penalty), or change the KL term (free bits)
- :mod:`~pyro_vae.objectives.traces`: the vectorized particle traces they share
- :mod:`~pyro_vae.objectives.terms`: an ELBO's two terms, importance weights
- :mod:`~pyro_vae.objectives.capture`: an objective's loss and gradient captured as one
  graph and replayed (the fast path), checked against the ELBO it came from
"""
