"""Where units are computed: the seam a distributed executor plugs into.

An executor takes the units still to do and a function that computes one, and yields each unit's
output as it finishes (in any order). It never writes: the driver commits each output as it
arrives, so a driver killed at any moment resumes with nothing lost or duplicated. Today's one
implementation computes the units in this process, one after the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from .plan import Unit
from .worker import UnitOutput

#: Computes one unit (a ``UnitWorker``).
ComputeUnit = Callable[[Unit], UnitOutput]


class Executor(Protocol):
    """Computes units and yields their outputs as they finish."""

    def run(self, compute: ComputeUnit, units: Sequence[Unit]) -> Iterator[UnitOutput]:
        """Yield ``compute(unit)`` for every unit of ``units``, in completion order."""
        ...


class SerialExecutor:
    """Every unit in this process, in plan order (batch by batch, so benign maps are reused)."""

    def run(self, compute: ComputeUnit, units: Sequence[Unit]) -> Iterator[UnitOutput]:
        for unit in units:
            yield compute(unit)
