"""Where independent runs execute: in this process, one after another, or as Ray tasks.

An executor maps a top-level function over a list of plain-data items (dicts of
strings, numbers and lists) and returns the results in the items' order. The function
is the same for both, and so is the number of torch intra-op threads each call runs
with (:func:`threads_per_run` of ``cpus_per_run``, 1 by default), so a run's result does
not depend on where it ran: on CPU the same seeds give bit-identical parameters and
evaluations. The thread count matters beyond speed: a float32 matrix product or sum
split over another number of threads adds in another order, and on some CPUs (AVX-512
kernels, for one) its result then differs in the last bits.

- :class:`SerialExecutor` calls the function in this process, with the torch threads a
  Ray task of the same ``cpus_per_run`` gets, and restores the caller's thread count
  after each call.
- :class:`RayExecutor` submits each call as a Ray task that requests ``cpus_per_run``
  CPUs (and ``gpus_per_run`` GPUs), sets ``torch.set_num_threads`` to its CPUs, and is
  retried up to ``max_retries`` times when its worker dies (a killed process, a lost
  node). A run function that checkpoints into its own folder and resumes from it makes
  the retry continue where the dead worker stopped.

``ray`` is an optional dependency, imported only when a Ray executor starts:
``pip install 'pyro-vae[ray]'``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from pyro_vae.errors import NonFiniteError, UserInputError

EXECUTOR_NAMES = ("serial", "ray")
#: CPUs a Ray task asks for, and so the torch threads of every run on either executor
DEFAULT_CPUS_PER_RUN = 1


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_run(cpus_per_run: float) -> int:
    """The torch intra-op threads of a run given ``cpus_per_run`` CPUs: one per whole CPU,
    at least one. Both executors use it, so that their runs sum in the same order."""
    return max(1, int(cpus_per_run))


def _with_threads(function: Callable[[Any], Any], threads: int | None, item: Any) -> Any:
    """``function(item)`` with ``threads`` torch intra-op threads (``None``: as they are)."""
    if threads is None:
        return function(item)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(item)
    finally:
        torch.set_num_threads(before)


class SerialExecutor:
    """Runs each item in this process, in order. ``threads``: torch threads per run,
    restored to the caller's after each (default: those of a Ray task with the default
    CPUs per run, so that serial and Ray results are equal bit for bit; ``None`` leaves
    torch's setting alone, and then the results may differ from Ray's in their last
    bits)."""

    name = "serial"

    def __init__(self, threads: int | None = threads_per_run(DEFAULT_CPUS_PER_RUN)) -> None:
        if threads is not None and threads < 1:
            raise UserInputError(f"threads per run must be >= 1, got {threads}")
        self.threads = threads

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *_: Any) -> None:
        pass

    def map(
        self,
        function: Callable[[Any], Any],
        items: Sequence[Any],
        log: Callable[[str], None] | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[Any]:
        results = []
        for index, item in enumerate(items):
            results.append(_with_threads(function, self.threads, item))
            if log is not None and labels is not None:
                log(f"finished {labels[index]} ({index + 1}/{len(items)})")
        return results


class RayExecutor:
    """Runs each item as a Ray task; see the module docstring.

    ``address``: ``None`` starts a local Ray on this machine with its CPUs (and shuts it
    down on exit); ``"auto"`` or ``"host:port"`` joins an existing cluster. When Ray is
    already initialized in this process (a test, a notebook), that instance is used and
    left running.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        cpus_per_run: float = DEFAULT_CPUS_PER_RUN,
        gpus_per_run: float = 0,
        max_retries: int = 3,
    ) -> None:
        if not cpus_per_run > 0:
            raise UserInputError(f"CPUs per run must be > 0, got {cpus_per_run}")
        if gpus_per_run < 0:
            raise UserInputError(f"GPUs per run must be >= 0, got {gpus_per_run}")
        if max_retries < 0:
            raise UserInputError(f"retries must be >= 0, got {max_retries}")
        if address is not None and not address.strip():
            raise UserInputError("the Ray address is empty: pass auto or host:port")
        self.address = address
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.max_retries = max_retries
        self._started = False
        self._ray: Any = None

    def __enter__(self) -> RayExecutor:
        self._ray = import_ray()
        ray = self._ray
        if not ray.is_initialized():
            options: dict[str, Any] = {
                "address": self.address,
                "include_dashboard": False,
                "log_to_driver": False,
            }
            if self.address is None:
                options["num_cpus"] = available_cpus()
            try:
                ray.init(**options)
            except ConnectionError as error:
                raise UserInputError(
                    f"cannot reach a Ray cluster at {self.address} "
                    f"({str(error).splitlines()[0] if str(error) else 'no reason given'}): "
                    f"start one (ray start --head), or pass no address for a local Ray"
                ) from None
            self._started = True
        return self

    def __exit__(self, *_: Any) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def map(
        self,
        function: Callable[[Any], Any],
        items: Sequence[Any],
        log: Callable[[str], None] | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[Any]:
        ray = self._ray
        if ray is None:
            raise RuntimeError("use the Ray executor inside a with block")
        total = ray.cluster_resources()
        if total.get("CPU", 0) < self.cpus_per_run or total.get("GPU", 0) < self.gpus_per_run:
            raise UserInputError(
                f"each run asks for {self.cpus_per_run:g} CPU(s) and {self.gpus_per_run:g} "
                f"GPU(s) but the Ray cluster has {total.get('CPU', 0):g} and "
                f"{total.get('GPU', 0):g}: ask for less per run"
            )
        threads = threads_per_run(self.cpus_per_run)
        task = ray.remote(
            num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run, max_retries=self.max_retries
        )(_with_threads)
        function_ref = ray.put(function)
        refs = [task.remote(function_ref, threads, item) for item in items]
        index_of = {ref: index for index, ref in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    ray.get(ref)  # raises now if the task failed, without waiting for the rest
                    if log is not None and labels is not None:
                        log(
                            f"finished {labels[index_of[ref]]} ({len(refs) - len(pending)}/"
                            f"{len(refs)})"
                        )
            results: list[Any] = ray.get(refs)
            return results
        except BaseException as error:  # a run failed, or ^C: the others stop too
            for ref in pending:
                ray.cancel(ref, force=True)
            cause = getattr(error, "cause", None)
            if isinstance(error, ray.exceptions.RayTaskError) and isinstance(
                cause, (UserInputError, NonFiniteError)
            ):
                raise cause from None  # one line, as in the serial executor
            raise


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserInputError(
            "the Ray executor needs Ray: pip install 'pyro-vae[ray]' (or '.[dev]' in a "
            "checkout), or use the serial executor"
        ) from None
    return ray


def make_executor(
    name: str,
    address: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float = 0,
    max_retries: int = 3,
) -> SerialExecutor | RayExecutor:
    """An executor by name: ``serial`` or ``ray``. ``cpus_per_run`` (default 1) is the
    CPUs each Ray task asks for and, on either executor, sets the torch threads of each
    run (:func:`threads_per_run`), so that the two give the same results bit for bit."""
    cpus = DEFAULT_CPUS_PER_RUN if cpus_per_run is None else cpus_per_run
    if name == "serial":
        if address is not None:
            raise UserInputError("a Ray address needs the Ray executor")
        return SerialExecutor(threads_per_run(cpus))
    if name == "ray":
        return RayExecutor(address, cpus, gpus_per_run, max_retries)
    raise UserInputError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTOR_NAMES)}")
