"""Any Pyro ELBO in every tool: a ``differentiable_loss`` for those that lack one.

The training step and the gradient tools ask an estimator for
``differentiable_loss(model, guide, *args)``, a tensor whose gradient is the estimator's
gradient. Pyro's ``RenyiELBO``, ``TraceGraph_ELBO`` and ``ReweightedWakeSleep`` offer only
``loss`` and ``loss_and_grads`` (which calls ``backward`` itself).
:class:`LossAndGradsAdapter` gives them the missing method: it runs ``loss_and_grads``,
takes the gradient it left on each parameter the programs registered (``pyro.param``,
``pyro.module``: the parameters Pyro's own ``SVI`` would step), puts back what was there
before, and returns the surrogate (in a private param store, as every tool runs the
programs, so that ``pyro.module`` hands out the module's own tensors)

    loss + sum_theta <theta - stop_gradient(theta), g_theta>,

whose value is the ELBO's loss and whose gradient is exactly ``g``. A loss that is a pair
(``ReweightedWakeSleep``: the model's wake-theta loss and the guide's loss) reports its
first member as the value; the gradient is that of both, as Pyro steps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from pyro.poutine.messenger import Messenger

from pyro_vae.models.protocol import private_param_store
from pyro_vae.models.vae import param_store_registration, program_owner

__all__ = ["LossAndGradsAdapter", "as_objective"]


class _FreshGrads(Messenger):
    """Sets aside the ``.grad`` of each parameter the programs register, the first time
    each is seen (before any backward pass), so that what ``loss_and_grads`` leaves
    there afterwards is its gradient alone."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _pyro_post_param(self, msg: dict[str, Any]) -> None:
        value = msg["value"]
        unconstrained = getattr(value, "unconstrained", None)
        tensor = unconstrained() if callable(unconstrained) else value
        if torch.is_tensor(tensor) and tensor.is_leaf and id(tensor) not in self.saved:
            self.saved[id(tensor)] = (tensor, tensor.grad)
            tensor.grad = None


@contextmanager
def _registering(*programs: Callable) -> Iterator[None]:
    """The programs' ``pyro.module`` registration on (for the models they are methods
    of: Pyro's ``loss_and_grads`` steps what they register), in a private param store."""
    with ExitStack() as stack:
        owners = {id(o): o for o in map(program_owner, programs) if o is not None}
        for owner in owners.values():
            stack.enter_context(param_store_registration(owner, True))
        stack.enter_context(private_param_store())
        yield


def _value(loss: Any) -> float:
    if isinstance(loss, (tuple, list)):
        loss = loss[0]
    return float(loss.item() if torch.is_tensor(loss) else loss)


class LossAndGradsAdapter:
    """``elbo`` (a Pyro ELBO without ``differentiable_loss``) with one; every other
    attribute is the ELBO's own.

    :param elbo: the ELBO, e.g. ``pyro.infer.RenyiELBO(alpha=0.5, num_particles=5)``.
    :param name: its name, for messages.
    """

    def __init__(self, elbo: Any, name: str = "") -> None:
        self.elbo = elbo
        self.name = name or type(elbo).__name__

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "elbo":  # (not yet set: unpickling)
            raise AttributeError(attribute)
        return getattr(self.elbo, attribute)

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The ELBO's loss (its first member, for a pair)."""
        with _registering(model, guide):
            return _value(self.elbo.loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The ELBO's ``loss_and_grads``: gradients accumulate into the parameters."""
        with _registering(model, guide):
            return _value(self.elbo.loss_and_grads(model, guide, *args, **kwargs))

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The surrogate of the module's docstring: its value is the loss, its gradient
        the ELBO's gradient (for the parameters the programs register)."""
        fresh = _FreshGrads()
        try:
            with _registering(model, guide), fresh:
                loss = self.elbo.loss_and_grads(model, guide, *args, **kwargs)
        except BaseException:
            for tensor, grad in fresh.saved.values():
                tensor.grad = grad
            raise
        surrogate = torch.tensor(_value(loss))
        for tensor, grad in fresh.saved.values():
            gradient, tensor.grad = tensor.grad, grad
            if gradient is not None:
                surrogate = surrogate + ((tensor - tensor.detach()) * gradient).sum()
        if not surrogate.requires_grad:
            raise_no_gradient(self.name)
        return surrogate


def raise_no_gradient(name: str) -> None:
    from pyro_vae.models.protocol import ModelError

    raise ModelError(
        f"estimator {name} gave no gradient to any parameter the model or guide registers: "
        f"register the networks with pyro.module (Pyro's ELBOs step only those)"
    )


def as_objective(elbo: Any, name: str = "") -> Any:
    """``elbo`` itself when it has ``differentiable_loss``, else wrapped in
    :class:`LossAndGradsAdapter`; one line naming what is missing when it has neither."""
    if hasattr(elbo, "differentiable_loss"):
        return elbo
    if hasattr(elbo, "loss_and_grads"):
        return LossAndGradsAdapter(elbo, name)
    from pyro_vae.errors import UserInputError

    raise UserInputError(
        f"estimator {name or type(elbo).__name__} built a {type(elbo).__name__}, which has "
        f"neither differentiable_loss nor loss_and_grads: return a Pyro ELBO"
    )
