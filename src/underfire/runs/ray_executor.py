"""Units as Ray tasks (the ``ray`` extra): a local cluster started for the run, or an existing one.

Each unit is one Ray task with the resources its interpreter (or attack) declares
(``[resources.NAME]``, ``UnitResources``). The driver alone writes: tasks return the unit's rows
and file contents, and the driver commits each as ``ray.wait`` hands it over, so a driver killed
at any moment resumes like a serial run. A task whose worker process dies is retried by Ray
(``max_retries``); a task that raises fails for good and is yielded as a ``UnitFailure`` (its one
line of error), which the driver records and a later resume retries.

Models and images reach a worker process once: the run's config (its TOML document) travels in
Ray's object store, and the first unit a process computes builds its ``UnitWorker`` from it
(loading the models, selecting the images), checks that it sees the same images as the driver
(their content digests), and keeps it for the process's next units (``_WORKERS``). Paths in the
config are resolved against the driver's working directory, which a local cluster shares.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import InputError, UnderfireError
from .executor import ComputeUnit, UnitFailure, UnitResult, rebuild_worker, worker_payload
from .plan import Unit
from .resources import UnitResources
from .worker import UnitWorker

#: Per worker process: the ``UnitWorker`` of each run it has served (by run token). Why a
#: process-level memo: a Ray task is a function call, and rebuilding the models for every unit
#: would cost more than many units compute.
_WORKERS: dict[str, UnitWorker] = {}


def import_ray() -> Any:
    """``ray``, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install -c constraints.txt 'underfire[ray]'") from None
    return ray


class RayExecutor:
    """Computes units as Ray tasks.

    Args:
        address: an existing cluster (``auto`` or ``HOST:PORT``); ``None`` starts a local one for
            the run, with ``num_cpus`` CPUs (default: all), and stops it afterwards.
        resources: ``[resources.NAME]`` demands by interpreter, attack or ``default``.
        max_retries: retries of a task whose worker process died (bounded).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        resources: Mapping[str, UnitResources] | None = None,
        max_retries: int = 2,
    ) -> None:
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InputError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.address = address
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.max_retries = max_retries

    def resources_for(self, unit: Unit) -> UnitResources:
        """A unit's demand: its interpreter's, else its attack's, else ``default``'s, else 1 CPU."""
        for name in (unit.interpreter, unit.attack, "default"):
            if name is not None and name in self.resources:
                return self.resources[name]
        return UnitResources()

    def run(self, compute: ComputeUnit, units: Sequence[Unit]) -> Iterator[UnitResult]:
        if not units:
            return
        if not isinstance(compute, UnitWorker):
            raise InputError("the Ray executor runs an experiment's UnitWorker")
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if self.address is not None:
                options["address"] = self.address
            elif self.num_cpus is not None:
                options["num_cpus"] = self.num_cpus
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise InputError(
                    f"cannot start or reach the Ray cluster ({self.address or 'local'}): {str(error).splitlines()[0]}"
                ) from None
        try:
            yield from self._run(ray, compute, units)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray: Any, compute: UnitWorker, units: Sequence[Unit]) -> Iterator[UnitResult]:
        payload = worker_payload(compute)
        token = f"{os.getpid()}-{id(compute)}-{hash(str(payload['config']))}"
        reference = ray.put(payload)
        task = ray.remote(_compute_unit)
        pending: dict[Any, Unit] = {}
        for unit in units:
            demand = self.resources_for(unit)
            handle = task.options(**demand.ray_options(), max_retries=self.max_retries, retry_exceptions=False).remote(
                token, [reference], unit, demand.threads
            )
            pending[handle] = unit
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for handle in done:
                unit = pending.pop(handle)
                try:
                    yield ray.get(handle)
                except ray.exceptions.RayTaskError as error:
                    yield UnitFailure(unit, _one_line(error), 1)
                except ray.exceptions.RayError as error:  # the worker died on every attempt, or the object was lost
                    yield UnitFailure(unit, _one_line(error), self.max_retries + 1)


def _compute_unit(token: str, payload: list[Any], unit: Unit, threads: int) -> Any:
    """A Ray task: one unit, on this process's ``UnitWorker`` for the run (built on first use)."""
    worker = _WORKERS.get(token)
    if worker is None:
        import ray

        worker = _WORKERS[token] = rebuild_worker(ray.get(payload[0]), threads)
    return worker(unit)


def _one_line(error: BaseException) -> str:
    """A failed task's cause in one line: the user error's message, else the exception's last line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, UnderfireError):
        return str(cause)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
    lines = [line for line in traceback.format_exception_only(type(error), error)[-1].splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(error).__name__
