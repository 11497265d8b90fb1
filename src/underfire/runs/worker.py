"""Computing one unit of a run: attack, encode, measure — with no file and no database touched.

A worker returns a ``UnitOutput``: the rows and the contents of every file the unit produces. The
adversarial images are encoded as 8-bit PNGs in memory and decoded again, and every measure is
taken on the decoded image: exactly what the file the driver writes holds, as a real attacker's
file would be. Only the driver (``execute.run_experiment``) writes files and rows, so the same
worker can run in this process or elsewhere (an executor decides).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from ..attacks import build_attack
from ..attacks.measure import AttackMeasures, measure_attack
from ..data.images import decode_image
from ..store import ResultRecord, TransferRecord
from ..store.files import npy_bytes, png_bytes
from ..visualize import overlay, to_uint8
from .config import ExperimentConfig
from .plan import PreparedModel, Unit, target_map_slug


@dataclass
class UnitOutput:
    """What a unit computed: its rows, and its files as (path relative to the run folder, bytes)."""

    unit: Unit
    results: list[ResultRecord]
    transfer: list[TransferRecord]
    files: list[tuple[str, bytes]] = field(repr=False)
    #: benign map files: written by the driver only where absent (several units share them)
    shared_files: list[tuple[str, bytes]] = field(repr=False, default_factory=list)


def config_json(config: Any) -> str:
    """An attack configuration (a dataclass) as JSON text (the ``config`` column)."""
    return json.dumps(asdict(config), sort_keys=True, default=str)


class UnitWorker:
    """Computes units of one experiment; keeps the current batch's benign and reference maps
    between its units (units come batch by batch)."""

    def __init__(self, config: ExperimentConfig, models: dict[str, PreparedModel]) -> None:
        self.config = config
        self.models = models
        self.options = {
            name: json.dumps(config.options_for(name), sort_keys=True, default=str) for name in config.interpreters
        }
        self._batch: tuple[str, int] | None = None
        self._benign: dict[str, torch.Tensor] = {}
        self._reference: dict[tuple[str, str], torch.Tensor] = {}
        self._shared: list[tuple[str, bytes]] = []

    def __call__(self, unit: Unit) -> UnitOutput:
        model = self.models[unit.model]
        if self._batch != (model.spec, unit.batch):
            self._batch, self._benign, self._reference = (model.spec, unit.batch), {}, {}
        self._shared = []
        chunk = model.batches(self.config.batch_size)[unit.batch]
        if unit.interpreter is None:
            output = self._shared_attack(model, unit, chunk)
        else:
            output = self._bound_attack(model, unit, chunk)
        output.shared_files = self._shared
        return output

    # ------------------------------------------------------------------------------ units
    def _shared_attack(self, model: PreparedModel, unit: Unit, chunk: slice) -> UnitOutput:
        """An interpreter-free attack: one attack, measured with every interpreter × target map."""
        config = self.config.config_for(unit.attack)
        folder = self._folder(model) / unit.attack
        names = model.names[chunk]
        reloaded, adversarial_files, seconds = self._craft(model, unit, chunk, config, None, None, folder)
        files = list(adversarial_files)
        rows = []
        for interpreter in self.config.interpreters:
            for number, target_map in enumerate(self.config.target_maps):
                measures = self._measure(model, chunk, interpreter, target_map, reloaded)
                maps = [
                    (folder / interpreter / f"{n}.map.npy", folder / interpreter / f"{n}.overlay.png") for n in names
                ]
                if number == 0:  # the attacked image's map does not depend on the target map
                    files += self._map_files(measures.maps, reloaded, maps)
                rows += self._records(
                    model,
                    chunk,
                    interpreter,
                    unit.attack,
                    target_map,
                    measures,
                    reloaded,
                    adversarial_files,
                    maps,
                    seconds,
                    config,
                )
        return UnitOutput(unit, rows, [], files)

    def _bound_attack(self, model: PreparedModel, unit: Unit, chunk: slice) -> UnitOutput:
        """An interpreter-bound attack against ``unit.interpreter`` for one target map, with transfer."""
        source, target_map = unit.interpreter, unit.target_map
        assert source is not None and target_map is not None
        config = self.config.config_for(unit.attack, source)
        folder = self._folder(model) / unit.attack / target_map_slug(target_map) / source
        names = model.names[chunk]
        wanted = self._reference_maps(model, chunk, source, target_map)
        reloaded, adversarial_files, seconds = self._craft(
            model, unit, chunk, config, model.interpreters[source], wanted, folder
        )
        measures = self._measure(model, chunk, source, target_map, reloaded)
        maps = [(folder / f"{n}.map.npy", folder / f"{n}.overlay.png") for n in names]
        files = list(adversarial_files) + self._map_files(measures.maps, reloaded, maps)
        rows = self._records(
            model, chunk, source, unit.attack, target_map, measures, reloaded, adversarial_files, maps, seconds, config
        )
        moved = []
        for other in sorted({key[2] for key in unit.transfer_keys}, key=self.config.interpreters.index):
            seen = measures if other == source else self._measure(model, chunk, other, target_map, reloaded)
            moved += [
                TransferRecord(
                    model.spec,
                    source,
                    other,
                    target_map,
                    name,
                    float(seen.l1[i]),
                    float(seen.l2[i]),
                    float(seen.iou[i]),
                    unit.attack,
                )
                for i, name in enumerate(names)
            ]
        return UnitOutput(unit, rows, moved, files)

    # ---------------------------------------------------------------------------- helpers
    def _craft(
        self,
        model: PreparedModel,
        unit: Unit,
        chunk: slice,
        config: Any,
        interpreter: Any,
        wanted: torch.Tensor | None,
        folder: PurePosixPath,
    ) -> tuple[torch.Tensor, list[tuple[str, bytes]], float]:
        """Attack the batch, encode each adversarial image as an 8-bit PNG and decode it again:
        the measures see exactly what the file holds. Returns the decoded images, the files and
        the attack's wall time for the whole batch."""
        x, y, t = model.images[chunk], model.labels[chunk], model.targets[chunk]
        started = time.perf_counter()
        attack = build_attack(unit.attack, model.classifier, config, interpreter)
        result = attack(x, t, wanted, labels=y)
        seconds = time.perf_counter() - started
        files = [
            (str(folder / f"{name}.png"), png_bytes(to_uint8(result.adversarial[i])))
            for i, name in enumerate(model.names[chunk])
        ]
        reloaded = torch.stack([decode_image(data, path, model.classifier.in_channels) for path, data in files])
        return reloaded, files, seconds

    def _map_files(
        self, maps: torch.Tensor, pictures: torch.Tensor, paths: list[tuple[PurePosixPath, PurePosixPath]]
    ) -> list[tuple[str, bytes]]:
        files = []
        for i, (npy, png) in enumerate(paths):
            files += map_files(maps[i], pictures[i], str(npy), str(png))
        return files

    def _folder(self, model: PreparedModel) -> PurePosixPath:
        return PurePosixPath("files") / model.slug

    def _benign_paths(self, model: PreparedModel, interpreter: str, name: str) -> tuple[str, str]:
        folder = self._folder(model) / "benign" / interpreter
        return str(folder / f"{name}.npy"), str(folder / f"{name}.png")

    def _benign_maps(self, model: PreparedModel, chunk: slice, interpreter: str) -> torch.Tensor:
        """The benign maps of the batch (for the true classes), computed once per batch; their
        files go with the first unit of the batch that needs them."""
        if interpreter not in self._benign:
            x = model.images[chunk]
            maps = model.interpreters[interpreter](x, model.labels[chunk], seed=self.config.seed)
            for i, name in enumerate(model.names[chunk]):
                self._shared += map_files(maps[i], x[i], *self._benign_paths(model, interpreter, name))
            self._benign[interpreter] = maps
        return self._benign[interpreter]

    def _reference_maps(self, model: PreparedModel, chunk: slice, interpreter: str, target_map: str) -> torch.Tensor:
        """The attacker's target maps for this batch and interpreter (seeded by batch position)."""
        from .inputs import make_target_maps

        key = (interpreter, target_map)
        if key not in self._reference:
            benign = self._benign_maps(model, chunk, interpreter)
            self._reference[key] = make_target_maps(
                model.interpreters[interpreter],
                target_map,
                benign,
                model.targets[chunk],
                self.config.seed + chunk.start,
                pool=model.pool,
                resize=True,
            )
        return self._reference[key]

    def _measure(
        self, model: PreparedModel, chunk: slice, interpreter: str, target_map: str, reloaded: torch.Tensor
    ) -> AttackMeasures:
        reference = self._reference_maps(model, chunk, interpreter, target_map)
        return measure_attack(
            model.interpreters[interpreter], reloaded, model.targets[chunk], reference, seed=self.config.seed
        )

    def _records(
        self,
        model: PreparedModel,
        chunk: slice,
        interpreter: str,
        attack: str,
        target_map: str,
        measures: AttackMeasures,
        reloaded: torch.Tensor,
        adversarial_files: list[tuple[str, bytes]],
        maps: list[tuple[PurePosixPath, PurePosixPath]],
        seconds: float,
        config: Any,
    ) -> list[ResultRecord]:
        names = model.names[chunk]
        x = model.images[chunk]
        per_image = seconds / len(names)
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
                    **measure_fields(measures, i, x[i], reloaded[i]),
                    adversarial_path=adversarial_files[i][0],
                    map_path=str(maps[i][0]),
                    overlay_path=str(maps[i][1]),
                    benign_map_path=benign_npy,
                    benign_overlay_path=benign_png,
                    seconds=per_image,
                    seed=getattr(config, "seed", self.config.seed),
                    config=settings,
                    interpreter_options=self.options[interpreter],
                )
            )
        return records


