"""Model-guided interpreter RTS: real-time saliency (Dabkowski & Gal, NeurIPS 2017).

A trained network (``underfire.models.saliency.SaliencyNetwork``) predicts, in one forward pass,
the mask that a slow perturbation method would find; trained networks for ``shapes-resnet`` and
``shapes-densenet`` ship with the package, so ``Rts(load_model("shapes-resnet"))`` just works.

The ADV² attack on RTS (Zhang et al. 2020) adds ``encoder_weight·CE(enc(x), c_t)`` (0.1) to also
fool RTS's own encoder; ``Rts.attack_terms`` supplies it, from the encoder logits that the
surrogate's own encoder pass left in its state (``RtsState``). underfire also adds the term to the
PGD warm start (``warm_start_encoder_weight``): RTS switches its mask off for a class its encoder
does not see, and a warm start that fools only the classifier leaves the mask off for c_t on many
images, where stage 2's map term has almost no gradient (docs/tuning.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.checkpoint import metadata_path
from ..models.classifier import Classifier
from ..models.saliency import (
    SHIPPED_ADVERSARIAL_RTS,
    SHIPPED_ENCODER,
    SHIPPED_RTS,
    SaliencyNetwork,
    load_saliency_network,
    save_saliency_network,
    shipped_rts_path,
)
from .base import AttackStage, AttackTerms, Interpreter, normalize_maps

__all__ = [
    "SHIPPED_ADVERSARIAL_RTS",
    "SHIPPED_ENCODER",
    "SHIPPED_RTS",
    "Rts",
    "RtsState",
    "SaliencyNetwork",
    "load_saliency_network",
    "save_saliency_network",
    "shipped_rts_path",
]


@dataclass(frozen=True)
class RtsState:
    """What ``Rts.surrogate`` returns as its state: the logits of RTS's own encoder from the same
    pass that made the masks (the attack's encoder term reuses them instead of a second pass)."""

    encoder_logits: torch.Tensor


class Rts(Interpreter):
    """RTS (Dabkowski & Gal 2017): the mask a trained saliency network predicts for the class.

    Args:
        classifier: the model being explained.
        network: a trained ``SaliencyNetwork`` for this classifier.
        checkpoint: or the path of an RTS checkpoint (``underfire train rts --model SPEC``).
        encoder_weight: weight of ``CE(enc(x), c_t)`` in ADV²'s joint stage (the paper's 0.1).
        warm_start_encoder_weight: weight of the same term in the PGD warm start (underfire's
            addition, 0.3: the warm start then also fools RTS's encoder, so stage 2 starts with
            the mask on for c_t, see docs/tuning.md; the ``paper`` preset sets 0, the paper's
            plain warm start).
        variant: ``"adversarial"`` loads the shipped network fine-tuned against ADV²
            (``training.rts_adversarial``, a defence) instead of the plain one.

    With neither network nor checkpoint, the classifier's own (its metadata's ``rts``: the CLI's
    ``--rts``, a model card's or a ``[models.NAME]`` table's key), else the shipped network of a
    built-in classifier
    (``shapes-resnet``, ``shapes-densenet``) is loaded. Maps are the masks (high = salient)
    min-max normalised per image, at 1/4 of the input resolution. The network is moved to the
    classifier's device and run frozen (eval mode, no parameter gradients; flags restored after
    every call).
    """

    name = "rts"
    description = "real-time saliency network (Dabkowski & Gal 2017)"
    paper_class = "model-guided"
    #: an empty mask is RTS's answer for a class that is not in the image
    refuses_constant_maps = False

    def __init__(
        self,
        classifier: Classifier,
        network: SaliencyNetwork | None = None,
        *,
        checkpoint: str | Path | None = None,
        encoder_weight: float = 0.1,
        warm_start_encoder_weight: float = 0.3,
        variant: Literal["plain", "adversarial"] = "plain",
    ) -> None:
        super().__init__(classifier)
        if variant not in ("plain", "adversarial"):
            raise InputError(f"RTS variant must be 'plain' or 'adversarial', got {variant!r}")
        for label, weight in (
            ("encoder_weight", encoder_weight),
            ("warm_start_encoder_weight", warm_start_encoder_weight),
        ):
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight < 0
            ):
                raise InputError(f"{label} must be finite and >= 0, got {weight!r}")
        self.encoder_weight = float(encoder_weight)
        self.warm_start_encoder_weight = float(warm_start_encoder_weight)
        self.metadata: dict[str, Any] = {}
        self._files: tuple[str, ...] = ()
        if network is not None and checkpoint is not None:
            raise InputError("pass either an RTS network or a checkpoint path, not both")
        if variant == "adversarial" and (network is not None or checkpoint is not None):
            raise InputError(
                "variant=adversarial picks the shipped adversarially trained network; with your own "
                "network or checkpoint, pass the adversarially trained one itself (underfire train rts-adversarial)"
            )
        if network is None:
            if checkpoint is None and variant == "plain":
                checkpoint = classifier.metadata.get("rts")  # the model's metadata (--rts, a card)
            if checkpoint is None:
                shipped, command = (
                    (SHIPPED_ADVERSARIAL_RTS, "rts-adversarial") if variant == "adversarial" else (SHIPPED_RTS, "rts")
                )
                if classifier.name not in shipped:
                    raise InputError(
                        f"no RTS network ships for model {classifier.name!r}; train one with "
                        f"`underfire train {command} --model SPEC` and pass it with --rts PATH (or checkpoint=PATH)"
                    )
                checkpoint = shipped_rts_path(shipped[classifier.name])
                if not checkpoint.is_file():
                    raise InputError(
                        f"the shipped RTS network {checkpoint.name!r} is missing from this installation; "
                        f"train one with `underfire train {command} --model {classifier.name}`"
                    )
            network, self.metadata = load_saliency_network(checkpoint)
            self._files = (str(checkpoint), str(metadata_path(checkpoint)))
        elif not isinstance(network, SaliencyNetwork):
            raise InputError(f"network must be a SaliencyNetwork, got {type(network).__name__}")
        if network.num_classes != classifier.num_classes:
            raise InputError(
                f"the RTS network selects among {network.num_classes} classes but the model has "
                f"{classifier.num_classes}; train one for this model with `underfire train rts`"
            )
        self.network = network.to(classifier.device)

    def source_files(self) -> tuple[str, ...]:
        """The RTS checkpoint (weights and metadata) when the network was loaded from one."""
        return self._files

    def _on(self, device: torch.device) -> SaliencyNetwork:
        if self.network.mean.device != device:
            self.network.to(device)
        return self.network

    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Benign maps: the network's masks for ``classes``, normalised (no graph kept)."""
        with torch.no_grad():
            maps, _ = self.surrogate(images, classes)
        return maps

    def surrogate(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, RtsState]:
        """Normalised masks (N, 1, H/4, W/4), differentiable w.r.t. ``images``, and the encoder's
        logits of the same pass (``RtsState``; the incoming state is not used)."""
        network = self._on(images.device)
        with network.frozen():
            masks, logits = network.masks_and_logits(images, classes)
        return normalize_maps(masks), RtsState(logits)

    def attack_terms(
        self,
        stage: AttackStage,
        images: torch.Tensor,
        classes: torch.Tensor,
        target_maps: torch.Tensor,
        state: Any = None,
    ) -> AttackTerms | None:
        """``w·CE(enc(x), c_t)``: fool RTS's own encoder too (joint stage: from ``state``'s logits)."""
        weight = self.warm_start_encoder_weight if stage == "warm_start" else self.encoder_weight
        if weight <= 0:
            return None
        logits = state.encoder_logits if isinstance(state, RtsState) else self.encoder_logits(images)
        return AttackTerms(extra=weight * F.cross_entropy(logits, classes, reduction="none"))

    def masks(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) masks in [0, 1]: near zero everywhere for a class not in the image."""
        network = self._on(images.device)
        with network.frozen():
            return network(images, classes)

    def encoder_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of RTS's own encoder (differentiable w.r.t. ``images``): the attack's extra term."""
        network = self._on(images.device)
        with network.frozen():
            return network.encoder_logits(images)
