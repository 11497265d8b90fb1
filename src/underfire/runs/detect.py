"""``underfire detect``: the ensemble detector on a finished (or partial) run's stored images.

The run's benign images calibrate the threshold at the chosen false-positive rate (in-sample: the
same images the rates are reported on); each model × attack × attacked interpreter × target map
gives the detection rate of its *successful* adversarial examples (a failed attack is not an
adversarial example) and the ROC AUC. Scores are stored per image path in the run's database
(``detector_scores``), one transaction per batch, so a re-run or another false-positive rate
costs no explanation again and an interrupted one keeps what it scored; the summaries go to
``detections``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import read_image
from ..detection import DetectorConfig, EnsembleDetector, summarize
from ..devices import resolve_device
from ..errors import InputError, UnderfireError
from ..models import load_model
from ..progress import progress_bar
from ..store import ResultStore
from ..store.lock import run_lock
from ..store.reader import open_reader
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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def detector_key(config: DetectorConfig) -> str:
    """The ``detector`` column: what makes two detectors' scores different."""
    grid = "auto" if config.grid is None else str(config.grid)
    return f"{config.score}:{','.join(config.members)}:grid={grid}:preset={config.preset}"


def detect_run(
    run_dir: str | Path, config: DetectorConfig, fpr: float, *, device: str = "cpu", progress: bool = False
) -> list[Detection]:
    """Score ``run_dir``'s benign and adversarial images with ``config``'s detector, summarise at
    ``fpr``, store both, and return the summaries."""
    run_dir = Path(run_dir)
    with open_reader(run_dir) as reader:
        meta, images, results = reader.meta(), reader.images(), reader.results()
    if "config" not in meta or not images:
        raise InputError(f"{str(run_dir)!r} holds no attacked images yet; run the experiment first")
    experiment = ExperimentConfig.from_mapping(meta["config"])
    key = detector_key(config)
    summaries: list[Detection] = []
    with run_lock(run_dir), ResultStore(run_dir) as store:
        for spec in experiment.models:
            benign_paths = [row["image_path"] for row in images if row["model"] == spec]
            rows = [row for row in results if row["model"] == spec]
            if not benign_paths:
                continue
            scores = _score_model(store, run_dir, experiment, spec, config, key, benign_paths, rows, device, progress)
            summaries += _summaries(spec, benign_paths, rows, scores, fpr)
        store.replace_detections([{**s.as_dict(), "detector": key, "target_fpr": fpr} for s in summaries])
    return summaries


def _score_model(
    store: ResultStore, run_dir: Path, experiment: ExperimentConfig, spec: str, config: DetectorConfig, key: str,
    benign_paths: list[str], rows: list[dict[str, Any]], device: str, progress: bool,
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
            batch = todo[start:start + BATCH]
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
    spec: str, benign_paths: list[str], rows: list[dict[str, Any]], scores: dict[str, float], fpr: float
) -> list[Detection]:
    benign = np.array([scores[path] for path in benign_paths])
    spread = {
        "n": int(benign.size), "mean": float(benign.mean()), "std": float(benign.std()),
        "median": float(np.median(benign)), "p95": float(np.quantile(benign, 0.95)),
    }
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        group = groups[(row["attack"], row["interpreter"], row["target_map"])]
        if row["success"]:
            group.append(scores[row["adversarial_path"]])
    out = []
    for (attack, interpreter, target_map), attacked in sorted(groups.items()):
        if attacked:
            stats = summarize(benign, attacked, fpr)
            tpr, auc = stats["tpr"], stats["auc"]
        else:  # no successful example to detect
            stats, tpr, auc = summarize(benign, benign, fpr), None, None
        out.append(Detection(spec, attack, interpreter, target_map, len(attacked), stats["threshold"], stats["fpr"], tpr, auc, spread))
    return out
