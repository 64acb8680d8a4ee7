"""A Pyro ELBO's loss and gradients on a module, captured once and replayed.

Pyro builds its traces in Python on every step: messengers, site dictionaries, the
replay of the guide's samples into the model. For a small model on CPU that Python work
is a sizeable share of each step, while the tensor work is the same every step.
:class:`~pyro_vae.objectives.capture.compiled.CompiledLoss` runs the Pyro program and the
ELBO once under ``make_fx`` (on fake tensors: no data, no arithmetic), recording the
operations of the loss *and* of its backward pass (``torch.autograd.grad`` at capture
time) as one graph, and replays that graph on later steps: fresh noise each time (the
random ops are in the graph), no Pyro bookkeeping, no autograd tape.
:class:`~pyro_vae.objectives.capture.compiled.CompiledFunction` does the same for a
function evaluated without gradients (``log_likelihood``'s importance weights). The Pyro
model, guide and ELBO stay the source of truth: a graph is what they computed, and it is
checked against them.

Guarantees:

- **A graph is reused only for what it baked in.** Its key holds the module's whole
  structure: every submodule's type, ``training`` flag, plain attributes (a dropout
  rate, an activation's slope) and hooks; every parameter's and buffer's name, shape,
  dtype, device and ``requires_grad``; the estimator's settings; the inputs' shapes,
  dtypes and devices; the default dtype. Freezing a layer, ``.eval()`` on a submodule,
  a swapped layer or likelihood: each is a new key, so a new graph, never a stale one.
  Plain attributes are described by value, also inside containers, plain objects (a
  hyperparameter namespace) and function closures. One thing no key sees: a module-level
  global that the model or guide reads is baked in when the graph is captured; keep
  quantities that change between fits on the module, or train with ``compile=False``.
- **Checked when built.** The step that captures a graph runs it and the eager ELBO
  from the same RNG state and buffer values; the loss, every gradient and every buffer
  must agree (relative 1e-5), or that key runs eagerly with a warning.
- **No side effects.** Capturing runs on fake tensors. The checking step counts as
  exactly one step: buffers (BatchNorm statistics) are updated once and the RNG advances
  as one eager step would.
- **Eager where a graph would be wrong.** Inside any Pyro handler (the KL warm-up's
  :class:`~pyro_vae.training.schedules.LatentScale`, a user's ``poutine.scale``), under Pyro
  validation, autocast, or with gradients off (for the loss), for an owner that is not
  a ``torch.nn.Module``, a module with uninitialized (lazy) parameters, estimators not
  known to be static (:class:`~pyro_vae.objectives.free_bits.FreeBitsELBO` switches on a KL
  value), and models whose Python branches on tensor values, the ELBO runs eagerly.
- **Same numbers.** The graph holds the very operations autograd ran, so losses and
  gradients equal the eager ones (bit for bit on CPU in the tests). Two rewrites of the
  recorded graph change no value: operations that only repeat a value (an alias, ``x *
  1``, ``t(t(x))``) are dropped, and elementwise arithmetic on a buffer nothing reads
  afterwards runs in place, as eager autograd's own backward formulas do
  (:func:`~pyro_vae.objectives.capture.codegen.drop_identities`,
  :func:`~pyro_vae.objectives.capture.codegen.reuse_buffers`; tests compare with and
  without them).
- **Nothing kept by the process.** A model's graphs and the count of calls made on it
  live on the model (:class:`~pyro_vae.objectives.capture.graphs.GraphCache`): a second
  ``fit`` of the same model reuses its graphs, another model starts afresh.

Capturing costs time once: the first capture in a process imports torch's tracing stack,
and each graph takes time to capture and check.
:func:`~pyro_vae.objectives.capture.policy.capture_pays` weighs that against the Pyro
bookkeeping a graph saves per call, so that short work (a small evaluation, a tiny
training run) stays eager.

The modules, one idea each:

- :mod:`~pyro_vae.objectives.capture.compiled`: the captured loss and function, with
  their eager fallbacks
- :mod:`~pyro_vae.objectives.capture.policy`: when capturing pays
- :mod:`~pyro_vae.objectives.capture.keys`: what a graph bakes in (the module's key)
- :mod:`~pyro_vae.objectives.capture.dispatch`: which estimators' losses can be captured
- :mod:`~pyro_vae.objectives.capture.graphs`: one graph captured, checked, cached
- :mod:`~pyro_vae.objectives.capture.codegen`: the graph's rewrites and its replay function
"""

from __future__ import annotations

from pyro_vae.compat import NotCompilable
from pyro_vae.objectives.capture.codegen import drop_identities as drop_identities
from pyro_vae.objectives.capture.codegen import replay_function as replay_function
from pyro_vae.objectives.capture.codegen import reuse_buffers as reuse_buffers
from pyro_vae.objectives.capture.compiled import CompiledFunction, CompiledLoss
from pyro_vae.objectives.capture.compiled import largest as largest
from pyro_vae.objectives.capture.compiled import passes_fast as passes_fast
from pyro_vae.objectives.capture.compiled import square_sum as square_sum
from pyro_vae.objectives.capture.dispatch import traceable_loss as traceable_loss
from pyro_vae.objectives.capture.graphs import GraphCache
from pyro_vae.objectives.capture.keys import module_state
from pyro_vae.objectives.capture.policy import capture_pays

__all__ = [
    "CompiledFunction",
    "CompiledLoss",
    "GraphCache",
    "NotCompilable",
    "capture_pays",
    "module_state",
]
