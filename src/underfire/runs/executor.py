"""Where units are computed: the seam a distributed executor plugs into.

An executor takes the units still to do and a function that computes one, and yields each unit's
output as it finishes (in any order), or a ``UnitFailure`` for a unit that failed for good. It
never writes: the driver commits each output as it arrives, so a driver killed at any moment
resumes with nothing lost or duplicated, and records each failure (retried on the next resume).
``SerialExecutor`` computes the units in this process, one after the other; ``RayExecutor``
(``runs.ray_executor``, the ``ray`` extra) as Ray tasks on a local or remote cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

from .plan import Unit
from .worker import UnitOutput

#: Computes one unit (a ``UnitWorker``).
ComputeUnit = Callable[[Unit], UnitOutput]


@dataclass(frozen=True)
class UnitFailure:
    """A unit that failed for good (after the executor's retries): its error as one line."""

    unit: Unit
    error: str
    attempts: int = 1


#: What an executor yields per unit.
UnitResult = Union[UnitOutput, UnitFailure]


class Executor(Protocol):
    """Computes units and yields their outputs (or failures) as they finish."""

    def run(self, compute: ComputeUnit, units: Sequence[Unit]) -> Iterator[UnitResult]:
        """Yield ``compute(unit)`` for every unit of ``units``, in completion order."""
        ...


class SerialExecutor:
    """Every unit in this process, in plan order (batch by batch, so benign maps are reused)."""

    def run(self, compute: ComputeUnit, units: Sequence[Unit]) -> Iterator[UnitResult]:
        for unit in units:  # an exception here is the run's: it stops, the finished units are kept
            yield compute(unit)
