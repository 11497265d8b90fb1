"""An ensemble of interpreters as one interpreter: the adaptive ADV² against an ensemble defence.

Zhang et al. (2020, §7) observe that ADV² transfers poorly across interpreters and propose an
ensemble of interpreters as a countermeasure; an attacker who knows the ensemble attacks all of it
at once (Carlini et al. 2019; Tramèr et al. 2020). This composite makes that attacker an ordinary
interpreter: its map is its members' maps side by side on one grid, so the ADV² distance, the
mean squared difference to the benign ensemble map, is a weighted sum of the members' own
distances, and its state and extra attack terms are its members'.

The grid is the finest member map (each coarser map is repeated by an integer factor, nearest
neighbour, so average pooling recovers it up to float rounding: :meth:`Ensemble.split`); tile m
is scaled by √(w_m / max w), so the distance is Σ_m w_m·d_m / (M · max w): proportional to the
weighted sum of the members' distances. Target maps are the ensemble's own maps (of the image, or
of another image); a shape drawn over the whole strip would not be one target per member, so
drawn and user target maps are refused. The measures of an ensemble row (IoU, L1) are of the
whole strip, where top-k is dominated by the heaviest member: each member's own IoU is the
transfer table's (ensemble → member).

``detector_weight`` adds the ensemble detector's own score to ℓ_int: the members' disagreement
on c_t on the coarsest member grid, ``detector_score`` ``l1`` (the mean pairwise L1 difference) or
``soft_iou`` (the detector's ``iou`` score with soft top-k sets, ``metrics.soft_iou_top_k``: the
``iou`` score itself has no gradient), so the attacker also pays for the members disagreeing with
each other, not only for each drifting from its benign map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ..errors import InputError, UnderfireError
from ..metrics import disagreement, to_grid
from ..models.classifier import Classifier
from .base import AttackStage, AttackTerms, Interpreter

#: The detector scores the attack can differentiate (``metrics.disagreement``).
DETECTOR_SCORES = ("l1", "soft_iou")


@dataclass(frozen=True)
class EnsembleState:
    """The members' attack states, and their maps of the last surrogate call (for the detector term)."""

    members: tuple[Any, ...]
    maps: tuple[torch.Tensor, ...] | None = None


