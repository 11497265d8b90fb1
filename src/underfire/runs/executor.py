"""Where units are computed: the seam a distributed executor plugs into.

An executor takes the units still to do and a function that computes one, and yields each unit's
output as it finishes (in any order), or a ``UnitFailure`` for a unit that failed for good. It
never writes: the driver commits each output as it arrives, so a driver killed at any moment
resumes with nothing lost or duplicated, and records each failure (retried on the next resume).
``SerialExecutor`` computes the units in this process, one after the other; ``LocalExecutor``
(``runs.local_executor``) in worker processes on this machine, side by side; ``RayExecutor``
(``runs.ray_executor``, the ``ray`` extra) as Ray tasks on a local or remote cluster.

Models and images reach another process once: the run's config (its TOML document) and the
driver's working directory travel (``worker_payload``), and the process builds its own
``UnitWorker`` from them (``rebuild_worker``), checking that it sees the same images as the
driver (their content digests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union

from ..errors import InputError
from .plan import Unit
from .worker import UnitOutput, UnitWorker

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


def worker_payload(compute: UnitWorker) -> dict[str, Any]:
    """What another process needs to build the same ``UnitWorker``: the config, the working
    directory its paths are relative to, and the digests of the images the driver selected."""
    from .fingerprint import tensor_digest

    return {
        "config": compute.config.as_dict(),
        "cwd": os.getcwd(),
        "images": {spec: [tensor_digest(image) for image in model.images] for spec, model in compute.models.items()},
    }


def rebuild_worker(payload: dict[str, Any], threads: int) -> UnitWorker:
    """The ``UnitWorker`` of ``worker_payload``'s run, in this process, with ``threads`` torch
    threads; refused in one line if this process selects other images than the driver did."""
    import torch

    from ..devices import resolve_device
    from .config import ExperimentConfig
    from .fingerprint import tensor_digest
    from .plan import prepare_models

    torch.set_num_threads(threads)
    os.chdir(payload["cwd"])
    config = ExperimentConfig.from_mapping(payload["config"])
    models = {model.spec: model for model in prepare_models(config, resolve_device("auto"))}
    for spec, digests in payload["images"].items():
        if [tensor_digest(image) for image in models[spec].images] != digests:
            raise InputError(
                f"a worker process sees other images for {spec!r} than the driver (another data folder or files?)"
            )
    return UnitWorker(config, models)
