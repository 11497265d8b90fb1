"""The plan of a run: every model loaded and checked, and the work cut into units.

Units, per model and batch of images, for each attack of the run:

- an interpreter-free attack (PGD): one unit per batch, shared by every interpreter (it does not
  look at maps); rows for every interpreter × target map: that interpreter's map of the attacked
  image for the target class, compared with the reference map.
- an interpreter-bound attack (ADV²): one unit per interpreter A × target map: the attack against
  A, its rows and, with ``transfer``, the same images explained by every interpreter B (B = A
  repeats A's own row).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..attacks import ATTACKS
from ..attacks.targets import check_targets, random_targets
from ..data import open_dataset
from ..errors import InputError, UnderfireError
from ..interpreters import Interpreter, build_interpreter
from ..models import Classifier, load_model
from .config import ExperimentConfig
from .inputs import drawn_target_refusal, images_from_dataset, images_from_files, other_pool

#: (model, interpreter, attack, target map, image): a row of ``results``.
Key = tuple[str, str, str, str, str]
#: (model, source interpreter, target interpreter, target map, image, attack): a row of ``transfer``.
TransferKey = tuple[str, str, str, str, str, str]


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
    sources: list[str | None] = field(default_factory=list)  # per image, the file it was read from

    def input_files(self) -> list[str]:
        """Every file this model's part of the run read: the model's, its interpreters' networks,
        the images' (a run fingerprints them, ``fingerprint``)."""
        files = list(self.classifier.metadata.get("files", ()))
        for interpreter in self.interpreters.values():
            files += interpreter.source_files()
        return files + [source for source in self.sources if source]

    def batches(self, size: int) -> list[slice]:
        return [slice(start, start + size) for start in range(0, len(self.names), size)]


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``attack`` on one batch of one model, against ``interpreter`` and for
    ``target_map`` when the attack uses an interpreter (both None otherwise: the unit covers every
    interpreter and target map)."""

    model: str
    attack: str
    interpreter: str | None
    target_map: str | None
    batch: int
    result_keys: frozenset[Key] = field(repr=False)
    transfer_keys: frozenset[TransferKey] = field(repr=False)

    @property
    def label(self) -> str:
        """A short description for the progress bar and errors."""
        against = f" vs {self.interpreter}" if self.interpreter else ""
        return f"{self.model} {self.attack}{against} batch {self.batch + 1}"


#: Where a run's model metadata is set, for the load check's messages.
MODEL_OPTIONS_HINT = "the command's model flags, a [models.NAME] table of the run config, or a model card NAME.toml beside the model file"


def prepare_models(config: ExperimentConfig, device: str = "cpu") -> list[PreparedModel]:
    """Load every model (on ``device``), build every interpreter, pick the images and targets —
    all the checks that can fail, before any file is written."""
    prepared = []
    for spec in config.models:
        try:
            options = replace(config.model_options_for(spec), device=device)
            classifier = load_model(spec, options, hint=MODEL_OPTIONS_HINT)
        except UnderfireError as error:
            raise InputError(f"experiment.models: {spec!r}: {error}") from None
        interpreters = {}
        for name in config.interpreters:
            try:
                interpreters[name] = build_interpreter(name, classifier, **config.options_for(name))
            except UnderfireError as error:
                raise InputError(f"experiment.interpreters: {name!r} on {spec!r}: {error}") from None
            drawn = [kind for kind in config.target_maps if kind not in ("benign", "other")]
            if drawn and not interpreters[name].accepts_drawn_targets:
                raise InputError(f"experiment.target_maps: {drawn_target_refusal(name, drawn[0])}")
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
        images, labels, names, sources = _select_images(config, classifier, spec, fixed)
        if fixed is None:
            targets = random_targets(labels, classifier.num_classes, config.seed)
        else:
            targets = torch.full_like(labels, fixed)
        check_targets(labels, targets)
        prepared.append(
            PreparedModel(
                spec, safe_name(spec), classifier, interpreters, images, labels, targets, names, pool, sources
            )
        )
    return prepared


def _select_images(
    config: ExperimentConfig, classifier: Classifier, spec: str, fixed: int | None
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str | None]]:
    """The images a model is attacked on, their labels, names and the files they were read from."""
    if config.files:
        try:
            return (*images_from_files(classifier, [Path(name) for name in config.files]), list(config.files))
        except UnderfireError as error:
            raise InputError(f"experiment.files: {error}") from None
    try:
        dataset = open_dataset(
            config.data,
            size=classifier.input_size or 224,
            class_names=classifier.class_names,
            channels=classifier.in_channels,
            outputs=classifier.num_classes,
        )
    except UnderfireError as error:
        raise InputError(f"experiment.data: {error}") from None
    try:
        images, labels, names, chosen = images_from_dataset(classifier, dataset, config.images, exclude=fixed)
    except UnderfireError as error:
        raise InputError(f"experiment.data: {spec!r}: {error}") from None
    samples = getattr(dataset, "samples", None)  # an image folder's (path, label) list
    return images, labels, names, [str(samples[i][0]) if samples is not None else None for i in chosen]


def plan_units(config: ExperimentConfig, model: PreparedModel) -> list[Unit]:
    """Every unit of ``model``, batch by batch (so benign maps are computed once per batch)."""
    units = []
    for index, chunk in enumerate(model.batches(config.batch_size)):
        names = model.names[chunk]
        for attack in config.attacks:
            if not ATTACKS.get(attack).uses_interpreter:
                keys = frozenset(
                    (model.spec, interpreter, attack, target_map, name)
                    for interpreter in config.interpreters
                    for target_map in config.target_maps
                    for name in names
                )
                units.append(Unit(model.spec, attack, None, None, index, keys, frozenset()))
                continue
            for interpreter in config.interpreters:
                for target_map in config.target_maps:
                    keys = frozenset((model.spec, interpreter, attack, target_map, name) for name in names)
                    moved = frozenset(
                        (model.spec, interpreter, other, target_map, name, attack)
                        for other in (config.interpreters if config.transfer else ())
                        for name in names
                    )
                    units.append(Unit(model.spec, attack, interpreter, target_map, index, keys, moved))
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
