"""Units side by side in worker processes on this machine (``underfire run --executor local``).

Why processes: one unit of the built-in models cannot keep two cores busy (its tensors are small,
and torch's threads mostly wait for each other), while two units, one thread each, do. Why whole
batches per process: the units of one batch share its benign maps (a MASK map is hundreds of
iterations), which a process computes once and reuses, as the serial executor does.

The driver alone writes, as with every executor: each process builds its own ``UnitWorker`` from
the run's config (``executor.rebuild_worker``), takes the next batch's units from a queue, and
sends each unit's output back as soon as it is done; the driver commits it. A unit that raises
fails alone (its one-line error is yielded as a ``UnitFailure``); a process that dies fails the
units it held, which the next resume retries.
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import InputError, UnderfireError
from .executor import ComputeUnit, SerialExecutor, UnitFailure, UnitResult, rebuild_worker, worker_payload
from .plan import Unit
from .worker import UnitWorker

#: How often the driver looks at its worker processes while it waits for an output (seconds).
_POLL_SECONDS = 1.0


class LocalExecutor:
    """Computes a run's batches in ``workers`` processes of this machine, ``threads`` torch
    threads each."""

    def __init__(self, workers: int, threads: int = 1, announce: Callable[[str], None] | None = None) -> None:
        for name, value in (("workers", workers), ("threads", threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"the local executor's {name} must be an integer >= 1, got {value!r}")
        self.workers = workers
        self.threads = threads
        self.announce = announce

    def run(self, compute: ComputeUnit, units: Sequence[Unit]) -> Iterator[UnitResult]:
        if not units:
            return
        if not isinstance(compute, UnitWorker):
            raise InputError("the local executor runs an experiment's UnitWorker")
        groups = batch_groups(units)
        if self.workers < 2 or len(groups) < 2:  # nothing to run side by side: this process does it
            yield from SerialExecutor().run(compute, units)
            return
        if self.announce is not None:
            count = min(self.workers, len(groups))
            self.announce(
                f"{count} worker processes side by side, {self.threads} torch "
                f"{'thread' if self.threads == 1 else 'threads'} each, one batch at a time each"
            )
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch threads
        tasks, results = context.Queue(), context.Queue()
        for index, group in enumerate(groups):
            tasks.put((index, list(group)))
        count = min(self.workers, len(groups))
        for _ in range(count):
            tasks.put(None)
        payload = worker_payload(compute)
        processes = [
            context.Process(target=_serve, args=(payload, self.threads, tasks, results), daemon=True)
            for _ in range(count)
        ]
        for process in processes:
            process.start()
        held: dict[int, tuple[int, list[Unit]]] = {}  # pid → (group index, its units not yet back)
        left = len(units)
        try:
            while left:
                try:
                    message = results.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    message = None
                if message is None:
                    for failure in _dead(processes, held):
                        left -= 1
                        yield failure
                    if left and not any(p.is_alive() for p in processes) and results.empty():
                        raise InputError("every worker process of the local executor stopped before the run ended")
                    continue
                kind, pid, body = message
                if kind == "start":
                    index = body
                    held[pid] = (index, list(groups[index]))
                    continue
                unit = body[0] if kind == "failed" else body.unit
                if pid in held:
                    held[pid][1].remove(unit)
                left -= 1
                yield UnitFailure(unit, body[1]) if kind == "failed" else body
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
                process.join(timeout=5)


def batch_groups(units: Sequence[Unit]) -> list[list[Unit]]:
    """The units in runs of the same model and batch, in plan order: what one process computes
    together (they share the batch's benign maps)."""
    groups: list[list[Unit]] = []
    for unit in units:
        if groups and (groups[-1][0].model, groups[-1][0].batch) == (unit.model, unit.batch):
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return groups


def _dead(processes: Sequence[Any], held: dict[int, tuple[int, list[Unit]]]) -> list[UnitFailure]:
    """Failures for the units a process held when it died (each once)."""
    failures = []
    for process in processes:
        if not process.is_alive() and process.exitcode not in (0, None) and process.pid in held:
            _, units = held.pop(process.pid)
            failures += [UnitFailure(unit, f"its worker process died (exit code {process.exitcode})") for unit in units]
    return failures


def _serve(payload: dict[str, Any], threads: int, tasks: Any, results: Any) -> None:
    """A worker process: build the run's ``UnitWorker``, then compute batches until told to stop."""
    import os

    pid = os.getpid()
    try:
        worker = rebuild_worker(payload, threads)
    except Exception as error:  # noqa: BLE001 - every unit this process takes fails with this line
        worker, reason = None, _one_line(error)
    while True:
        task = tasks.get()
        if task is None:
            return
        index, group = task
        results.put(("start", pid, index))
        for unit in group:
            if worker is None:
                results.put(("failed", pid, (unit, reason)))
                continue
            try:
                results.put(("done", pid, worker(unit)))
            except Exception as error:  # noqa: BLE001 - the unit fails alone; the driver records it
                results.put(("failed", pid, (unit, _one_line(error))))


def _one_line(error: BaseException) -> str:
    if isinstance(error, UnderfireError):
        return str(error)
    lines = [line for line in traceback.format_exception_only(type(error), error)[-1].splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(error).__name__
