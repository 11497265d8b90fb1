"""``underfire detect``: the ensemble detector on a finished (or partial) run's stored images.

The run's benign images calibrate the threshold at the chosen false-positive rate: all of them
(in-sample, the same images the rates are reported on), or with ``holdout=h`` a seeded share 1 − h
of them, the rates (FPR, TPR, AUC) then taken on the held-out benign images and on the adversarial
examples made from them only. Each model × attack × attacked interpreter × target map gives the
detection rate of its *successful* adversarial examples (a failed attack is not an adversarial
example) and the ROC AUC; an attack whose examples do not depend on the interpreter (PGD: one
image per input, measured on each interpreter) is one row, interpreter ``any``. Scores are stored per image path in the run's database
(``detector_scores``), one transaction per batch, so a re-run or another false-positive rate
costs no explanation again and an interrupted one keeps what it scored; the summaries go to
``detections``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import read_image
from ..detection import DetectorConfig, EnsembleDetector, detection_rate, roc_auc, threshold_at_fpr
from ..devices import resolve_device
from ..errors import InputError, UnderfireError
from ..models import load_model
from ..progress import progress_bar
from ..store import ResultStore
from ..store.lock import run_lock
from ..store.reader import open_reader
from ..versions import __version__
from .config import ExperimentConfig

#: Images explained per detector call.
BATCH = 16


@dataclass(frozen=True)
class Detection:
    """One summary row: a model × attack × attacked interpreter × target map at one FPR."""

    model: str
    attack: str
    interpreter: str
    target_map: str
    examples: int
    threshold: float
    fpr: float
    tpr: float | None
    auc: float | None
    benign: dict[str, float]
    #: benign images the threshold was calibrated on, and those the rates were measured on (the
    #: same images when in-sample)
    calibration: int = 0
    evaluation: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: The interpreter of a summary row whose attack's examples are shared by every interpreter.
ANY = "any"


def detector_key(config: DetectorConfig) -> str:
    """The ``detector`` column: what makes two detectors' scores different. The members are built
    by name and options, and the library version pins their defaults and shipped networks."""
    grid = "auto" if config.grid is None else str(config.grid)
    options = json.dumps(config.member_options, sort_keys=True, default=str) if config.member_options else ""
    return f"{config.score}:{','.join(config.members)}:grid={grid}:{options}:underfire={__version__}"


def detect_run(
    run_dir: str | Path,
    config: DetectorConfig,
    fpr: float,
    *,
    device: str = "cpu",
    progress: bool = False,
    holdout: float = 0.0,
    seed: int = 0,
    models: tuple[str, ...] | None = None,
) -> list[Detection]:
    """Score ``run_dir``'s benign and adversarial images with ``config``'s detector, summarise at
    ``fpr`` (calibrated in-sample, or on a seeded share 1 − ``holdout`` of the benign images),
    store both, and return the summaries (of ``models`` only, when given: the run's model specs)."""
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise InputError(f"the held-out share of benign images must be in [0, 1), got {holdout!r}")
    run_dir = Path(run_dir)
    with open_reader(run_dir) as reader:
        meta, images, results = reader.meta(), reader.images(), reader.results()
    if "config" not in meta or not images:
        raise InputError(f"{str(run_dir)!r} holds no attacked images yet; run the experiment first")
    experiment = ExperimentConfig.from_mapping(meta["config"])
    unknown = sorted(set(models or ()) - set(experiment.models))
    if unknown:
        raise InputError(f"the run has no model {unknown[0]!r}; its models: {', '.join(experiment.models)}")
    if not config.member_options:  # explain with the interpreters the run judged
        judged = {name: experiment.options_for(name) for name in config.members if name in experiment.interpreters}
        config = replace(config, member_options={name: options for name, options in judged.items() if options})
    key = detector_key(config)
    summary_key = key if not holdout else f"{key}:holdout={holdout:g}:seed={seed}"
    summaries: list[Detection] = []
    with run_lock(run_dir), ResultStore(run_dir) as store:
        for spec in experiment.models:
            if models and spec not in models:
                continue
            benign = {row["image"]: row["image_path"] for row in images if row["model"] == spec}
            rows = [row for row in results if row["model"] == spec]
            if not benign:
                continue
            scores = _score_model(
                store, run_dir, experiment, spec, config, key, list(benign.values()), rows, device, progress
            )
            calibration, evaluation = split_images(sorted(benign), holdout, seed)
            summaries += _summaries(spec, benign, calibration, evaluation, rows, scores, fpr)
        store.replace_detections([{**s.as_dict(), "detector": summary_key, "target_fpr": fpr} for s in summaries])
    return summaries


def split_images(names: list[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) image names: all of them twice when ``holdout`` is 0, else a
    seeded permutation's first 1 − ``holdout`` and the rest (each at least one image)."""
    if not holdout:
        return names, names
    held = int(round(holdout * len(names)))
    if not 1 <= held < len(names):
        raise InputError(
            f"holding out {holdout:g} of {len(names)} benign images leaves no image to "
            f"{'evaluate on' if held < 1 else 'calibrate on'}; run more images or change --holdout"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    return [names[i] for i in sorted(order[held:])], [names[i] for i in sorted(order[:held])]


def example_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[tuple[str, str]]]:
    """(attack, interpreter, target map) → the (image, adversarial path) of its successful
    examples, in row order; an attack × target map whose rows hold the same adversarial images for
    every interpreter (PGD) is one group, interpreter ``ANY``, so its examples count once."""
    groups: dict[tuple[str, str, str], list[tuple[str, str]]] = defaultdict(list)
    files: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for row in rows:
        key = (row["attack"], row["interpreter"], row["target_map"])
        files[key].add(row["adversarial_path"])
        if row["success"]:
            groups[key].append((row["image"], row["adversarial_path"]))
        else:
            groups.setdefault(key, [])
    merged: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for attack, target_map in dict.fromkeys((a, t) for a, _, t in files):
        keys = [k for k in files if (k[0], k[2]) == (attack, target_map)]
        if len(keys) > 1 and all(files[k] == files[keys[0]] for k in keys):
            merged[(attack, ANY, target_map)] = groups[keys[0]]
        else:
            merged.update((k, groups[k]) for k in keys)
    return merged


def _score_model(
    store: ResultStore,
    run_dir: Path,
    experiment: ExperimentConfig,
    spec: str,
    config: DetectorConfig,
    key: str,
    benign_paths: list[str],
    rows: list[dict[str, Any]],
    device: str,
    progress: bool,
) -> dict[str, float]:
    """Every benign and successful adversarial image's score, computing only the missing ones."""
    scores = store.detector_scores(spec, key)
    wanted = list(dict.fromkeys(benign_paths + [row["adversarial_path"] for row in rows if row["success"]]))
    todo = [path for path in wanted if path not in scores]
    if not todo:
        return scores
    try:
        options = replace(experiment.model_options_for(spec), device=resolve_device(device))
        classifier = load_model(spec, options)
    except UnderfireError as error:
        raise InputError(f"model {spec!r} of the run: {error}") from None
    detector = EnsembleDetector(classifier, config)
    with progress_bar(len(todo), desc=f"detect {spec}", unit="image", enabled=progress) as bar:
        for start in range(0, len(todo), BATCH):
            batch = todo[start : start + BATCH]
            tensors = torch.stack([read_image(run_dir / path, channels=classifier.in_channels) for path in batch])
            values = detector.scores(tensors).tolist()
            bad = [path for path, value in zip(batch, values) if not np.isfinite(value)]
            if bad:
                raise InputError(
                    f"the detector's score of {str(run_dir / bad[0])!r} is not finite (a member's map holds NaN); "
                    "the scores before it are stored"
                )
            fresh = dict(zip(batch, values))
            store.insert_detector_scores(spec, key, fresh)
            scores.update(fresh)
            bar.update(len(batch))
    return scores


def _summaries(
    spec: str,
    benign_paths: dict[str, str],
    calibration: list[str],
    evaluation: list[str],
    rows: list[dict[str, Any]],
    scores: dict[str, float],
    fpr: float,
) -> list[Detection]:
    every = np.array([scores[path] for path in benign_paths.values()])
    spread = {
        "n": int(every.size),
        "mean": float(every.mean()),
        "std": float(every.std()),
        "median": float(np.median(every)),
        "p95": float(np.quantile(every, 0.95)),
    }
    threshold = threshold_at_fpr([scores[benign_paths[name]] for name in calibration], fpr)
    benign = np.array([scores[benign_paths[name]] for name in evaluation])
    evaluated = set(evaluation)
    out = []
    for (attack, interpreter, target_map), examples in sorted(example_groups(rows).items()):
        attacked = [scores[path] for image, path in examples if image in evaluated]
        tpr = detection_rate(attacked, threshold) if attacked else None  # None: no successful example to detect
        auc = roc_auc(benign, attacked) if attacked else None
        out.append(
            Detection(
                spec,
                attack,
                interpreter,
                target_map,
                len(attacked),
                threshold,
                detection_rate(benign, threshold),
                tpr,
                auc,
                spread,
                len(calibration),
                len(evaluation),
            )
        )
    return out
