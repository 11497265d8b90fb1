"""Running an experiment into a run folder, resumably.

The work is cut into *units*; each unit computes its batch, writes all its files atomically, then
inserts all its rows in one transaction. A restarted run skips the units whose rows are present,
so a run killed at any instant (even by SIGKILL) finishes with every row exactly once and every
file whole. Units, per model and batch of images:

- ``pgd``: one targeted PGD per batch, shared by every interpreter (PGD does not look at maps);
  rows for every interpreter × target map: that interpreter's map of the PGD image for the target
  class, compared with the reference map.
- ``adv2``: one per interpreter A × target map: the ADV² attack against A, its rows and, with
  ``transfer``, the same images explained by every interpreter B (B = A repeats A's own row).

The *reference map* a map is compared with is the attacker's target map: for ``benign`` (the
default) the interpreter's benign map of the same image; for ``other``/``shape``/a ``.npy`` the
target map drawn for that interpreter (same seed, its own map size).

Layout of ``RUN_DIR/files/<model-slug>/`` (paths in the database are relative to ``RUN_DIR``)::

    images/<image>.png                              benign image (8-bit)
    benign/<interpreter>/<image>.npy|.png           benign map and its overlay
    pgd/<image>.png                                 PGD adversarial image
    pgd/<interpreter>/<image>.map.npy|.overlay.png  its map for the target class
    adv2/<target-map>/<interpreter>/<image>.png     ADV² adversarial image
    adv2/<target-map>/<interpreter>/<image>.map.npy|.overlay.png
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attacks.config import AttackConfig
from ..attacks.measure import AttackMeasures, measure_attack
from ..attacks.runner import CraftedBatch, craft_and_reload, images_from_dataset, make_target_maps, measure_fields, other_pool, save_map_files
from ..attacks.targets import check_targets, random_targets
from ..data import open_dataset
from ..errors import InputError, UnderfireError
from ..interpreters import Interpreter, build_interpreter
from ..models import Classifier, load_model
from ..store import ImageRecord, ResultRecord, ResultStore, TransferRecord, remove_temporary_files, run_lock, save_png_atomic
from ..visualize import to_uint8
from .config import ExperimentConfig

Key = tuple[str, str, str, str, str]


@dataclass
class PreparedModel:
    """One model of the experiment, loaded and checked: its interpreters, images and targets."""

    spec: str
    slug: str
    classifier: Classifier
    interpreters: dict[str, Interpreter]
    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    names: list[str]
    pool: tuple[torch.Tensor, torch.Tensor] | None = None  # images for 'other' target maps

    def batches(self, size: int) -> list[slice]:
        return [slice(start, start + size) for start in range(0, len(self.names), size)]


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``kind`` is ``"pgd"`` or the interpreter ADV² attacks; the PGD unit
    covers every target map (its adversarial images do not depend on them)."""

    model: str
    kind: str
    target_map: str | None
    batch: int
    result_keys: frozenset[Key] = field(repr=False)
    transfer_keys: frozenset[Key] = field(repr=False)


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

    @property
    def was_complete(self) -> bool:
        """True when the run folder was already finished: this call did nothing."""
        return self.completed == 0 and self.skipped == self.units


def prepare_models(config: ExperimentConfig) -> list[PreparedModel]:
    """Load every model, build every interpreter, pick the images and targets — all the checks
    that can fail, before any file is written."""
    prepared = []
    for spec in config.models:
        try:
            classifier = load_model(spec)
        except UnderfireError as error:
            raise InputError(f"experiment.models: {spec!r}: {error}") from None
        interpreters = {}
        for name in config.interpreters:
            try:
                interpreters[name] = build_interpreter(name, classifier)
            except UnderfireError as error:
                raise InputError(f"experiment.interpreters: {name!r} on {spec!r}: {error}") from None
        try:
            dataset = open_dataset(config.data, size=classifier.input_size or 224, class_names=classifier.class_names)
        except UnderfireError as error:
            raise InputError(f"experiment.data: {error}") from None
        fixed = None
        if config.target != "random":
            try:
                fixed = classifier.check_classes(classifier.class_index(config.target), 1).item()
            except UnderfireError as error:
                raise InputError(f"experiment.target: {error}") from None
        pool = None
        if "other" in config.target_maps:
            try:
                pool = other_pool(classifier)
            except UnderfireError as error:
                raise InputError(f"experiment.target_maps: {error}") from None
        try:
            images, labels, names = images_from_dataset(classifier, dataset, config.images, exclude=fixed)
        except UnderfireError as error:
            raise InputError(f"experiment.data: {spec!r}: {error}") from None
        if fixed is None:
            targets = random_targets(labels, classifier.num_classes, config.seed)
        else:
            targets = torch.full_like(labels, fixed)
        check_targets(labels, targets)
        prepared.append(PreparedModel(spec, safe_name(spec), classifier, interpreters, images, labels, targets, names, pool))
    return prepared


