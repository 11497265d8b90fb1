"""Adversarially trained RTS (``underfire train rts-adversarial``): ADV² folded into the
interpreter's training, the countermeasure of Zhang et al. 2020 (§7, "Interpretable Deep Learning
under Fire").

Why this objective. ADV² makes the classifier say c_t about an image that does not contain c_t,
while RTS still draws the benign object for c_t. RTS's own training already says what its mask
must be for a class that is not in the image: empty (the "fake selector" of Dabkowski & Gal 2017,
``training.rts``). An ADV² image does not contain c_t either, so it gets the same treatment: for
selector c_t, only the area and smoothness terms apply, which are minimised by m = 0. The clean
objective (true and fake selectors, unchanged) stays in every step, so benign maps keep their
quality; what that costs is measured on the test split before and after (pointing game, object
IoU). An empty mask, min-max normalised, no longer follows the object (on the shipped networks,
about PGD's IoU to the true-class maps; docs/tuning.md), so the training signal moves the
quantity the attack is judged by.

Why regenerate. An interpreter trained on a fixed set of adversarial examples is only robust to
the attack against its earlier self. Every round crafts fresh ADV² examples against the *current*
network with the library's own attack (the RTS ``quick`` preset, encoder term included, ε on the
8-bit grid), then fine-tunes on a pool of all examples so far plus clean batches, as in
Madry et al. 2018's adversarial training with the attack in the loop.

Why the encoder trains too (``train_encoder``, default on). ADV² against RTS also fools RTS's own
encoder (its ``encoder_weight`` term), and the class selector's gate reads the encoder's features:
an encoder that sees c_t opens the gate for c_t. So the encoder is fine-tuned as well, with its
cross-entropy toward the *true* class of clean and adversarial images (adversarial training of
the encoder as a classifier, Madry et al. 2018), and its head stays a classifier the attack's
encoder term can still aim at (no gradient masking by a stale head). Its BatchNorm statistics
stay as trained. Pilots with and without it are in docs/tuning.md. The classifier is never
trained. A killed run resumes after its last finished round.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..attacks.core import ADV2
from ..attacks.targets import random_targets
from ..errors import InputError
from ..interpreters.base import normalize_maps
from ..interpreters.rts import Rts, SaliencyNetwork, save_saliency_network
from ..metrics import iou_top_k
from ..models.classifier import Classifier
from ..models.metadata import ModelOptions
from ..models.specs import load_model
from ..presets import preset
from ..progress import progress_bar
from ..versions import software_versions
from .rts import (
    RtsObjective,
    _device_generator,
    area_loss,
    evaluate_rts,
    fake_selectors,
    progress_path,
    read_progress,
    render_shapes,
    rts_loss,
    smoothness_loss,
    write_progress,
)

__all__ = ["AdversarialRtsConfig", "AdversarialRtsResult", "empty_mask_loss", "progress_path", "train_adversarial_rts"]


@dataclass(frozen=True)
class AdversarialRtsConfig:
    """Everything that determines an adversarially fine-tuned RTS network (defaults = shipped)."""

    model: str = "shapes-resnet"
    #: RTS checkpoint to start from; None = the model's own (its metadata's ``rts``, else shipped)
    base: str | None = None
    rounds: int = 8
    #: fresh ADV² examples crafted against the current network per round
    attack_images: int = 128
    steps_per_round: int = 100
    batch_size: int = 32  # clean images per step
    adversarial_batch: int = 16  # pooled adversarial images per step
    adversarial_weight: float = 2.0
    #: also fine-tune the encoder, with CE toward the true class on clean and adversarial images
    #: (the attack opens RTS's class gate through the encoder; see the module docstring)
    train_encoder: bool = True
    encoder_weight: float = 1.0
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    fake_fraction: float = 0.5
    objective: RtsObjective = field(default_factory=RtsObjective)
    attack_preset: str = "quick"
    #: attack settings over the preset's (e.g. ``{"adv_steps": 600}`` for a stronger adversary)
    attack_settings: Mapping[str, Any] = field(default_factory=dict)
    eps: float = 8 / 255
    seed: int = 0
    train_size: int = 4000
    eval_size: int = 200
    data_seed: int = 0
    model_options: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in (
            "rounds",
            "attack_images",
            "steps_per_round",
            "batch_size",
            "adversarial_batch",
            "train_size",
            "eval_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{name} must be a positive whole number, got {value!r}")
        for name in ("learning_rate", "adversarial_weight", "encoder_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be positive and finite, got {value!r}")
        if not 0.0 <= self.fake_fraction < 1.0:
            raise InputError(f"fake_fraction must be in [0, 1), got {self.fake_fraction}")
        if not 0 < self.eps <= 1:
            raise InputError(f"eps must be in (0, 1], got {self.eps}")
        if self.attack_preset not in ("quick", "paper"):
            raise InputError(f"attack_preset must be 'quick' or 'paper', got {self.attack_preset!r}")
        preset(self.attack_preset, Rts).with_settings("attack_settings", self.attack_settings)


@dataclass(frozen=True)
class AdversarialRtsResult:
    path: Path
    before: dict[str, float]
    after: dict[str, float]
    rounds: list[dict[str, float]]
    seconds: float


def empty_mask_loss(masks: torch.Tensor, objective: RtsObjective = RtsObjective()) -> torch.Tensor:
    """RTS's fake-selector objective (area + smoothness, minimised by m = 0), per image (N,)."""
    return objective.area * area_loss(masks, objective.area_power) + objective.smoothness * smoothness_loss(masks)


