"""One attack job end to end (``underfire attack``): pick images and targets, attack in batches,
save 8-bit PNGs, re-load them and measure — what a real attacker's file would do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import ShapesDataset, read_image
from ..data.shapes import SHAPE_CLASSES
from ..errors import InputError
from ..interpreters import Interpreter, build_interpreter
from ..models.classifier import Classifier
from ..visualize import overlay, save_png, to_uint8
from .config import AttackConfig
from .core import ADV2, PGD
from .measure import measure_attack
from .targets import check_targets, load_user_map, other_image_maps, random_targets, shape_maps


@dataclass(frozen=True)
class AttackJob:
    """What ``underfire attack`` was asked to do."""

    interpreter: str = "cam"
    attack: str = "adv2"
    target: str = "random"  # a class id or name, or "random"
    target_map: str = "benign"  # benign | other | shape | circle | rectangle | PATH.npy
    config: AttackConfig = field(default_factory=AttackConfig)
    interpreter_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ("adv2", "pgd"):
            raise InputError(f"attack must be 'adv2' or 'pgd', got {self.attack!r}")
        if self.batch_size <= 0:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        kinds = ("benign", "other", "shape", "circle", "rectangle")
        if self.target_map not in kinds and not self.target_map.endswith(".npy"):
            raise InputError(f"target map must be one of {', '.join(kinds)} or a .npy file, got {self.target_map!r}")
        if self.target_map.endswith(".npy") and not Path(self.target_map).is_file():
            raise InputError(f"target map file {self.target_map!r} does not exist")


def images_from_files(classifier: Classifier, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read every file first (a bad file fails before any work); labels = the benign predictions."""
    size = classifier.input_size or 224
    images = torch.stack([read_image(path, size) for path in paths])
    labels = classifier.predict(images).argmax(1).cpu()
    return images, labels, [str(path) for path in paths]


def images_from_dataset(classifier: Classifier, dataset: Any, limit: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``limit`` correctly classified images of a labelled dataset."""
    chosen: list[int] = []
    step = max(64, limit)
    for start in range(0, len(dataset), step):
        indices = list(range(start, min(start + step, len(dataset))))
        images, labels, _ = dataset.tensors(indices)
        correct = (classifier.predict(images).argmax(1).cpu() == labels).nonzero().flatten().tolist()
        chosen += [indices[i] for i in correct]
        if len(chosen) >= limit:
            break
    chosen = chosen[:limit]
    if not chosen:
        raise InputError("no correctly classified image in the dataset")
    images, labels, _ = dataset.tensors(chosen)
    return images, labels, [f"{getattr(dataset, 'split', 'image')}-{i:05d}" for i in chosen]


def run_attack(
    classifier: Classifier,
    job: AttackJob,
    images: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    out: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack, save and measure; returns the JSON report (also written to ``out/report.json``)."""
    interpreter = build_interpreter(job.interpreter, classifier, **job.interpreter_options)
    targets = _targets(classifier, job, labels)
    check_targets(labels, targets)
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("adversarial", "maps"):
        (out / folder).mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(images), desc=f"{job.attack} vs {job.interpreter}", disable=not progress, unit="img")
    for start in range(0, len(images), job.batch_size):
        chunk = slice(start, start + job.batch_size)
        x, y, t = images[chunk], labels[chunk], targets[chunk]
        benign = interpreter(x, y, seed=job.seed)
        wanted = _target_maps(interpreter, job, benign, t, start)
        if job.attack == "adv2":
            result = ADV2(classifier, interpreter, job.config)(x, t, wanted, labels=y)
        else:
            result = PGD(classifier, job.config)(x, t, labels=y)
        stems = [_stem(start + i, name) for i, name in enumerate(names[chunk])]
        saved = [save_png(to_uint8(result.adversarial[i]), out / "adversarial" / f"{stem}.png") for i, stem in enumerate(stems)]
        reloaded = torch.stack([read_image(path) for path in saved])  # measure the file, not the tensor
        measures = measure_attack(interpreter, reloaded, t, benign, seed=job.seed)
        scale = max(1, 256 // x.shape[-1])
        for i, stem in enumerate(stems):
            for kind, maps, picture in (("benign", benign, x), ("adversarial", measures.maps, reloaded)):
                np.save(out / "maps" / f"{stem}.{kind}.npy", maps[i, 0].cpu().numpy().astype(np.float32))
                save_png(overlay(picture[i], maps[i]), out / "maps" / f"{stem}.{kind}.png", scale)
            rows.append(
                {
                    "image": names[start + i],
                    "adversarial": str(saved[i]),
                    "true_class": int(y[i]),
                    "target_class": int(t[i]),
                    "predicted_class": int(measures.predicted[i]),
                    "success": bool(measures.success[i]),
                    "confidence": round(float(measures.confidence[i]), 5),
                    "l1": round(float(measures.l1[i]), 5),
                    "l2": round(float(measures.l2[i]), 5),
                    "iou": round(float(measures.iou[i]), 5),
                    "iou_by_k": {f"{k:.2f}": round(float(v), 5) for k, v in zip(measures.ks, measures.iou_by_k[i])},
                    "top_k_intersection": round(float(measures.top_k_intersection[i]), 5),
                    "spearman": round(float(measures.spearman[i]), 5),
                    "linf": round(float((reloaded[i] - x[i]).abs().max()), 6),
                }
            )
        bar.update(len(stems))
    bar.close()
    report = {
        "model": classifier.name,
        "interpreter": job.interpreter,
        "attack": job.attack,
        "target_map": job.target_map,
        "config": _jsonable(job.config),
        "images": rows,
        "summary": summarise(rows),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the images (success rate and means over all images, successful or not)."""
    def mean(key: str) -> float:
        return round(float(np.mean([row[key] for row in rows])), 5)

    return {
        "images": len(rows),
        "success_rate": mean("success"),
        "mean_confidence": mean("confidence"),
        "mean_l1": mean("l1"),
        "mean_l2": mean("l2"),
        "mean_iou": mean("iou"),
        "mean_top_k_intersection": mean("top_k_intersection"),
        "mean_spearman": mean("spearman"),
    }


def _targets(classifier: Classifier, job: AttackJob, labels: torch.Tensor) -> torch.Tensor:
    if job.target == "random":
        return random_targets(labels, classifier.num_classes, job.seed)
    return classifier.check_classes(classifier.class_index(job.target), len(labels)).cpu()


def _target_maps(interpreter: Interpreter, job: AttackJob, benign: torch.Tensor, targets: torch.Tensor, offset: int) -> torch.Tensor:
    kind = job.target_map
    if kind == "benign":
        return benign
    size = tuple(benign.shape[-2:])
    if kind in ("shape", "circle", "rectangle"):
        return shape_maps("circle" if kind == "shape" else kind, len(targets), size, job.seed + offset)
    if kind == "other":
        classifier = interpreter.classifier
        if classifier.class_names != list(SHAPE_CLASSES):
            raise InputError("--target-map other draws its maps from the shapes benchmark; use a shapes model")
        pool, pool_labels, _ = ShapesDataset("val", classifier.input_size or 64).tensors(range(500))
        return other_image_maps(interpreter, pool, pool_labels, targets, job.seed + offset)
    user = load_user_map(kind)
    if tuple(user.shape[-2:]) != size:
        raise InputError(f"target map {kind!r} is {tuple(user.shape[-2:])}, the {job.interpreter} maps are {size}")
    return user.expand(len(targets), -1, -1, -1)


def _stem(index: int, name: str) -> str:
    return f"{index:04d}-{Path(name).stem}"


def _jsonable(config: AttackConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(config), default=str))
