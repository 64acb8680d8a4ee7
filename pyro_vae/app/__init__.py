"""The application layer: the ``pyro-vae`` command line and what it writes.

- :mod:`~pyro_vae.app.cli`: the entry point; the commands are modules of
  :mod:`~pyro_vae.app.commands` (with :mod:`~pyro_vae.app.flags`, the only places that
  speak in flags)
- :mod:`~pyro_vae.app.training_run`: the checks before a run and one run trained into
  its folder (``train``, ``compare``, ``sweep``, ``reproduce``); :mod:`~pyro_vae.app.torchrun`
  for ``train`` under torchrun
- :mod:`~pyro_vae.app.runs`: run folders (lock, resume, recovery, config, report)
- :mod:`~pyro_vae.app.compare`, :mod:`~pyro_vae.app.diagnose`: the comparison and the
  diagnosis of a run, measured by :mod:`pyro_vae.analysis` into a ``Comparison`` and a
  ``Diagnosis``; :mod:`~pyro_vae.app.compare_report` and
  :mod:`~pyro_vae.app.diagnose_report` render those (files, plots, console lines)
- :mod:`~pyro_vae.app.sweep`, :mod:`~pyro_vae.app.executors`: many runs, serially or on Ray
- :mod:`~pyro_vae.app.reproduce`: the IWAE paper's Table 1 cells
- :mod:`~pyro_vae.app.plots`, :mod:`~pyro_vae.app.tracking`: PNG figures, TensorBoard
"""