def _adversarial_examples(
    classifier: Classifier,
    network: SaliencyNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    config: AdversarialRtsConfig,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """ADV² against the current network on correctly classified ``images``: (adversarial uint8
    images, success, round summary)."""
    interpreter = Rts(classifier, network=network)
    settings = preset(config.attack_preset, Rts, eps=config.eps)
    settings = settings.with_settings("attack_settings", config.attack_settings).with_overrides(seed=seed)
    attack = ADV2(classifier, settings, interpreter=interpreter)
    result = attack(images, targets)
    with torch.no_grad():
        benign = interpreter.explain(images, labels)
        masks = interpreter.masks(result.adversarial, targets)
        iou = iou_top_k(normalize_maps(masks), benign)
        mask_peak = masks.flatten(1).max(1).values
    success = result.success.cpu()
    summary = {
        "attack_success": float(success.float().mean()),
        "attack_iou": float(iou[result.success].mean()) if bool(success.any()) else float("nan"),
        "attack_mask_peak": float(mask_peak[result.success].mean()) if bool(success.any()) else float("nan"),
    }
    as_u8 = result.adversarial.mul(255).round().to(torch.uint8).cpu()
    return as_u8, success, summary


Pool = dict[str, torch.Tensor]  # "images" uint8 (P, C, H, W), "targets" and "labels" (P,)


def _restore(
    path: Path,
    config: AdversarialRtsConfig,
    network: SaliencyNetwork,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[int, Pool, list[dict[str, float]]]:
    state = read_progress(path, config, "adversarial RTS")
    network.load_state_dict(state["network"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return int(state["rounds"]), dict(state["pool"]), list(state["records"])


def _save(
    path: Path,
    config: AdversarialRtsConfig,
    rounds: int,
    network: SaliencyNetwork,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    pool: Pool,
    records: list[dict[str, float]],
) -> None:
    write_progress(
        path,
        {
            "config": repr(config),
            "rounds": rounds,
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "pool": pool,
            "records": records,
        },
    )


def train_adversarial_rts(
    config: AdversarialRtsConfig, out: str | Path, progress: bool = True, device: str = "cpu"
) -> AdversarialRtsResult:
    """Fine-tune ``config.model``'s RTS network against ADV² and write ``out`` (+ JSON metadata).

    Each round: ADV² examples of ``attack_images`` correctly classified training images (fresh
    ones every round, seeded targets) crafted against the current network and pooled; then
    ``steps_per_round`` steps of the clean RTS objective plus ``adversarial_weight`` times the
    empty-mask objective on pooled adversarial images for their target class. The metadata holds
    the config, each round's attack success / IoU against the network it attacked, and the
    localisation scores on the test split before and after.
    """
    config.validate()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"the RTS output path must end in .safetensors, got {out.name!r}")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    options = ModelOptions.from_mapping("model options", config.model_options)
    classifier = load_model(config.model, options, device=device, hint="the model flags").eval()
    base = Rts(classifier, checkpoint=config.base)
    network = copy.deepcopy(base.network).to(classifier.device)
    size = classifier.input_size or 64
    images_u8, labels = render_shapes("train", size, config.data_seed, config.train_size, progress)
    test_images, test_labels, test_masks = render_shapes(
        "test", size, config.data_seed, config.eval_size, with_masks=True
    )
    test_images = test_images.float().div(255).to(classifier.device)
    before = evaluate_rts(network, test_images, test_labels.to(classifier.device), test_masks.to(classifier.device))

    with torch.no_grad():
        predicted = torch.cat(
            [
                classifier.predict(chunk.float().div(255).to(classifier.device)).argmax(1).cpu()
                for chunk in images_u8.split(256)
            ]
        )
    correct = torch.nonzero(predicted == labels).flatten()
    needed = config.rounds * config.attack_images
    if correct.numel() < needed:
        raise InputError(
            f"{config.rounds} rounds of {config.attack_images} attacked images need {needed} correctly classified "
            f"training images; {correct.numel()} of train_size={config.train_size} are: raise train_size"
        )
    generator = torch.Generator().manual_seed(config.seed)
    attacked = correct[torch.randperm(correct.numel(), generator=generator)][:needed].view(config.rounds, -1)

    if not config.train_encoder:
        for param in network.encoder.parameters():
            param.requires_grad_(False)
    trainable = [p for name, p in network.named_parameters() if config.train_encoder or not name.startswith("encoder.")]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    pool: Pool = {
        "images": torch.empty((0, *images_u8.shape[1:]), dtype=torch.uint8),
        "targets": torch.empty(0, dtype=torch.long),
        "labels": torch.empty(0, dtype=torch.long),
    }
    records: list[dict[str, float]] = []
    first = 0
    resume = progress_path(out)
    if resume.is_file():
        first, pool, records = _restore(resume, config, network, optimizer, generator)
    # counted in fine-tuning steps, not rounds: a round takes minutes, and the bar should move
    bar = progress_bar(
        config.rounds * config.steps_per_round,
        initial=first * config.steps_per_round,
        desc=f"adversarial rts {config.model}",
        enabled=progress,
        unit="step",
    )
    try:
        with classifier.frozen():
            for round_index in range(first, config.rounds):
                ids = attacked[round_index]
                clean = images_u8[ids].float().div(255).to(classifier.device)
                targets = random_targets(labels[ids], classifier.num_classes, config.seed + 1000 * (round_index + 1))
                network.eval()
                bar.set_postfix_str(f"round {round_index + 1}/{config.rounds}: crafting ADV²")
                adversarial, success, summary = _adversarial_examples(
                    classifier,
                    network,
                    clean,
                    labels[ids].to(classifier.device),
                    targets.to(classifier.device),
                    config,
                    config.seed + round_index,
                )
                new = {"images": adversarial[success], "targets": targets[success], "labels": labels[ids][success]}
                pool = {key: torch.cat([pool[key], new[key]]) for key in pool}
                bar.set_postfix_str(
                    f"round {round_index + 1}/{config.rounds}: fine-tuning, attack_iou={summary['attack_iou']:.3f}"
                )
                losses = _fine_tune(network, optimizer, classifier, images_u8, labels, pool, config, generator, bar)
                records.append({"round": round_index + 1, **summary, "pool": int(pool["targets"].numel()), **losses})
                _save(resume, config, round_index + 1, network, optimizer, generator, pool, records)
    finally:
        bar.close()
        network.eval()
    after = evaluate_rts(network, test_images, test_labels.to(classifier.device), test_masks.to(classifier.device))
    seconds = time.perf_counter() - start
    config_dict = asdict(config)
    config_dict["model_options"] = dict(config.model_options)
    config_dict["attack_settings"] = dict(config.attack_settings)
    metadata = {
        **{
            k: v
            for k, v in base.metadata.items()
            if k not in ("config", "evaluation", "pointing_game", "train_seconds", "final_losses", "versions")
        },
        "model": config.model,
        "adversarial_training": {
            "config": config_dict,
            "base_config": base.metadata.get("config"),
            "base": Path(base.source_files()[0]).name if base.source_files() else None,
            "rounds": records,
            "before": {k: round(v, 5) for k, v in before.items()},
            "reference": "Zhang et al. 2020 (ADV2 in the interpreter's training, section 7); Madry et al. 2018",
        },
        "evaluation": {
            "images": int(test_labels.numel()),
            "split": "test",
            **{k: round(v, 5) for k, v in after.items()},
        },
        "pointing_game": round(after["pointing_game"], 5),
        "train_seconds": round(seconds, 1),
        "versions": software_versions(),
    }
    path = save_saliency_network(network.cpu(), out, metadata)
    resume.unlink(missing_ok=True)
    return AdversarialRtsResult(path, before, after, records, seconds)


def _fine_tune(
    network: SaliencyNetwork,
    optimizer: torch.optim.Optimizer,
    classifier: Classifier,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    pool: Pool,
    config: AdversarialRtsConfig,
    generator: torch.Generator,
    bar: Any,
) -> dict[str, float]:
    """``steps_per_round`` steps: clean RTS loss + weight × empty-mask loss on pooled adversarial
    examples for their target class [+ the encoder's CE toward the true class of both]."""
    device = classifier.device
    network.train()
    network.encoder.eval()  # BatchNorm statistics of the encoder stay as trained
    totals = {"loss": 0.0, "clean": 0.0, "adversarial": 0.0, "encoder": 0.0}
    pooled = int(pool["targets"].numel())
    for _ in range(config.steps_per_round):
        batch = torch.randint(0, labels.numel(), (config.batch_size,), generator=generator)
        images = images_u8[batch].float().div_(255)
        flips = torch.rand(config.batch_size, generator=generator) < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(3), images).to(device)
        selectors, real = fake_selectors(labels[batch], network.num_classes, config.fake_fraction, generator)
        # no successful example yet (the attack failed on every image): the clean objective alone
        picks = torch.randint(0, max(1, pooled), (config.adversarial_batch if pooled else 0,), generator=generator)
        together = torch.cat([images, pool["images"][picks].float().div_(255).to(device)])
        with torch.set_grad_enabled(config.train_encoder):
            features = network.encode(together)
        # one decoder pass over both, so BatchNorm's batch statistics never tell them apart
        both = network.decode(features, torch.cat([selectors, pool["targets"][picks]]).to(device))
        masks, adv_masks = both[: config.batch_size], both[config.batch_size :]
        clean, _ = rts_loss(
            classifier,
            images,
            masks,
            selectors.to(device),
            real.to(device),
            config.objective,
            _device_generator(generator, device),
        )
        adversarial = empty_mask_loss(adv_masks, config.objective).mean() if pooled else torch.zeros((), device=device)
        loss = clean + config.adversarial_weight * adversarial
        encoder = torch.zeros((), device=device)
        if config.train_encoder:
            truth = torch.cat([labels[batch], pool["labels"][picks]]).to(device)
            encoder = F.cross_entropy(network.encoder_head(features[-1]), truth)
            loss = loss + config.encoder_weight * encoder
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in (("loss", loss), ("clean", clean), ("adversarial", adversarial), ("encoder", encoder)):
            totals[key] += float(value.detach())
        bar.update()
    return {key: round(value / config.steps_per_round, 5) for key, value in totals.items()}
