"""Training by stochastic variational inference.

- :mod:`~pyro_vae.training.fit`: ``fit``, the entry point
- :mod:`~pyro_vae.training.trainer`: the :class:`~pyro_vae.training.trainer.Trainer`,
  one run's loop over epochs and steps, handing each epoch to its callbacks
- :mod:`~pyro_vae.training.callbacks`: the callback interface, and the trainer's own
  (evaluation, early stopping, ``metrics.jsonl``, the checkpoint, the console line)
- :mod:`~pyro_vae.training.step`, :mod:`~pyro_vae.training.guard`,
  :mod:`~pyro_vae.training.compilation`: one optimizer step (averaged under torchrun),
  its finite checks and rollback, the compile decision
- :mod:`~pyro_vae.training.optimization`: the optimizer and learning-rate schedule,
  built outside the trainer
- :mod:`~pyro_vae.training.epoch`, :mod:`~pyro_vae.training.batches`,
  :mod:`~pyro_vae.training.history`, :mod:`~pyro_vae.training.state`: an epoch in
  progress, its batches, the history and budget, the checkpointed state
- :mod:`~pyro_vae.training.schedules`: learning-rate schedules, KL warm-up, Adam
- :mod:`~pyro_vae.training.checkpoint`: checksummed checkpoints and RNG states
- :mod:`~pyro_vae.training.preemption`: SIGTERM/SIGUSR1, a checkpoint mid-epoch
"""