def map_files(saliency: torch.Tensor, picture: torch.Tensor, npy_path: str, png_path: str) -> list[tuple[str, bytes]]:
    """A (1, h, w) map as float32 ``.npy`` and as a jet overlay on ``picture`` (3, H, W), enlarged
    to about 256 px so small maps stay readable."""
    array = saliency[0].detach().cpu().numpy().astype(np.float32)
    return [
        (npy_path, npy_bytes(array)),
        (png_path, png_bytes(overlay(picture, saliency), max(1, 256 // picture.shape[-1]))),
    ]


def measure_fields(measures: AttackMeasures, i: int, benign: torch.Tensor, reloaded: torch.Tensor) -> dict[str, Any]:
    """Sample ``i``'s measures as plain Python values (unrounded); ``linf`` is taken between the
    benign image and the re-loaded PNG."""
    return {
        "predicted_class": int(measures.predicted[i]),
        "success": bool(measures.success[i]),
        "confidence": float(measures.confidence[i]),
        "l1": float(measures.l1[i]),
        "l2": float(measures.l2[i]),
        "iou": float(measures.iou[i]),
        "iou_by_k": {f"{k:.2f}": float(v) for k, v in zip(measures.ks, measures.iou_by_k[i])},
        "top_k_intersection": float(measures.top_k_intersection[i]),
        "spearman": float(measures.spearman[i]),
        "linf": float((reloaded - benign).abs().max()),
    }