def run_experiment(
    config: ExperimentConfig,
    run_dir: str | Path,
    *,
    progress: bool = False,
) -> RunOutcome:
    """Run (or resume) ``config`` into ``run_dir``; see the module docstring for the layout.

    A folder that holds a run of a different config is refused; a finished run does nothing.
    Only one process may work on a folder at a time (a lock file enforces it).
    """
    started = time.perf_counter()
    models = prepare_models(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir), ResultStore(run_dir) as store:
        settings = {name: json.loads(config_json(config.attack_config(name))) for name in config.interpreters}
        settings["pgd"] = json.loads(config_json(config.pgd_config()))
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        store.claim(config.as_dict(), software_versions(), now, settings)
        remove_temporary_files(run_dir)  # what a killed process left; we hold the lock
        for model in models:
            _record_images(store, run_dir, model)
        units = [unit for model in models for unit in plan_units(config, model)]
        present_results, present_transfer = store.result_keys(), store.transfer_keys()
        todo = [unit for unit in units if not _complete(unit, present_results, present_transfer)]
        worker = _Worker(config, run_dir, store)
        by_spec = {model.spec: model for model in models}
        with tqdm(total=len(units), initial=len(units) - len(todo), disable=not progress or not todo, unit="unit", desc=config.name) as bar:
            for unit in todo:
                bar.set_postfix_str(f"{unit.model} {unit.kind} batch {unit.batch + 1}", refresh=True)
                worker.run(by_spec[unit.model], unit)
                bar.update(1)
        return RunOutcome(
            run_dir, len(units), len(units) - len(todo), len(todo), store.count("results"), store.count("transfer"),
            time.perf_counter() - started,
        )


def plan_units(config: ExperimentConfig, model: PreparedModel) -> list[Unit]:
    """Every unit of ``model``, batch by batch (so benign maps are computed once per batch)."""
    transfer = config.transfer and "adv2" in config.attacks
    units = []
    for index, chunk in enumerate(model.batches(config.batch_size)):
        names = model.names[chunk]
        if "pgd" in config.attacks:
            keys = frozenset(
                (model.spec, interpreter, "pgd", target_map, name)
                for interpreter in config.interpreters
                for target_map in config.target_maps
                for name in names
            )
            units.append(Unit(model.spec, "pgd", None, index, keys, frozenset()))
        if "adv2" in config.attacks:
            for interpreter in config.interpreters:
                for target_map in config.target_maps:
                    keys = frozenset((model.spec, interpreter, "adv2", target_map, name) for name in names)
                    moved = frozenset(
                        (model.spec, interpreter, other, target_map, name)
                        for other in (config.interpreters if transfer else ())
                        for name in names
                    )
                    units.append(Unit(model.spec, interpreter, target_map, index, keys, moved))
    return units


