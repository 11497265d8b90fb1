"""Sizing a run's batch to a memory budget (``underfire run --max-memory 8GiB``).

Why measured, not modelled: a unit's peak depends on the model, the interpreter's graph (GRAD's
double back-propagation, MASK's perturbed copies, the transfer maps a unit explains) and the
device, and no table covers that. So the run's own first-batch units run on one image and then on
a few more, with one step of each attack stage (an attack's peak does not grow with its steps:
each step frees its graph), and every kind of unit's peak is fitted as fixed + per image × batch.
The batch is the largest, up to the configured ``batch_size``, at which every kind fits.

Why once per run: the batch decides which images share a random start and a noise draw, so a
run's numbers depend on it. The batch chosen at the first start is recorded in the run (meta key
``memory_budget``) and a resume keeps it, whatever the machine measures then.

What is counted: on a GPU, the bytes torch allocates there (its caching allocator reserves a
little more); on a CPU, the process's resident size, models and data included (Linux only: the
high-water mark is reset through ``/proc/self/clear_refs`` around each pilot unit).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InputError
from ..progress import progress_bar
from .config import ExperimentConfig
from .pilot import ScaledConfig, format_bytes
from .plan import PreparedModel, plan_units
from .worker import UnitWorker

#: The meta key a run records its budget and chosen batch under.
META_KEY = "memory_budget"
#: The most images the second pilot runs on (more fits the per-image slope better but costs more).
PILOT_BATCH = 4

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_memory(text: str) -> int:
    """``8GiB`` / ``8G`` (binary), ``8GB`` (decimal), ``512MiB``, ``1.5TiB``, or bytes, as bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    if match is None or (match.group(3) and not match.group(2)):
        raise InputError(f"--max-memory must be a size such as 8GiB, 512MiB or 16GB, got {text!r}")
    number, prefix, binary, byte = match.groups()
    scale = _DECIMAL[prefix] if prefix and byte and not binary else _UNITS[prefix]
    size = int(float(number) * scale)
    if size <= 0:
        raise InputError(f"--max-memory must be more than 0 bytes, got {text!r}")
    return size


@dataclass(frozen=True)
class BatchChoice:
    """The batch a budget allows, and the measurements that chose it."""

    budget: int
    batch_size: int
    configured: int  # the config's batch_size, the most the budget may choose
    predicted_peak: int  # of the unit kind that binds, at ``batch_size``
    binding: str  # that unit kind's label
    memory_kind: Literal["cpu", "gpu"]
    #: unit kind → (fixed bytes, bytes per image) fitted from the pilots
    fitted: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    largest: int = 0  # the largest batch there is: the configured one, or fewer images (0: the configured)

    def line(self) -> str:
        where = "allocated on the GPU" if self.memory_kind == "gpu" else "resident in this process, models included"
        fits = self.batch_size >= (self.largest or self.configured)
        change = f"batch {self.configured} fits" if fits else f"batch {self.configured} → {self.batch_size}"
        kinds = len(self.fitted)
        return (
            f"memory budget {format_bytes(self.budget)} ({where}): {change}, predicted peak {format_bytes(self.predicted_peak)} "
            f"({self.binding}; fitted from pilots of {kinds} {'kind' if kinds == 1 else 'kinds'} of unit)"
        )

    def record(self) -> str:
        """The run's meta value: what a resume keeps."""
        return json.dumps(
            {
                "budget": self.budget,
                "batch_size": self.batch_size,
                "configured_batch_size": self.configured,
                "predicted_peak": self.predicted_peak,
                "memory_kind": self.memory_kind,
            },
            sort_keys=True,
        )


def recorded_batch(config: ExperimentConfig, recorded: str | Mapping[str, Any] | None) -> ExperimentConfig:
    """``config`` with the batch its run recorded at its first start (``BatchChoice.record``, as
    text or parsed; unchanged when nothing is recorded, or when the config's own batch_size is not
    the one that budget was applied to)."""
    if recorded is None:
        return config
    record = json.loads(recorded) if isinstance(recorded, str) else recorded
    if config.batch_size != record["configured_batch_size"]:
        return config
    return dataclasses.replace(config, batch_size=int(record["batch_size"]))


def choose_batch(
    config: ExperimentConfig, models: Sequence[PreparedModel], budget: int, *, progress: bool = False
) -> BatchChoice:
    """Measure the first batch's units of every model on 1 image and on up to ``PILOT_BATCH``
    images (one step per attack stage) and pick the largest batch whose predicted peak fits."""
    most = min(config.batch_size, max(len(model.names) for model in models))
    gpu = next((m.classifier.device for m in models if m.classifier.device.type == "cuda"), None)
    kind: Literal["cpu", "gpu"] = "gpu" if gpu is not None else "cpu"
    if gpu is None:
        check_cpu_peaks()
    peaks: dict[str, dict[int, int]] = {}
    kinds = sum(len(_first_units(config, model, 1)) for model in models)
    with progress_bar(kinds * (1 if most == 1 else 2), desc="measuring memory", unit="unit", enabled=progress) as bar:
        _pilot(config, models, 1, gpu, peaks, bar)
        fit_batch(peaks, budget, 1, config.batch_size, kind)  # refuses a budget below one image
        size = min(most, PILOT_BATCH)
        while size >= 2:
            try:
                _pilot(config, models, size, gpu, peaks, bar)
                break
            except (torch.cuda.OutOfMemoryError, MemoryError):  # the device cannot hold this pilot: try fewer
                for label in list(peaks):
                    peaks[label].pop(size, None)
                    if not peaks[label]:
                        del peaks[label]
                if gpu is not None:
                    torch.cuda.empty_cache()
                size //= 2
    return fit_batch(peaks, budget, most, config.batch_size, kind)