class Ensemble(Interpreter):
    """Several interpreters attacked, or watched, together.

    Args:
        members: registered interpreter names, e.g. ``("grad", "cam", "rts", "mask")``.
        weights: one positive weight per member for the attack's distance (default: equal).
        member_preset: build every member as the surrogate this preset gives it (the ensemble's
            own presets set it for the copy the attack differentiates, so a ``quick`` attack
            differentiates ``quick`` members); ``None`` (the judged ensemble): the members' own.
        detector_weight: weight of the detector's disagreement among the members' maps in ℓ_int
            (0: the attack ignores the detector's score).
        detector_score: that disagreement: ``l1`` or ``soft_iou`` (see the module docstring).
    """

    name: ClassVar[str] = "ensemble"
    description: ClassVar[str] = (
        "several interpreters side by side, ADV² distance their weighted sum: the adaptive attack "
        "on an ensemble defence (Zhang et al. 2020, §7)"
    )
    paper_class: ClassVar[str] = "other"
    accepts_drawn_targets: ClassVar[bool] = False

    def __init__(
        self,
        classifier: Classifier,
        *,
        members: tuple[str, ...] = ("grad", "cam", "rts", "mask"),
        weights: tuple[float, ...] | None = None,
        member_preset: Literal["quick", "paper"] | None = None,
        detector_weight: float = 0.0,
        detector_score: Literal["l1", "soft_iou"] = "l1",
    ) -> None:
        super().__init__(classifier)
        from ..presets import surrogate_options
        from . import build_interpreter  # the registry module imports this one

        names = tuple(members)
        if len(names) < 2:
            raise InputError(f"an ensemble needs at least two members, got {list(names)}")
        if len(set(names)) != len(names) or self.name in names:
            raise InputError(f"ensemble members must be distinct interpreters other than ensemble, got {list(names)}")
        weights = (1.0,) * len(names) if weights is None else tuple(weights)
        if len(weights) != len(names) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights
        ):
            raise InputError(f"give one positive weight per member ({len(names)}), got {list(weights)}")
        if (
            isinstance(detector_weight, bool)
            or not isinstance(detector_weight, (int, float))
            or not (math.isfinite(detector_weight) and detector_weight >= 0)
        ):
            raise InputError(f"the ensemble's detector_weight must be a finite number >= 0, got {detector_weight!r}")
        if detector_score not in DETECTOR_SCORES:
            raise InputError(
                f"the ensemble's detector_score must be one of {', '.join(DETECTOR_SCORES)}, got {detector_score!r}"
            )
        self.detector_weight = float(detector_weight)
        self.detector_score = detector_score
        self.names = names
        self.weights = tuple(float(w) for w in weights)
        self.members: list[Interpreter] = []
        for name in names:
            try:
                options = {} if member_preset is None else surrogate_options(member_preset, name)
                self.members.append(build_interpreter(name, classifier, **options))
            except UnderfireError as error:
                raise type(error)(f"ensemble member {name!r}: {error}") from None
        top = max(self.weights)
        #: each member's share of the distance: w_m / (M · max w)
        self.shares = tuple(w / (top * len(names)) for w in self.weights)
        self._scales = tuple(math.sqrt(w / top) for w in self.weights)
        self._shapes: dict[tuple[int, int], list[tuple[int, int]]] = {}

    # --- the grid ---------------------------------------------------------------------------

    def member_shapes(self, images: torch.Tensor) -> list[tuple[int, int]]:
        """Each member's (h, w) for ``images``' size (asked once per size: the attack asks every step)."""
        size = tuple(images.shape[-2:])
        if size not in self._shapes:
            self._shapes[size] = [tuple(m.map_shape(images)) for m in self.members]  # type: ignore[misc]
        return self._shapes[size]

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """The finest member map; every member's must divide it."""
        shapes = self.member_shapes(images)
        height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
        for name, (h, w) in zip(self.names, shapes):
            if height % h or width % w:
                raise InputError(
                    f"the ensemble's grid is {height}x{width}, which {name}'s {h}x{w} maps do not divide; "
                    "choose members whose map sizes divide the finest one"
                )
        return height, width

    def map_shape(self, images: torch.Tensor) -> tuple[int, int]:
        height, width = self.grid(images)
        return height, width * len(self.members)

    def tile(self, member_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Members' maps (N, 1, h_m, w_m) → the ensemble map (N, 1, H, M·W)."""
        height = max(m.shape[-2] for m in member_maps)
        width = max(m.shape[-1] for m in member_maps)
        tiles = [
            scale
            * (
                maps
                if maps.shape[-2:] == (height, width)
                else F.interpolate(maps, size=(height, width), mode="nearest")
            )
            for maps, scale in zip(member_maps, self._scales)
        ]
        return torch.cat(tiles, dim=-1)

    def split(self, maps: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """The ensemble map → each member's map at its own ``shapes`` (``tile``'s inverse, to rounding)."""
        tiles = maps.chunk(len(self.members), dim=-1)
        return [
            F.adaptive_avg_pool2d(tile / scale, shape) if tuple(tile.shape[-2:]) != tuple(shape) else tile / scale
            for tile, scale, shape in zip(tiles, self._scales, shapes)
        ]

    # --- the contract -----------------------------------------------------------------------

    def source_files(self) -> tuple[str, ...]:
        return tuple(f for m in self.members for f in m.source_files())

    def check_attackable(self) -> None:
        for member in self.members:
            member.check_attackable()

    def initial_state(self, seed: int, device: torch.device) -> EnsembleState:
        return EnsembleState(tuple(m.initial_state(seed, device) for m in self.members))

    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        self.grid(images)  # members whose maps do not divide the grid: one line, not a blurred tile
        return self.tile([m.explain(images, classes, generator=generator) for m in self.members])

    def surrogate(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, EnsembleState]:
        states = self._states(state)
        self.grid(images)
        results = [m.surrogate(images, classes, s) for m, s in zip(self.members, states)]
        maps = tuple(maps for maps, _ in results)
        return self.tile(maps), EnsembleState(tuple(s for _, s in results), maps)

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, EnsembleState]:
        """The first member's ``surrogate_and_logits`` and the others' ``surrogate`` (their states
        feed their attack terms, their maps the detector term): the logits are the first member's
        (every member's equal ``classifier(images)``), so no other member pays a forward pass for
        logits the attack would drop (RTS's and MASK's: one each per step)."""
        states = self._states(state)
        self.grid(images)
        first_maps, logits, first_state = self.members[0].surrogate_and_logits(images, classes, states[0])
        rest = [m.surrogate(images, classes, s) for m, s in zip(self.members[1:], states[1:])]
        maps = (first_maps, *(maps for maps, _ in rest))
        return self.tile(maps), logits, EnsembleState((first_state, *(s for _, s in rest)), maps)

    def attack_terms(
        self,
        stage: AttackStage,
        images: torch.Tensor,
        classes: torch.Tensor,
        target_maps: torch.Tensor,
        state: Any = None,
    ) -> AttackTerms | None:
        """The members' own terms: interpretation terms at their share of the distance, extra
        terms at w_m / max w; in the joint stage, ``detector_weight`` × the members' disagreement."""
        states = self._states(state)
        targets = self.split(target_maps, self.member_shapes(images))
        interpretation: torch.Tensor | None = None
        extra: torch.Tensor | None = None
        for member, target, member_state, share, scale in zip(self.members, targets, states, self.shares, self._scales):
            terms = member.attack_terms(stage, images, classes, target, member_state)
            if terms is None:
                continue
            if terms.interpretation is not None:
                part = share * terms.interpretation
                interpretation = part if interpretation is None else interpretation + part
            if terms.extra is not None:
                part = scale**2 * terms.extra
                extra = part if extra is None else extra + part
        if self.detector_weight > 0 and stage == "joint":
            if not isinstance(state, EnsembleState) or state.maps is None:
                raise InputError(
                    "the ensemble's detector term needs the state of its surrogate call (surrogate_and_logits)"
                )
            part = self.detector_weight * self.disagreement(state.maps)
            interpretation = part if interpretation is None else interpretation + part
        if interpretation is None and extra is None:
            return None
        return AttackTerms(interpretation=interpretation, extra=extra)

    def disagreement(self, member_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N,) the detector's ``detector_score`` of members' maps (at their own sizes), on the coarsest grid."""
        size = min((tuple(m.shape[-2:]) for m in member_maps), key=lambda s: s[0] * s[1])
        return disagreement([to_grid(m, size) for m in member_maps], self.detector_score)  # type: ignore[arg-type]

    def _states(self, state: Any) -> tuple[Any, ...]:
        if state is None:
            return (None,) * len(self.members)
        if isinstance(state, EnsembleState):
            state = state.members
        if not isinstance(state, tuple) or len(state) != len(self.members):
            raise InputError(
                f"the ensemble's state is one state per member ({len(self.members)}), got {type(state).__name__}"
            )
        return state
