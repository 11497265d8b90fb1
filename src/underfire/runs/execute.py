"""Running an experiment into a run folder, resumably: the driver.

The driver plans the work (``plan``), hands the units still to do to an executor (``executor``;
workers compute them without touching files or the database, ``worker``) and commits each output
as it arrives: its files written atomically, then all its rows in one transaction. A restarted run
skips the units whose rows are present, so a run killed at any instant (even by SIGKILL) finishes
with every row exactly once and every file whole.

The *reference map* a map is compared with is the attacker's target map: for ``benign`` (the
default) the interpreter's benign map of the same image; for ``other``/``shape``/a ``.npy`` the
target map drawn for that interpreter (same seed, its own map size).

Layout of ``RUN_DIR/files/<model-slug>/`` (paths in the database are relative to ``RUN_DIR``)::

    images/<image>.png                                  benign image (8-bit)
    benign/<interpreter>/<image>.npy|.png               benign map and its overlay
    <attack>/<image>.png                                an interpreter-free attack's image (PGD)
    <attack>/<interpreter>/<image>.map.npy|.overlay.png its map for the target class
    <attack>/<target-map>/<interpreter>/<image>.png     an interpreter-bound attack's image (ADV²)
    <attack>/<target-map>/<interpreter>/<image>.map.npy|.overlay.png
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from ..attacks import ATTACKS
from ..devices import resolve_device
from ..errors import InputError
from ..options import dataclass_options
from ..progress import progress_bar
from ..store import ImageRecord, ResultStore, remove_temporary_files, run_lock, save_png_atomic
from ..store.database import DATABASE_NAME, check_database, present_keys
from ..store.files import check_output_folder, write_bytes_atomic
from ..versions import software_versions
from ..visualize import to_uint8
from .config import ExperimentConfig
from .executor import Executor, SerialExecutor, UnitFailure
from .fingerprint import check_inputs, run_inputs
from .memory import META_KEY, check_unsharded_budget, sized_config
from .plan import Key, PreparedModel, TransferKey, Unit, plan_units, prepare_models
from .worker import UnitOutput, UnitWorker, config_json


@dataclass(frozen=True)
class RunOutcome:
    """What a call of ``run_experiment`` did."""

    run_dir: Path
    units: int
    skipped: int  # complete before this call
    completed: int  # done by this call
    results: int  # rows in the results table now
    transfer: int  # rows in the transfer table now
    seconds: float
    failed: int = 0  # units that failed for good in this call (recorded in ``failures``; a resume retries them)

    @property
    def was_complete(self) -> bool:
        """True when the run folder was already finished: this call did nothing."""
        return self.completed == 0 and self.skipped == self.units


def run_experiment(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    progress: bool = False,
    executor: Executor | None = None,
    announce: Callable[[str], None] | None = None,
    shard: tuple[int, int] | None = None,
    device: str = "cpu",
    max_memory: int | None = None,
) -> RunOutcome:
    """Run (or resume) ``config`` into ``run_dir``; see the module docstring for the layout.

    A folder that holds a run of a different config is refused; a finished run does nothing.
    Only one process may work on a folder at a time (a lock file enforces it). ``executor``
    computes the units (default: ``SerialExecutor``, in this process). ``announce`` receives
    one line once the work is planned (how many units are left and where they go) and one after
    the first unit (the time the rest takes at its pace). ``shard=(i, n)`` does the i-th of n
    deterministic parts of the units (1-based; ``merge_runs`` joins the parts' folders).
    ``device`` is where this process computes (``devices.resolve_device``; Ray workers pick their
    own from the GPUs Ray gives them). ``max_memory`` (bytes) lowers the batch to the largest
    whose measured peak fits, at the run's first start (``memory``); a resume keeps that batch.
    """
    if shard is not None:
        check_shard(shard)
        check_unsharded_budget(max_memory)
    started = time.perf_counter()
    run_dir = check_output_folder(run_dir, "run folder")
    check_database(run_dir / DATABASE_NAME)
    models = prepare_models(config, resolve_device(device))
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir), ResultStore(run_dir) as store:
        config = _sized_batch(config, models, store, max_memory, progress, announce)
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        inputs = run_inputs(
            config.input_files() + [f for model in models for f in model.input_files()],
            {model.spec: dict(zip(model.names, model.images)) for model in models},
        )
        sources = {model.spec: model.sources for model in models}
        store.claim(
            config.as_dict(), software_versions(run=True), now, attack_settings(config), attack_setting_defaults(config)
        )
        recorded = store.meta().get("inputs")  # absent: a new run, or one made before inputs were recorded
        if recorded is not None:
            check_inputs(run_dir, json.loads(recorded), inputs, sources)
        else:
            store.claim_value("inputs", json.dumps(inputs, sort_keys=True), "other inputs")
        remove_temporary_files(run_dir)  # what a killed process left; we hold the lock
        for model in models:
            _record_images(store, run_dir, model)
        store.claim_value("shard", "all" if shard is None else f"{shard[0]}/{shard[1]}", "another shard")
        units = [unit for model in models for unit in plan_units(config, model)]
        if shard is not None:
            units = shard_units(units, shard)
        present_results, present_transfer = store.result_keys(), store.transfer_keys()
        todo = [unit for unit in units if not _complete(unit, present_results, present_transfer)]
        if announce is not None and todo:
            announce(f"{config.name}: {len(todo)} of {len(units)} units to do → {run_dir}")
        worker = UnitWorker(config, {model.spec: model for model in models})
        with progress_bar(
            len(units), initial=len(units) - len(todo), enabled=progress and bool(todo), unit="unit", desc=config.name
        ) as bar:
            work_started = time.perf_counter()
            failed = 0
            for done, output in enumerate((executor or SerialExecutor()).run(worker, todo), start=1):
                if isinstance(output, UnitFailure):
                    failed += 1
                    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                    store.record_failure(failure_key(output.unit), output.error, output.attempts, when)
                    if announce is not None:
                        announce(
                            f"{config.name}: {output.unit.label} failed after {output.attempts} attempt(s): {output.error}"
                        )
                else:
                    _commit(store, run_dir, output)
                bar.set_postfix_str(output.unit.label, refresh=False)
                bar.update(1)
                if done == 1 and announce is not None and len(todo) > 1:
                    took = time.perf_counter() - work_started
                    announce(
                        f"{config.name}: the first unit took {took:.0f} s; at that pace the {len(todo) - 1} left take about "
                        f"{_minutes(took * (len(todo) - 1))} (units differ in cost: a rough figure)"
                    )
        return RunOutcome(
            run_dir,
            len(units),
            len(units) - len(todo),
            len(todo) - failed,
            store.count("results"),
            store.count("transfer"),
            time.perf_counter() - started,
            failed,
        )


def attack_settings(config: ExperimentConfig) -> dict[str, object]:
    """The resolved configuration of every attack (per interpreter where the attack uses one) and
    the options of every interpreter: stored with the run, so a resume under changed presets or
    defaults is refused instead of mixing two settings in one run."""
    settings = _per_attack(config, lambda chosen: json.loads(config_json(chosen)))
    settings["interpreter_options"] = {
        name: json.loads(json.dumps(config.options_for(name), default=str)) for name in config.interpreters
    }
    return settings


def attack_setting_defaults(config: ExperimentConfig) -> dict[str, object]:
    """``attack_settings``' attack tree with every setting at its declared default: what a setting
    added in a later version is compared with when a run recorded before it existed resumes."""

    def defaults(chosen: object) -> object:
        def plain(value: object) -> object:  # as asdict writes a nested dataclass
            return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value

        specs = dataclass_options(type(chosen)).values()
        return json.loads(
            json.dumps({spec.name: plain(spec.default) for spec in specs if not spec.required}, default=str)
        )

    return _per_attack(config, defaults)


def _per_attack(config: ExperimentConfig, describe: Callable[[object], object]) -> dict[str, object]:
    """{attack: describe(its config)}, or {attack: {interpreter: ...}} for attacks using one."""
    settings: dict[str, object] = {}
    for attack in config.attacks:
        if ATTACKS.get(attack).uses_interpreter:
            settings[attack] = {name: describe(config.config_for(attack, name)) for name in config.interpreters}
        else:
            settings[attack] = describe(config.config_for(attack))
    return settings


# --------------------------------------------------------------------------------- helpers
def _commit(store: ResultStore, run_dir: Path, output: UnitOutput) -> None:
    """One unit's files (atomically; shared benign-map files only where absent), then its rows in
    one transaction: a crash in between leaves files without rows, and the unit is redone."""
    for relative, data in output.shared_files:
        if not (run_dir / relative).is_file():  # atomic writes: present means whole
            write_bytes_atomic(run_dir / relative, data)
    for relative, data in output.files:
        write_bytes_atomic(run_dir / relative, data)
    store.insert_unit(output.results, output.transfer, failure_key(output.unit))


def units_to_do(units: list[Unit], database: Path) -> list[Unit]:
    """The units whose rows an existing results database lacks (read-only)."""
    connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        results, transfer = present_keys(connection)
    finally:
        connection.close()
    return [unit for unit in units if not _complete(unit, results, transfer)]


def failure_key(unit: Unit) -> tuple[str, str, str, str, int]:
    """A unit's key in the ``failures`` table."""
    return (unit.model, unit.attack, unit.interpreter or "", unit.target_map or "", unit.batch)


def _sized_batch(
    config: ExperimentConfig,
    models: list[PreparedModel],
    store: ResultStore,
    max_memory: int | None,
    progress: bool,
    announce: Callable[[str], None] | None,
) -> ExperimentConfig:
    """``memory.sized_config`` for this folder, said in one line, a new choice recorded before the
    config (so a kill in between resumes with it)."""
    meta = store.meta()
    sized, choice = sized_config(config, models, meta, max_memory, progress=progress)
    if announce is not None:
        if choice is not None:
            announce(f"{config.name}: {choice.line()}")
        elif META_KEY in meta and sized.batch_size != config.batch_size:
            announce(
                f"{config.name}: batch {sized.batch_size}, chosen by the run's memory budget at its first start (a resume keeps it)"
            )
        elif max_memory is not None and META_KEY not in meta:
            announce(
                f"{config.name}: --max-memory ignored: this run started without a budget, and its batch ({config.batch_size}) stays"
            )
    if choice is not None:
        store.claim_value(META_KEY, choice.record(), "a memory budget")
    return sized


def check_shard(shard: tuple[int, int]) -> None:
    index, count = shard
    if (
        isinstance(index, bool)
        or isinstance(count, bool)
        or not (isinstance(index, int) and isinstance(count, int))
        or not 1 <= index <= count
    ):
        raise InputError(f"a shard is I/N with 1 <= I <= N, got {index}/{count}")


def shard_units(units: list[Unit], shard: tuple[int, int]) -> list[Unit]:
    """The i-th of n parts of a run's units. Units are dealt per (model, attack, interpreter,
    target map) group, each group's batches in turn and each group starting one part further on,
    so every part gets about 1/n of every group: dealing the whole plan in turn sent the same
    interpreters (GRAD, RTS, the ensemble: the dear ones) to every second part. The plan is
    deterministic, so the parts are disjoint and together the whole run."""
    index, count = shard
    groups: dict[tuple[str, str, str | None, str | None], int] = {}
    dealt: dict[tuple[str, str, str | None, str | None], int] = {}
    part = []
    for unit in units:
        key = (unit.model, unit.attack, unit.interpreter, unit.target_map)
        offset = groups.setdefault(key, len(groups))
        position = dealt.get(key, 0)
        dealt[key] = position + 1
        if (offset + position) % count == index - 1:
            part.append(unit)
    return part


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _complete(unit: Unit, results: set[Key], transfer: set[TransferKey]) -> bool:
    found = len(unit.result_keys & results) + len(unit.transfer_keys & transfer)
    expected = len(unit.result_keys) + len(unit.transfer_keys)
    if 0 < found < expected:  # a unit commits in one transaction: this cannot happen
        raise InputError(
            f"the results database holds {found} of the {expected} rows of unit {unit.label}"
            f"{'' if unit.target_map is None else f' (target map {unit.target_map})'}; it was modified by something else than underfire"
        )
    return found == expected


def _record_images(store: ResultStore, run_dir: Path, model: PreparedModel) -> None:
    """Write the benign PNGs and the ``images`` rows once; later, check the selection is the same."""
    records = [
        ImageRecord(
            model.spec,
            name,
            position,
            int(model.labels[position]),
            int(model.targets[position]),
            f"files/{model.slug}/images/{name}.png",
        )
        for position, name in enumerate(model.names)
    ]
    stored = store.images(model.spec)
    if stored:
        if stored != records:
            raise InputError(
                f"the images chosen for model {model.spec!r} differ from those stored in {str(run_dir)!r} "
                "(did the data or the model change?); use another output folder"
            )
        return
    for position, record in enumerate(records):
        save_png_atomic(to_uint8(model.images[position]), run_dir / record.image_path)
    store.insert_images(records)