def fit_batch(
    peaks: Mapping[str, Mapping[int, int]], budget: int, most: int, configured: int, memory_kind: Literal["cpu", "gpu"]
) -> BatchChoice:
    """The largest batch ≤ ``most`` at which every unit kind's line through its measured
    (batch, peak bytes) points stays within ``budget``; with one point, batch 1 only."""
    fitted = {label: _line(points) for label, points in peaks.items()}

    def worst(batch: int) -> tuple[int, str]:
        return max((fixed + per_image * batch, label) for label, (fixed, per_image) in fitted.items())

    single, label = worst(1)
    if single > budget:
        raise InputError(
            f"--max-memory {format_bytes(budget)} is less than one image needs: {label} peaked at {format_bytes(single)} "
            f"({'allocated on the GPU' if memory_kind == 'gpu' else 'resident, models included'})"
        )
    measured_once = all(len(points) == 1 for points in peaks.values())
    batch = 1 if measured_once else max(b for b in range(1, most + 1) if worst(b)[0] <= budget)
    peak, label = worst(batch)
    return BatchChoice(budget, batch, configured, peak, label, memory_kind, fitted, most)


def measure_peak(work: Callable[[], object], gpu: torch.device | None) -> tuple[int, int]:
    """(before, peak): the memory held just before ``work()`` and its peak while it runs: GPU bytes
    allocated, or the process's resident size and high-water mark (reset first, after the freed
    heap is handed back so earlier work is not counted)."""
    if gpu is not None:
        torch.cuda.synchronize(gpu)
        before = torch.cuda.memory_allocated(gpu)
        torch.cuda.reset_peak_memory_stats(gpu)
        work()
        torch.cuda.synchronize(gpu)
        return int(before), int(torch.cuda.max_memory_allocated(gpu))
    _trim_heap()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    work()
    return before, _status_bytes("VmHWM")


def cpu_peaks_measurable() -> bool:
    """Whether ``measure_peak`` works on a CPU here (Linux's ``/proc/self/clear_refs``)."""
    return sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()


def check_cpu_peaks() -> None:
    """Refuse a CPU budget where the peak of a piece of work cannot be measured."""
    if not cpu_peaks_measurable():
        raise InputError(
            "--max-memory on a CPU needs Linux (/proc/self/clear_refs) to measure peaks; set batch_size in the config instead"
        )


def check_unsharded_budget(max_memory: int | None) -> None:
    """The parts of a sharded run must share one batch, which a budget would choose per machine."""
    if max_memory is not None:
        raise InputError(
            "--max-memory chooses the batch on the machine that runs it, and the parts of a sharded run must share one: "
            "see the batch it picks with --estimate --max-memory, then set batch_size in the config"
        )


def sized_config(
    config: ExperimentConfig,
    models: Sequence[PreparedModel],
    meta: Mapping[str, Any],
    max_memory: int | None,
    *,
    progress: bool = False,
) -> tuple[ExperimentConfig, BatchChoice | None]:
    """The config a run folder whose meta table is ``meta`` computes with, and the choice to record
    when one was measured now: the batch its budget recorded at the first start (even a start
    killed before its config was stored), else, for a new run with ``max_memory``, the batch
    measured now; else ``config`` (a run begun without a budget keeps its batch)."""
    if META_KEY in meta:
        return recorded_batch(config, meta[META_KEY]), None
    if max_memory is None or "config" in meta:
        return config, None
    choice = choose_batch(config, models, max_memory, progress=progress)
    return dataclasses.replace(config, batch_size=choice.batch_size), choice


# --------------------------------------------------------------------------------- helpers
def _pilot(
    config: ExperimentConfig,
    models: Sequence[PreparedModel],
    size: int,
    gpu: torch.device | None,
    peaks: dict[str, dict[int, int]],
    bar: object,
) -> None:
    """Run every model's first-batch units on ``size`` images, one step per stage, into ``peaks``."""
    pilot = ScaledConfig(dataclasses.replace(config, batch_size=size), 0.0)
    worker = UnitWorker(pilot, {model.spec: model for model in models})  # type: ignore[arg-type]
    for model in models:
        for unit in _first_units(config, model, size):
            label = _kind_label(unit.label)
            peaks.setdefault(label, {})[size] = measure_peak(lambda: worker(unit), gpu)[1]
            bar.set_postfix_str(label, refresh=False)  # type: ignore[attr-defined]
            bar.update(1)  # type: ignore[attr-defined]


def _first_units(config: ExperimentConfig, model: PreparedModel, size: int) -> list:
    return [unit for unit in plan_units(dataclasses.replace(config, batch_size=size), model) if unit.batch == 0]


def _kind_label(label: str) -> str:
    return label.rsplit(" batch ", 1)[0]


def _line(points: Mapping[int, int]) -> tuple[int, int]:
    """(fixed, per image) through the smallest and largest batch measured; per image ≥ 0."""
    low, high = min(points), max(points)
    if low == high:
        return points[low], 0
    per_image = max(0, (points[high] - points[low]) // (high - low))
    return points[low] - per_image * low, per_image


def _trim_heap() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: the high-water mark may include freed heap
        pass


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise InputError(f"/proc/self/status has no {field} line; --max-memory cannot measure this process")
