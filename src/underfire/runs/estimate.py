"""How long a run will take, from a few timed steps, before it starts (``underfire run --estimate``).

Why pilots: a unit's cost depends on the model, the interpreter, the attack's step budgets, the
benign maps a batch computes once and shares, the transfer maps, the machine and what else runs
on it — no table covers that. So the first batch's units run twice, in the run's own order and in
memory (nothing is written), with every step budget, and every interpreter's own solve (MASK's
iterations: ``Interpreter.pilot_options``), cut to ``SCALES`` of the configured one (the lower one
twice, keeping the faster: the first pass also pays one-time costs), each pass on a fresh worker
(so the shared benign maps are paid as in the run). Per unit, time = fixed + scaled part is
fitted through the two points and read at the full budget; every batch
is taken to cost what the first does. Attacks whose configuration has no ``pgd_steps`` /
``adv_steps`` are timed once at their full budget.

Memory comes from the same pilots: they run the run's own batches, and an attack's memory does
not grow with its step budget, so their peak is the run's. On a GPU it is the peak of memory
allocated on the device (reset before each unit); on a CPU, the process's peak resident size
(models and data included: what the machine must hold), which is all the operating system
counts per process.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import ExperimentConfig
from .execute import check_shard, shard_units, units_to_do
from .memory import check_unsharded_budget, sized_config
from .pilot import SCALES, ScaledConfig, format_bytes
from .plan import PreparedModel, Unit, plan_units, prepare_models
from .worker import UnitWorker


@dataclass(frozen=True)
class RunEstimate:
    """The predicted wall time of the units to do, their peak memory, and what the pilots cost."""

    seconds: float
    units: int
    pilot_seconds: float
    per_unit: dict[str, float]  # first batch's units: label → predicted seconds at the full budget
    #: peak bytes: of GPU memory allocated (``memory_kind`` "gpu"), or the process's resident size ("cpu")
    peak_bytes: int = 0
    memory_kind: Literal["cpu", "gpu"] = "cpu"
    #: first batch's units: label → peak bytes allocated on the GPU (empty on a CPU: per process only)
    peak_per_unit: dict[str, int] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        where = "allocated on the GPU" if self.memory_kind == "gpu" else "resident in this process, models included"
        return (
            f"estimate: about {_clock(self.seconds)} for {self.units} units on this machine now, "
            f"peak memory {format_bytes(self.peak_bytes)} ({where}) "
            f"(from pilot runs of the first batch at {SCALES[0]:.0%} and {SCALES[1]:.0%} of the steps, which took {self.pilot_seconds:.0f} s)"
        )


def estimate_experiment(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    max_memory: int | None = None,
    announce: Callable[[str], None] | None = None,
) -> RunEstimate:
    """The estimate for what ``run_experiment(config, run_dir, ...)`` would still do; writes nothing.
    With ``max_memory`` (or a budget the run recorded) it estimates the batch the budget chooses,
    announced first."""
    from ..devices import resolve_device
    from ..store import DATABASE_NAME
    from ..store.database import check_database
    from ..store.reader import open_reader

    database = Path(run_dir) / DATABASE_NAME
    check_database(database)
    if shard is not None:
        check_shard(shard)
        check_unsharded_budget(max_memory)
    models = prepare_models(config, resolve_device(device))
    meta: dict[str, Any] = {}
    if database.is_file():
        with open_reader(run_dir) as reader:
            meta = reader.meta()
    config, choice = sized_config(config, models, meta, max_memory, progress=True)
    if choice is not None and announce is not None:
        announce(choice.line())
    units = [unit for model in models for unit in plan_units(config, model)]
    if shard is not None:
        units = shard_units(units, shard)
    todo = units_to_do(units, database) if database.is_file() else units
    if not todo:
        return RunEstimate(0.0, 0, 0.0, {})
    return estimate_run(config, models, todo)


def estimate_run(config: ExperimentConfig, models: Sequence[PreparedModel], todo: Sequence[Unit]) -> RunEstimate:
    """Time the first batch's units of each model at two step fractions and extrapolate to ``todo``."""
    by_model = {model.spec: model for model in models}
    first_batch: dict[str, int] = {}
    for unit in todo:
        first_batch[unit.model] = min(unit.batch, first_batch.get(unit.model, unit.batch))
    first = [unit for unit in todo if unit.batch == first_batch[unit.model]]
    points: dict[Unit, list[tuple[float, float]]] = {unit: [] for unit in first}  # (budget share, seconds)
    gpu = next((m.classifier.device for m in models if m.classifier.device.type == "cuda"), None)
    peaks: dict[str, int] = {}
    started = time.perf_counter()
    for scale in (SCALES[0], SCALES[1], SCALES[0]):
        scaled = ScaledConfig(config, scale)
        worker = UnitWorker(scaled, {spec: pilot_model(model, scale) for spec, model in by_model.items()})  # type: ignore[arg-type]
        for unit in first:
            if gpu is not None:
                torch.cuda.reset_peak_memory_stats(gpu)
            begun = time.perf_counter()
            worker(unit)
            points[unit].append((scaled.fraction(unit), time.perf_counter() - begun))
            if gpu is not None:
                peaks[unit.label] = max(peaks.get(unit.label, 0), torch.cuda.max_memory_allocated(gpu))
    pilot = time.perf_counter() - started
    for unit, (warm, high, low) in points.items():
        points[unit] = [min(warm, low, key=lambda point: point[1]), high]
    predicted: dict[tuple[str, str, str | None, str | None], float] = {}
    per_unit = {}
    for unit in first:
        (share_low, t_low), (share_high, t_high) = points[unit]
        slope = max(0.0, (t_high - t_low) / (share_high - share_low)) if share_high > share_low else 0.0
        seconds = t_high if share_high >= 1 else max(t_high, t_low + slope * (1 - share_low))
        predicted[_kind(unit)] = seconds
        per_unit[unit.label] = round(seconds, 2)
    total = sum(predicted.get(_kind(unit), 0.0) for unit in todo)
    if gpu is not None:
        return RunEstimate(total, len(todo), pilot, per_unit, max(peaks.values()), "gpu", peaks)
    return RunEstimate(total, len(todo), pilot, per_unit, peak_resident_bytes(), "cpu")


def pilot_model(model: PreparedModel, scale: float) -> PreparedModel:
    """``model`` with interpreters whose own solves are cut to ``scale`` (``Interpreter.pilot_options``:
    MASK's iterations), so a pilot's every part costs ``scale`` of the unit's, as its steps do."""
    interpreters = {name: i.with_options(**i.pilot_options(scale)) for name, i in model.interpreters.items()}
    return dataclasses.replace(model, interpreters=interpreters)


def peak_resident_bytes() -> int:
    """This process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS;
    0 where there is no ``resource`` module, Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _kind(unit: Unit) -> tuple[str, str, str | None, str | None]:
    return (unit.model, unit.attack, unit.interpreter, unit.target_map)


def _clock(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
