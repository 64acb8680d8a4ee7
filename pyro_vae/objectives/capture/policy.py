"""When capturing a graph pays: its one-time cost against the Pyro work it saves per call.

Capturing costs time once: the first capture in a process imports torch's tracing stack,
and each graph takes time to capture and check. :func:`capture_pays` weighs that against
the Pyro bookkeeping a graph saves per call, so that short work (a small evaluation, a
tiny training run) stays eager. The calls it is given are counted by the object that
trains or evaluates (a :class:`~pyro_vae.objectives.capture.compiled.CompiledLoss` or
:class:`~pyro_vae.objectives.capture.compiled.CompiledFunction`), kept with the model's
graphs in its :class:`~pyro_vae.objectives.capture.graphs.GraphCache`, never by the
process.
"""

from __future__ import annotations

from pyro_vae import compat

__all__ = ["capture_pays"]

#: Cost model for :func:`capture_pays`, measured on the development machine (2 CPU
#: cores; ``benchmarks/run.py`` reports the current values): Pyro's bookkeeping that a
#: replayed call saves, seconds to capture and check one graph, and seconds to import
#: torch's tracing stack for the first capture of a process.
SAVED_PER_CALL = 1e-3
CAPTURE_SECONDS = 0.25
IMPORT_SECONDS = 1.6


def capture_pays(calls: int, graphs: int = 1) -> bool:
    """Whether capturing ``graphs`` graphs pays for itself over ``calls`` calls.

    Capturing costs :data:`CAPTURE_SECONDS` per graph, plus :data:`IMPORT_SECONDS` once
    per process (``torch.optim`` optimizers import the same stack when first built, so
    training pays that anyway); each replayed call saves about :data:`SAVED_PER_CALL`
    seconds. With no graph to capture (all cached), any call pays.
    """
    cost = graphs * CAPTURE_SECONDS + (0.0 if compat.tracing_stack_loaded() else IMPORT_SECONDS)
    return calls * SAVED_PER_CALL > cost
