"""``fit``: stochastic variational inference for a VAE, with checkpoints that survive crashes.

Each step computes the estimator's loss (``elbo.differentiable_loss``, a Pyro ELBO on
the Pyro model and guide) and its gradients, checks that both are finite, and only then
lets the optimizer step. The loss and gradients come from a graph captured from that
ELBO and checked against it (:mod:`pyro_vae.objectives.capture`; about 1 ms less per step,
measured) when the run is long enough to repay the capture, or from the ELBO itself
(``compile=False``, short runs, KL warm-up, free bits). The networks train in the modes
the caller left them in; every evaluation switches them to eval mode and back.

The finite check before each step is why the loop does not call
``pyro.infer.SVI.step``, which steps at once; and the optimizer is a ``torch.optim``
optimizer over the VAE's parameters, whose ``state_dict`` covers every parameter whether
or not it has stepped (Pyro's ``PyroOptim.get_state`` covers only those that have, so a
load-then-save before a step would lose state). Since the param store is not used, the
model and guide skip ``pyro.module`` while training (see
:func:`pyro_vae.models.vae.param_store_registration`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae import distributed
from pyro_vae.analysis.evaluation import active_units, evaluate_elbo, evaluation_mode, fixed_subset
from pyro_vae.config import TrainConfig
from pyro_vae.data import VAEData
from pyro_vae.errors import CheckpointError, NonFiniteError, Preempted, UserInputError
from pyro_vae.io import atomic_write_text, dumps_json
from pyro_vae.models.protocol import forked_rng, plate_nesting, private_param_store, scaled
from pyro_vae.models.vae import param_store_registration
from pyro_vae.objectives.capture import CompiledLoss, capture_pays, largest
from pyro_vae.objectives.free_bits import FreeBitsELBO
from pyro_vae.objectives.registry import (
    Objective,
    check_estimator_fits,
    estimator_spec,
    make_elbo,
)
from pyro_vae.training import preemption
from pyro_vae.training.checkpoint import (
    load_checkpoint,
    non_finite,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pyro_vae.training.schedules import LatentScale, learning_rate, make_adam

CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "best.pt"
METRICS = "metrics.jsonl"
#: Adam squares every gradient entry into its second moment: entries above this overflow
#: float32 there (sqrt of float32's largest value), leaving inf in the optimizer state
GRADIENT_LIMIT = math.sqrt(torch.finfo(torch.float32).max)
#: under torchrun: steps timed before the collectives' timeout is set from their time
TIMED_STEPS = 5


@dataclass
class History:
    """Per-epoch metrics of a run (nats per data point; higher ELBO is better)."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    best_epoch: int | None = None

    def __getitem__(self, key: str) -> list[Any]:
        return [epoch.get(key) for epoch in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def last(self) -> dict[str, Any]:
        return self.epochs[-1] if self.epochs else {}


Callback = Callable[[dict[str, Any]], None]


class Trainer:
    """The state of a training run: optimizer, schedule, RNGs, step counters, history."""

    def __init__(
        self,
        vae,
        data: VAEData,
        config: TrainConfig,
        run_dir: str | Path | None = None,
        saved_config: dict[str, Any] | None = None,
    ) -> None:
        self.vae = vae.to(config.device)
        self.data = data
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.saved_config = (
            saved_config if saved_config is not None else {"train": config.to_dict()}
        )
        #: the estimator's spec: what it is and what may be assumed of it
        self.estimator = spec = estimator_spec(config.estimator)
        check_estimator_fits(spec, vae, data.train.images[:2])
        self.elbo: Objective
        # the particle plate's place is known before the first step: no estimator has to
        # find it while the fast path captures its graph
        nesting = plate_nesting(self.vae, data.train.images[:2])
        if config.free_bits:
            kl = "analytic" if spec.name == "analytic" else "mc"
            self.elbo = FreeBitsELBO(config.particles, config.free_bits, kl, nesting)
        else:
            self.elbo = spec.build(
                config.particles, max_plate_nesting=nesting, options=config.estimator_options
            )
        # the value the history records: the estimator's own, or for one without a value
        # (a surrogate only) the Monte Carlo ELBO of the same batch
        self.value_elbo: Objective = (
            self.elbo if spec.has_value else make_elbo("mc", max_plate_nesting=nesting)
        )
        # the step's loss and gradients: the ELBO's, replayed from a captured graph; the
        # trainer refreshes the graph's view of the networks at the start of each epoch
        self.loss = CompiledLoss(
            self.elbo, self.vae, refresh_every_call=False, capture=spec.capture
        )
        # every parameter: frozen ones get no gradient and are skipped by the step, and a
        # callback may unfreeze them between epochs
        self.parameters = list(vae.parameters())
        self.optimizer: torch.optim.Optimizer
        if config.optimizer == "adam":
            self.optimizer = make_adam(self.parameters, config.lr, config.adam_epsilon)
        else:
            from pyro.optim.clipped_adam import ClippedAdam

            self.optimizer = ClippedAdam(
                self.parameters, lr=config.lr, eps=config.adam_epsilon, clip_norm=config.clip_norm
            )
        self.data_generator = torch.Generator().manual_seed(config.seed)
        # under torchrun: this process's rank among world_size, all training one model
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.buffers = list(self.vae.buffers())
        self.num_data = len(data.train)
        self.steps_per_epoch = math.ceil(self.num_data / config.batch_size)
        self.epoch = 0
        self.step = 0
        self.history = History()
        self.best_elbo = -math.inf
        self.epochs_since_best = 0
        self.finished = False
        #: where a run stopped inside an epoch (a preempted run): steps done in the epoch,
        #: the partial sums of its bound, and the data generator's state before the
        #: epoch's permutation was drawn (the permutation is drawn again from it)
        self.position: dict[str, Any] | None = None
        #: the step-path decision (captured graph or eager) of the run as started, kept so
        #: that a resumed run takes the same path (the two agree in the parameters bit for
        #: bit but may round the reported bound differently)
        self._compiled: tuple[bool, int] | None = None
        self.data_digest = data.digests()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.data_generator),
            "epoch": self.epoch,
            "step": self.step,
            "config": self.saved_config,
            "history": self.history.epochs,
            "best_epoch": self.history.best_epoch,
            "stopped_early": self.history.stopped_early,
            "best_elbo": self.best_elbo,
            "epochs_since_best": self.epochs_since_best,
            "finished": self.finished,
            "position": self.position,
            "data_digest": self.data_digest,
            **({"compiled": list(self._compiled)} if self._compiled is not None else {}),
            # every process's RNGs (the data order is shared; the noise is each rank's)
            **(
                {"rng_ranks": distributed.gather_objects(rng_state(self.data_generator))}
                if self.world > 1
                else {}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.vae.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            ranks = state.get("rng_ranks")
            if ranks is not None and len(ranks) == self.world:
                set_rng_state(ranks[self.rank], self.data_generator)
            else:
                set_rng_state(state["rng"], self.data_generator)
                if self.rank > 0:  # resumed with more processes than saved: fresh noise
                    torch.manual_seed(rank_seed(self.config.seed, self.rank, int(state["step"])))
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            self.history = History(
                list(state["history"]), bool(state["stopped_early"]), state["best_epoch"]
            )
            self.best_elbo = float(state["best_elbo"])
            self.epochs_since_best = int(state["epochs_since_best"])
            self.finished = bool(state["finished"])
            self.position = _checked_position(state.get("position"), self.steps_per_epoch)
            compiled = state.get("compiled")
            self._compiled = (bool(compiled[0]), int(compiled[1])) if compiled else None
        except (KeyError, RuntimeError, ValueError, TypeError) as error:
            raise CheckpointError(
                f"the checkpoint does not fit this model or version ({str(error).splitlines()[0]}):"
                f" resume with the run's own config.json, or start over (`overwrite`)"
            ) from None
        check_data_digest(state.get("data_digest"), self.data_digest, "resume")

    def save(self, path: Path | None = None) -> None:
        """Checkpoint the run: every process takes part (the RNG states are gathered),
        the first writes, and all wait until it has written."""
        if self.run_dir is None:
            return
        state = self.state_dict()
        if distributed.is_main():
            save_checkpoint(path or self.run_dir / CHECKPOINT, **state)
        distributed.barrier()

    # ------------------------------------------------------------------ training
    def kl_factor(self, step: int) -> float:
        """KL factor of step ``step`` (0-based): rises linearly to 1 over the warm-up."""
        warmup_steps = self.config.kl_warmup_epochs * self.steps_per_epoch
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    def train_epoch(self, progress: bool = True) -> float:
        """One pass over the training set; returns the mean training bound per data point."""
        from tqdm.auto import tqdm

        config, vae = self.config, self.vae
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.epoch)
        # the epoch's permutation, from the data generator's state at the epoch's start
        # (a run resumed mid-epoch draws it again from the state its checkpoint kept)
        position, self.position = self.position, None
        order: torch.Tensor | None = None  # (None: drawn by the batches, as always)
        if position is None:
            epoch_rng = self.data_generator.get_state()
            first, total, count, elapsed = 0, 0.0, 0, 0.0
        else:
            epoch_rng = position["epoch_rng"]
            replay = torch.Generator().set_state(epoch_rng)
            order = torch.randperm(self.num_data, generator=replay)
            first, total, count = position["steps"], position["total"], position["count"]
            elapsed = position["seconds"]
        started, done = time.perf_counter(), first
        # what a failed epoch goes back to (a few MB, once per epoch)
        self._epoch_start = (
            copy.deepcopy(vae.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
            self.step,
        )
        self.loss.refresh()  # the networks as they are now (a callback may have changed them)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=first,
            desc=f"epoch {self.epoch + 1}/{config.epochs}",
            leave=False,
            disable=None if progress else True,
            unit="step",
        )
        with (
            pyro.validation_enabled(False),  # the data were checked once, up front
            param_store_registration(self.vae, False),
            private_param_store(),  # a model's pyro.module calls never touch the global store
            bar,
            warnings.catch_warnings(),
        ):
            # a NaN is reported by _check_finite, with the epoch and step
            warnings.filterwarnings("ignore", message="Encountered (NaN|[+-]inf)")
            for batch, size in self._batches(order, first):
                batch = batch.to(config.device, non_blocking=True)
                # this process's part of a global batch of `size` points, scaled so that
                # the mean over the processes is the global batch's bound for the data set
                scale = self.num_data * self.world / size
                factor = self.kl_factor(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                if batch.shape[0] == 0:  # (a last batch smaller than the processes)
                    loss = reported = 0.0
                elif factor < 1.0 or self.value_elbo is not self.elbo:
                    with LatentScale(factor):
                        loss = self._loss_and_grads(batch, scale)
                    with torch.no_grad():  # the bound itself, unannealed, for the record
                        reported = self.value_elbo.loss(
                            scaled(vae.model, scale), scaled(vae.guide, scale), batch
                        )
                else:
                    loss = reported = self._loss_and_grads(batch, scale)
                grad_max = self.loss.grad_max if batch.shape[0] else None
                stop = preemption.requested() is not None
                if self.world > 1:  # the same averaged step on every process
                    mean, stop = distributed.average_step_and_flag(
                        loss, self.parameters, self.buffers, stop
                    )
                    if factor < 1.0 or self.value_elbo is not self.elbo:
                        reported = distributed.all_sum([reported])[0] / self.world
                    else:
                        reported = mean
                    loss, grad_max = mean, None
                # (a surrogate without a value is checked through the value recorded)
                checked = loss if self.value_elbo is self.elbo else -reported
                self._check_step(checked, grad_max)  # None after an eager step
                self.optimizer.step()
                self.step += 1
                if self.world > 1 and done + 1 - first == TIMED_STEPS:  # the step time known
                    seconds = (time.perf_counter() - started) / TIMED_STEPS
                    distributed.set_collective_timeout(distributed.collective_timeout(seconds))
                total += -reported / self.num_data * size
                count += size
                done += 1
                bar.update()
                if bar.n % 10 == 0 or bar.n == self.steps_per_epoch:
                    bar.set_postfix_str(f"elbo {total / count:.2f}", refresh=False)
                if self.budget_spent(elapsed + time.perf_counter() - started):
                    break  # (max_steps or max_seconds: the epoch ends here, its record kept)
                if stop and done < self.steps_per_epoch:
                    self.position = {
                        "steps": done,
                        "total": total,
                        "count": count,
                        "epoch_rng": epoch_rng,
                        "seconds": elapsed + time.perf_counter() - started,
                    }
                    self.save()
                    raise self._preempted(done)
        self._epoch_seconds = elapsed + time.perf_counter() - started
        return total / count

    _epoch_seconds = 0.0

    def budget_spent(self, epoch_seconds: float = 0.0) -> bool:
        """Whether ``max_steps`` steps are taken, or the training steps of the finished
        epochs (their ``seconds``) and ``epoch_seconds`` of this one reach ``max_seconds``."""
        config = self.config
        if config.max_steps is not None and self.step >= config.max_steps:
            return True
        if config.max_seconds is None:
            return False
        return sum(self.history["seconds"]) + epoch_seconds >= config.max_seconds

    def _preempted(self, steps: int | None = None) -> Preempted:
        """The stop a signal asked for, once the checkpoint holds the position."""
        number = preemption.requested() or 15
        preemption.clear()
        if steps is None:
            where = f"after epoch {self.epoch}"
        else:
            where = f"in epoch {self.epoch + 1} after step {steps} of {self.steps_per_epoch}"
        saved = (
            f"the checkpoint ({self.run_dir / CHECKPOINT}) holds the run {where}"
            if self.run_dir is not None
            else f"stopped {where}"
        )
        return Preempted(
            f"stopped by {preemption.signal_name(number)}: {saved}; resume the run "
            f"(`resume`) to continue it from there, bit for bit",
            number,
        )

    def _stop_requested(self) -> bool:
        """Whether any process was asked to stop (all agree: the same answer everywhere)."""
        stop = preemption.requested() is not None
        if self.world > 1:
            stop = distributed.all_sum([float(stop)])[0] > 0
            if stop and preemption.requested() is None:
                preemption.request()
        return stop

    def _batches(self, order: torch.Tensor | None, first: int = 0):
        """``(batch, global size)`` for each step of an epoch from batch ``first`` of
        permutation ``order`` on: the whole batch in one
        process; under torchrun this process's part of the global batch. Every process
        draws the same permutation (the data generator is seeded alike and advances
        alike); each binarizes its part with noise of its own, seeded by (seed, rank,
        step), so the noise needs no state of its own to resume."""
        config = self.config
        if self.world == 1:
            if order is None:  # (the epoch from its start: the data draw the permutation)
                batches = self.data.batches(config.batch_size, self.data_generator)
            else:
                batches = self.data.batches(config.batch_size, self.data_generator, order, first)
            for batch in batches:
                yield batch, batch.shape[0]
            return
        train = self.data.train.images
        if order is None:
            order = torch.randperm(len(train), generator=self.data_generator)
        for index in range(first, self.steps_per_epoch):
            start = index * config.batch_size
            indices = order[start : start + config.batch_size]
            batch = train[distributed.batch_part(indices)]
            if self.data.binarize == "dynamic":
                seed = rank_seed(config.seed, self.rank, self.step + index)
                batch = torch.bernoulli(batch, generator=torch.Generator().manual_seed(seed))
            yield batch, len(indices)

    def _loss_and_grads(self, batch: torch.Tensor, scale: float) -> float:
        """The estimator's loss (a float) and its gradient in the parameters' ``.grad``.

        The mini-batch's bound is scaled to the data set by ``poutine.scale`` around model
        and guide (``scale``: ``num_data / batch`` in one process), so a model needs no
        ``num_data`` argument."""
        return self.loss.loss_and_grads(batch, scale=scale)

    def _check_step(self, loss: float, grad_max: float | None) -> None:
        """Stop the run, with a true message, unless the step about to be taken is safe.

        Safe: a finite loss, finite gradients (``grad_max``, the largest gradient entry in
        magnitude: the captured graph computes it as each gradient is produced; after an
        eager step it is computed here), and, for Adam, gradients whose squares fit in
        float32 (Adam's second moment holds them: an overflow there leaves ``inf`` in the
        optimizer state). If the parameters themselves are no longer finite, an earlier
        update of this epoch overflowed: the model and optimizer go back to their state
        at the start of the epoch before the error is raised.
        """
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return
        if grad_max is None:
            grad_max = float(torch.stack([largest(g) for g in grads]).amax())
        limit = GRADIENT_LIMIT if self.config.optimizer == "adam" else math.inf
        if math.isfinite(loss) and math.isfinite(grad_max) and grad_max <= limit:
            return
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        where = f"epoch {self.epoch + 1}, step {self.step + 1}"
        kept = (
            f"; the last checkpoint ({self.run_dir / CHECKPOINT}, epoch {self.epoch}) is intact"
            if self.run_dir is not None and self.epoch > 0
            else ""
        )
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters):
            self._restore_epoch_start()
            raise NonFiniteError(
                f"an update before {where} overflowed: the parameters became non-finite with "
                f"learning rate {lr:g}; the model is back at its state at the start of epoch "
                f"{self.epoch + 1}{kept}. Lower the learning rate (`lr`)"
            )
        if not (math.isfinite(loss) and math.isfinite(grad_max)):
            what = "loss" if not math.isfinite(loss) else "gradient"
            raise NonFiniteError(
                f"non-finite {what} at {where} (loss {loss:g}, largest gradient entry "
                f"{grad_max:g}); the step was not taken, the parameters are finite{kept}. "
                f"Likely causes: a learning rate too high (now {lr:g}: lower `lr`), data "
                f"outside the likelihood's support, or a too aggressive estimator setting"
            )
        raise NonFiniteError(
            f"gradient entries up to {grad_max:.3g} at {where}: Adam squares them, which "
            f"overflows float32 (above {GRADIENT_LIMIT:.3g}); the step was not taken{kept}. "
            f"Lower the learning rate (now {lr:g}: `lr`), or use `optimizer='clipped_adam'`"
        )

    def _check_epoch(self) -> None:
        """After an epoch, before anything is written: parameters and optimizer state are
        all finite, or the model goes back to the epoch's start and the run stops."""
        for part, state in (
            ("parameters", self.vae.state_dict()),
            ("optimizer state", self.optimizer.state_dict()["state"]),
        ):
            bad = non_finite(state)
            if bad is not None:
                lr = self.optimizer.param_groups[0]["lr"]
                self._restore_epoch_start()
                raise NonFiniteError(
                    f"the {part} became non-finite during epoch {self.epoch + 1} ({bad}) with "
                    f"learning rate {lr:g}; the model is back at its state at the start of "
                    f"the epoch and nothing of the epoch was written. Lower the learning rate "
                    f"(`lr`)"
                )

    def _restore_epoch_start(self) -> None:
        model, optimizer, step = self._epoch_start
        self.vae.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)
        self.step = step

    _epoch_start: tuple[dict, dict, int]

    def monitor_images(self) -> torch.Tensor:
        """The test images evaluated after every epoch: all of them, or with
        ``config.monitor_images`` a fixed random subset of that many (the same in every
        run and epoch: a seeded permutation, so that curves are comparable; not the first
        images, since MNIST's first 5,000 test images are the easier half). The full test
        set is evaluated at the end of a run (``pyro-vae train``, ``evaluate``)."""
        images = self.data.evaluation_images("test")
        if self._monitor is None or self._monitor[0] is not images:
            self._monitor = (images, fixed_subset(images, self.config.monitor_images))
        return self._monitor[1]

    _monitor: tuple[torch.Tensor, torch.Tensor] | None = None

    def evaluate(self) -> dict[str, float]:
        """Test (and validation) ELBO with its terms and active units, with an RNG forked
        from the run's, in eval mode (the networks' modes are restored afterwards). The
        test set is :meth:`monitor_images`; ``test_images`` records how many."""
        config = self.config
        metrics: dict[str, float] = {}
        with (
            forked_rng(),
            pyro.validation_enabled(False),
            evaluation_mode(self.vae),
        ):
            torch.manual_seed(config.seed * 100_003 + self.epoch)
            splits = [("test", self.monitor_images())]
            if len(self.data.validation):
                splits.append(("validation", self.data.evaluation_images("validation")))
            for split, images in splits:
                values = evaluate_elbo(
                    self.vae, images, config.eval_particles, device=config.device
                )
                metrics.update({f"{split}_{name}": value for name, value in values.items()})
            units = active_units(self.vae, splits[0][1].to(config.device))
            metrics["test_images"] = len(splits[0][1])
            metrics["test_active_units"] = units["active_units"]
            if len(units["by_site"]) > 1:
                for site, counts in units["by_site"].items():
                    metrics[f"test_active_units_{site}"] = counts["active"]
        return metrics

    def run(
        self,
        callbacks: Iterable[Callback] = (),
        progress: bool = True,
        log: Callable | None = print,
    ) -> History:
        config = self.config
        if self._compiled is not None and self._compiled[1] == config.epochs:
            self.loss.enabled = self._compiled[0]  # resumed: the path the run started on
        else:
            self.loss.enabled = self.compiles()
            self._compiled = (self.loss.enabled, config.epochs)
        if self.loss.enabled and self.loss.loss_fn is None:
            warnings.warn(
                f"pyro-vae: the loss runs eagerly: {self.loss.eager_reason}", stacklevel=2
            )
        # a run folder keeps the position on SIGTERM/SIGUSR1: they stop it after the step
        watching = preemption.watch() if self.run_dir is not None else contextlib.nullcontext(False)
        with watching:
            return self._run(callbacks, progress, log)

    def _run(self, callbacks: Iterable[Callback], progress: bool, log: Callable | None) -> History:
        config = self.config
        if self.epoch == 0 and self.step == 0:
            self.save()  # a good checkpoint exists from the start
        elif self.history.epochs:
            self._write_metrics()  # resumed: metrics.jsonl matches the checkpoint again
        while self.epoch < config.epochs and not self.finished and not self.budget_spent():
            if self.run_dir is not None and self._stop_requested():
                raise self._preempted()
            train_elbo = self.train_epoch(progress)
            self._check_epoch()
            seconds = self._epoch_seconds
            self.epoch += 1
            eval_started = time.perf_counter()
            metrics = {
                "epoch": self.epoch,
                "step": self.step,
                "train_elbo": train_elbo,
                **self.evaluate(),
                "seconds": seconds,
                "eval_seconds": time.perf_counter() - eval_started,
                "lr": self.optimizer.param_groups[0]["lr"],
                "kl_factor": self.kl_factor(self.step - 1),  # of the epoch's last step
            }
            self.history.epochs.append(metrics)
            stop = self._early_stopping(metrics)
            self.finished = stop or self.epoch >= config.epochs or self.budget_spent()
            # metrics first: a kill between the two leaves metrics one epoch ahead of the
            # checkpoint, which the resumed run rewrites (the other order loses a line)
            self._write_metrics()
            self.save()
            if log is not None and distributed.is_main():
                log(format_epoch(metrics, config.epochs))
            for callback in callbacks:
                callback(metrics)
        if self.run_dir is not None and self._stop_requested():
            raise self._preempted()  # (trained: the command's evaluation is left to the resume)
        if self.history.stopped_early and self.run_dir is not None:
            self.vae.load_state_dict(load_checkpoint(self.run_dir / BEST_CHECKPOINT)["model"])
        elif self.history.stopped_early and self._best_state is not None:
            self.vae.load_state_dict(self._best_state)
        return self.history

    _best_state: dict[str, torch.Tensor] | None = None

    def compiles(self) -> bool:
        """Whether steps replay a captured graph: ``config.compile``, or with ``"auto"``,
        whether capturing pays (:func:`~pyro_vae.objectives.capture.capture_pays`).

        The work counted is the steps left in this run plus the steps this module has
        already taken in this process: a caller who fits one epoch at a time in a loop
        trains eagerly until the eager steps have cost about what a capture costs, and
        from then on from graphs (the ski-rental rule: never more than about twice the
        best choice made in hindsight). Graphs already cached for the module as it is
        now cost nothing to capture.
        """
        if self.config.compile != "auto":
            return bool(self.config.compile)
        shapes = 2 if self.num_data % self.config.batch_size else 1
        needed = max(0, shapes - self.loss.cached_graphs())
        steps = max(0, self.config.epochs - self.epoch) * self.steps_per_epoch
        return capture_pays(steps + self.loss.calls(), graphs=needed)

    def _early_stopping(self, metrics: dict[str, float]) -> bool:
        if "validation_elbo" not in metrics:
            return False
        if metrics["validation_elbo"] > self.best_elbo:
            self.best_elbo = metrics["validation_elbo"]
            self.history.best_epoch = self.epoch
            self.epochs_since_best = 0
            self._best_state = copy.deepcopy(self.vae.state_dict())
            self.save(self.run_dir / BEST_CHECKPOINT if self.run_dir else None)
            return False
        self.epochs_since_best += 1
        patience = self.config.early_stopping_patience
        if patience and self.epochs_since_best >= patience:
            self.history.stopped_early = True
            return True
        return False

    def _write_metrics(self) -> None:
        if self.run_dir is None or not distributed.is_main():
            return
        lines = "".join(dumps_json(epoch) + "\n" for epoch in self.history.epochs)
        atomic_write_text(lines, self.run_dir / METRICS)


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    """One line per epoch: the bound, the test ELBO and its two terms, the time."""
    line = (
        f"epoch {metrics['epoch']:>3}/{epochs}  train {metrics['train_elbo']:9.3f}  "
        f"test elbo {metrics['test_elbo']:9.3f} = E[log p(x|z)] "
        f"{metrics['test_expected_log_likelihood']:9.3f} - KL {metrics['test_kl']:7.3f}"
    )
    if "validation_elbo" in metrics:
        line += f"  valid {metrics['validation_elbo']:9.3f}"
    return line + f"  {metrics['seconds']:6.2f} s"


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for process ``rank`` at ``step`` of the run seeded ``seed`` (distinct for
    every triple in practice; 63 bits)."""
    mixed = (seed * 1_000_003 + rank) * 2_654_435_761 + step * 40_503
    return mixed % (2**63 - 1)


def _checked_position(position: Any, steps_per_epoch: int) -> dict[str, Any] | None:
    """A checkpoint's mid-epoch position, checked (``None``: at an epoch's end)."""
    if position is None:
        return None
    if not isinstance(position, dict):
        raise TypeError("its mid-epoch position is not a dictionary")
    steps, count = position.get("steps"), position.get("count")
    if not (isinstance(steps, int) and isinstance(count, int) and 0 < steps < steps_per_epoch):
        raise ValueError(
            f"its mid-epoch position ({steps!r} steps) is not inside an epoch of "
            f"{steps_per_epoch} steps"
        )
    if not isinstance(position.get("total"), float) or not torch.is_tensor(
        position.get("epoch_rng")
    ):
        raise TypeError("its mid-epoch position lacks the epoch's sums or data order")
    return {**position, "seconds": float(position.get("seconds", 0.0))}


def check_data_digest(saved: Any, current: dict[str, str], action: str) -> None:
    """Refuse to ``action`` a run on data other than it was trained on: ``saved`` is the
    run's record of its data's SHA-256 by split (none in runs written before it was
    kept: nothing to compare), ``current`` that of the data loaded now."""
    if not isinstance(saved, dict):
        return
    for split in ("train", "validation", "test"):
        before, now = saved.get(split), current.get(split)
        if isinstance(before, str) and now is not None and before != now:
            raise UserInputError(
                f"the {split} data differ from those the run was trained on (SHA-256 "
                f"{before[:16]}... in the run, {now[:16]}... now): restore the data the run "
                f"was trained on to {action} it, or start a new run"
            )