def safe_name(spec: str) -> str:
    """A folder name for a model spec (or a run name): the text itself when it is a safe name,
    else a cleaned version plus a short hash (two specs never share a folder)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec).strip("-.")[:60]
    if clean == spec:
        return spec
    return f"{clean or 'model'}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def target_map_slug(kind: str) -> str:
    """A folder name for a target map setting (``.npy`` paths get a cleaned stem and a hash)."""
    if not kind.endswith(".npy"):
        return kind
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(kind).stem).strip("-.")[:40] or "map"
    return f"npy-{stem}-{hashlib.sha1(kind.encode()).hexdigest()[:8]}"


def software_versions() -> dict[str, str]:
    """What produced the numbers (stored in the run's meta)."""
    from .. import __version__

    return {
        "underfire": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def config_json(config: AttackConfig) -> str:
    """An ``AttackConfig`` as JSON text (the ``config`` column)."""
    return json.dumps(asdict(config), sort_keys=True, default=str)


# --------------------------------------------------------------------------------- helpers
def _complete(unit: Unit, results: set[Key], transfer: set[Key]) -> bool:
    found = len(unit.result_keys & results) + len(unit.transfer_keys & transfer)
    expected = len(unit.result_keys) + len(unit.transfer_keys)
    if 0 < found < expected:  # a unit commits in one transaction: this cannot happen
        raise InputError(
            f"the results database holds {found} of the {expected} rows of unit {unit.model}/{unit.kind}/"
            f"{unit.target_map}/batch {unit.batch}; it was modified by something else than underfire"
        )
    return found == expected


def _record_images(store: ResultStore, run_dir: Path, model: PreparedModel) -> None:
    """Write the benign PNGs and the ``images`` rows once; later, check the selection is the same."""
    records = [
        ImageRecord(model.spec, name, position, int(model.labels[position]), int(model.targets[position]),
                    f"files/{model.slug}/images/{name}.png")
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


class _Worker:
    """Computes units; keeps the current batch's benign and reference maps between its units."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, store: ResultStore) -> None:
        self.config = config
        self.run_dir = run_dir
        self.store = store
        self.attack_configs = {name: config.attack_config(name) for name in config.interpreters}
        self.pgd = config.pgd_config()
        self._batch: tuple[str, int] | None = None
        self._benign: dict[str, torch.Tensor] = {}
        self._reference: dict[tuple[str, str], torch.Tensor] = {}

    def run(self, model: PreparedModel, unit: Unit) -> None:
        if self._batch != (model.spec, unit.batch):
            self._batch, self._benign, self._reference = (model.spec, unit.batch), {}, {}
        if unit.kind == "pgd":
            self._pgd(model, unit)
        else:
            self._adv2(model, unit)

    # ------------------------------------------------------------------------------ units
    def _pgd(self, model: PreparedModel, unit: Unit) -> None:
        chunk, x, y, t, names = self._slice(model, unit)
        folder = self._folder(model) / "pgd"
        crafted = craft_and_reload(model.classifier, None, self.pgd, x, y, t, None, [folder / f"{n}.png" for n in names])
        rows = []
        for interpreter in self.config.interpreters:
            for number, target_map in enumerate(self.config.target_maps):
                measures = self._measure(model, chunk, interpreter, target_map, crafted.reloaded, t)
                maps = [(folder / interpreter / f"{n}.map.npy", folder / interpreter / f"{n}.overlay.png") for n in names]
                if number == 0:  # the PGD image's map does not depend on the target map
                    for i, (npy, png) in enumerate(maps):
                        save_map_files(measures.maps[i], crafted.reloaded[i], npy, png)
                rows += self._records(model, unit, chunk, interpreter, "pgd", target_map, measures, crafted, maps, self.pgd)
        self.store.insert_unit(rows)

    def _adv2(self, model: PreparedModel, unit: Unit) -> None:
        chunk, x, y, t, names = self._slice(model, unit)
        source, target_map = unit.kind, unit.target_map
        assert target_map is not None
        folder = self._folder(model) / "adv2" / target_map_slug(target_map) / source
        config = self.attack_configs[source]
        wanted = self._reference_maps(model, chunk, source, target_map)
        crafted = craft_and_reload(
            model.classifier, model.interpreters[source], config, x, y, t, wanted, [folder / f"{n}.png" for n in names]
        )
        measures = self._measure(model, chunk, source, target_map, crafted.reloaded, t)
        maps = [(folder / f"{n}.map.npy", folder / f"{n}.overlay.png") for n in names]
        for i, (npy, png) in enumerate(maps):
            save_map_files(measures.maps[i], crafted.reloaded[i], npy, png)
        rows = self._records(model, unit, chunk, source, "adv2", target_map, measures, crafted, maps, config)
        moved = []
        for other in sorted({key[2] for key in unit.transfer_keys}, key=self.config.interpreters.index):
            seen = measures if other == source else self._measure(model, chunk, other, target_map, crafted.reloaded, t)
            moved += [
                TransferRecord(model.spec, source, other, target_map, name, float(seen.l1[i]), float(seen.l2[i]), float(seen.iou[i]))
                for i, name in enumerate(names)
            ]
        self.store.insert_unit(rows, moved)

    # ---------------------------------------------------------------------------- helpers
    def _slice(self, model: PreparedModel, unit: Unit) -> tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        chunk = model.batches(self.config.batch_size)[unit.batch]
        return chunk, model.images[chunk], model.labels[chunk], model.targets[chunk], model.names[chunk]

    def _folder(self, model: PreparedModel) -> Path:
        return self.run_dir / "files" / model.slug

    def _benign_maps(self, model: PreparedModel, chunk: slice, interpreter: str) -> torch.Tensor:
        """The benign maps of the batch (for the true classes), computed once per batch; their
        files are written the first time any unit needs them."""
        if interpreter not in self._benign:
            x = model.images[chunk]
            maps = model.interpreters[interpreter](x, model.labels[chunk], seed=self.config.seed)
            for i, name in enumerate(model.names[chunk]):
                npy, png = self._benign_paths(model, interpreter, name)
                if not (npy.is_file() and png.is_file()):  # atomic writes: present means whole
                    save_map_files(maps[i], x[i], npy, png)
            self._benign[interpreter] = maps
        return self._benign[interpreter]

    def _benign_paths(self, model: PreparedModel, interpreter: str, name: str) -> tuple[Path, Path]:
        folder = self._folder(model) / "benign" / interpreter
        return folder / f"{name}.npy", folder / f"{name}.png"

    def _reference_maps(self, model: PreparedModel, chunk: slice, interpreter: str, target_map: str) -> torch.Tensor:
        """The attacker's target maps for this batch and interpreter (seeded by batch position)."""
        key = (interpreter, target_map)
        if key not in self._reference:
            benign = self._benign_maps(model, chunk, interpreter)
            self._reference[key] = make_target_maps(
                model.interpreters[interpreter], target_map, benign, model.targets[chunk],
                self.config.seed + chunk.start, pool=model.pool, resize=True,
            )
        return self._reference[key]

    def _measure(
        self, model: PreparedModel, chunk: slice, interpreter: str, target_map: str, reloaded: torch.Tensor, targets: torch.Tensor
    ) -> AttackMeasures:
        reference = self._reference_maps(model, chunk, interpreter, target_map)
        return measure_attack(model.interpreters[interpreter], reloaded, targets, reference, seed=self.config.seed)

    def _records(
        self,
        model: PreparedModel,
        unit: Unit,
        chunk: slice,
        interpreter: str,
        attack: str,
        target_map: str,
        measures: AttackMeasures,
        crafted: CraftedBatch,
        maps: list[tuple[Path, Path]],
        config: AttackConfig,
    ) -> list[ResultRecord]:
        names = model.names[chunk]
        x = model.images[chunk]
        per_image = crafted.seconds / len(names)
        settings = config_json(config)
        records = []
        for i, name in enumerate(names):
            position = chunk.start + i
            benign_npy, benign_png = self._benign_paths(model, interpreter, name)
            records.append(
                ResultRecord(
                    model=model.spec,
                    interpreter=interpreter,
                    attack=attack,
                    target_map=target_map,
                    image=name,
                    true_class=int(model.labels[position]),
                    target_class=int(model.targets[position]),
                    **measure_fields(measures, i, x[i], crafted.reloaded[i]),
                    adversarial_path=self._relative(crafted.paths[i]),
                    map_path=self._relative(maps[i][0]),
                    overlay_path=self._relative(maps[i][1]),
                    benign_map_path=self._relative(benign_npy),
                    benign_overlay_path=self._relative(benign_png),
                    seconds=per_image,
                    seed=config.seed,
                    config=settings,
                )
            )
        return records

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.run_dir).as_posix()

