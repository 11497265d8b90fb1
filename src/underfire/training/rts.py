"""Training RTS saliency networks (``underfire train rts``), after Dabkowski & Gal 2017.

The objective is the paper's, in the hinge form of its reference code (``sal/saliency_model.py``,
``SaliencyLoss``), for a mask ``m`` predicted for class ``c``:

    L = λ_tv·TV(m) + λ_area·Area(m) + λ_d·Destroyer(m) + λ_p·Preserver(m)

* ``Area(m) = mean((m + 5e-4)^0.3)``: the power < 1 rewards masks that are exactly 0 on most pixels;
* ``TV(m)``: mean squared difference between 4-neighbours of the mask (at mask resolution);
* ``Preserver = max(0, max_{k≠c} z_k − z_c + 1)`` with ``z = f(Φ(x, m))`` — keeping only the mask
  must keep class ``c`` (the paper's ``−log f_c(Φ(x, m))``);
* ``Destroyer = max(0, z_c − max_{k≠c} z_k + 5)`` with ``z = f(Φ(x, 1 − m))`` — deleting the mask
  must destroy class ``c`` (the paper's ``f_c(Φ(x, 1 − m))^λ4``);
* ``Φ(x, m) = m·x + (1 − m)·alt``, the mask upsampled bilinearly to the image; ``alt`` is, per
  image, a Gaussian blur of ``x`` (σ = 11/224 of the side) with probability ``blur_probability``,
  else a random grey level plus Gaussian noise; ``x`` gets 0.03 noise (as in the reference
  ``apply_mask``). The reference mixes ½ blur; our default is 0 (always the noisy grey) because
  the shapes objects are uniformly coloured: blurring an object's interior leaves it unchanged, so
  a blur deletion only ever removes contours and the networks learn ring-shaped masks around the
  edges. Measured at equal budgets (200 test images): blur ½ vs 0 gave pointing game 0.94/0.945
  (ResNet) and 0.925/0.93 (DenseNet), fake-class area 25 %/6 % and 17 %/9 % of the true-class area.
* Weights: destroyer 1, area 8, smoothness 0.5, preserver 0.3 (reference defaults). Our TV is a
  mean over neighbour pairs (the reference sums over full-resolution pixels), so 0.5 is a mild
  smoothness term here; the network's final 3×3 box filter provides the rest of the smoothing.
* A fraction (default 50 %, as in the reference's first phase) of the selectors are **fake**: a
  class other than the label. Their masks must be empty, so for them only the regularisers (area
  and TV, both minimised by m = 0) apply; the classifier terms are dropped.

The black box ``f`` is the classifier being explained, run inside ``classifier.frozen()``: its
parameters never change. The RTS encoder (a separately pre-trained ``ShapesResNet``, see
``pretrain_encoder``) stays frozen in eval mode, as in the reference (``fix_encoder=True``); the
selector and the upsampler train together with Adam and a cosine learning-rate decay (the
reference first trains the selector alone; one joint phase suffices at this scale).
Training images are rendered once as uint8. Everything random derives from ``config.seed``.
On a shared CPU, run with ``OMP_NUM_THREADS=1``: with several busy processes, torch's default
thread pool oversubscribes the cores and trains ~5× slower (measured here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shapes import ShapesDataset
from ..errors import InputError
from ..imaging import gaussian_blur as separable_blur
from ..metrics import object_iou, pointing_game
from ..models.architectures import ShapesResNet
from ..models.checkpoint import load_checkpoint
from ..models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from ..models.metadata import ModelOptions
from ..models.saliency import SHIPPED_ENCODER, SaliencyNetwork, save_saliency_network, shipped_rts_path
from ..models.specs import load_model
from ..progress import progress_bar, track
from ..versions import software_versions

__all__ = [
    "RtsObjective",
    "RtsTrainConfig",
    "RtsTrainResult",
    "apply_mask",
    "area_loss",
    "evaluate_rts",
    "progress_path",
    "gaussian_blur",
    "pretrain_encoder",
    "rts_loss",
    "smoothness_loss",
    "train_rts",
]


# ---------------------------------------------------------------------------------- loss pieces


def area_loss(masks: torch.Tensor, power: float = 0.3) -> torch.Tensor:
    """Per-image ``mean((m + 5e-4)^power)`` (N,): the reference's area term (5e-4 keeps ∂ finite)."""
    return (masks + 5e-4).pow(power).flatten(1).mean(1)


def smoothness_loss(masks: torch.Tensor) -> torch.Tensor:
    """Per-image total variation (N,): mean squared difference over all 4-neighbour pixel pairs."""
    dy = (masks[:, :, 1:, :] - masks[:, :, :-1, :]).pow(2).flatten(1)
    dx = (masks[:, :, :, 1:] - masks[:, :, :, :-1]).pow(2).flatten(1)
    return (dy.sum(1) + dx.sum(1)) / (dy.shape[1] + dx.shape[1])


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (±2.5σ kernel, reflect padding) of an (N, C, H, W) batch."""
    return separable_blur(images, sigma, truncate=2.5)


def alternative_images(
    images: torch.Tensor, generator: torch.Generator | None = None, blur_probability: float = 0.5
) -> torch.Tensor:
    """What Φ puts where the mask deletes: a blurred copy or a noisy random grey (reference mix)."""
    n, c = images.shape[:2]
    device = images.device
    sigma = images.shape[-1] * 11.0 / 224.0
    blurred = gaussian_blur(images, sigma)
    grey = 0.5 + (torch.rand((n, c, 1, 1), generator=generator, device=device) - 0.5) * 0.33
    noisy = (grey + 0.055 * torch.randn(images.shape, generator=generator, device=device)).clamp(0, 1)
    use_blur = torch.rand((n, 1, 1, 1), generator=generator, device=device) < blur_probability
    return torch.where(use_blur, blurred, noisy)


def apply_mask(images: torch.Tensor, masks: torch.Tensor, alternative: torch.Tensor) -> torch.Tensor:
    """Φ(x, m) = m·x + (1 − m)·alt with the mask upsampled bilinearly to the image size."""
    if masks.shape[-2:] != images.shape[-2:]:
        masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return masks * images + (1 - masks) * alternative


def _margin(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """z_c − max_{k≠c} z_k per sample."""
    this = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf"))
    return this - others.max(1).values


@dataclass(frozen=True)
class RtsObjective:
    """Weights, confidences and the deletion of the objective (reference defaults)."""

    destroyer: float = 1.0
    area: float = 8.0
    smoothness: float = 0.5
    preserver: float = 0.3
    area_power: float = 0.3
    destroyer_confidence: float = 5.0
    preserver_confidence: float = 1.0
    blur_probability: float = 0.0  # per image: blurred copy (else noisy grey) replaces deletions


def rts_loss(
    classifier: Classifier,
    images: torch.Tensor,
    masks: torch.Tensor,
    classes: torch.Tensor,
    real: torch.Tensor,
    objective: RtsObjective = RtsObjective(),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The RTS training objective (mean over the batch) and its terms.

    ``real`` (N,) bool marks true selectors; fake ones get only the area and TV terms.
    Call inside ``classifier.frozen()`` so the black box is not trained.
    """
    real_f = real.float()
    noisy = (images + 0.03 * torch.randn(images.shape, generator=generator, device=images.device)).clamp(0, 1)
    alternative = alternative_images(images, generator, objective.blur_probability)
    both = torch.cat([apply_mask(noisy, masks, alternative), apply_mask(noisy, 1 - masks, alternative)])
    preserved_logits, destroyed_logits = classifier(both).chunk(2)
    preserver = F.relu(objective.preserver_confidence - _margin(preserved_logits, classes))
    destroyer = F.relu(_margin(destroyed_logits, classes) + objective.destroyer_confidence)
    area = area_loss(masks, objective.area_power)
    smooth = smoothness_loss(masks)
    per_sample = (
        objective.area * area
        + objective.smoothness * smooth
        + real_f * (objective.destroyer * destroyer + objective.preserver * preserver)
    )
    n_real = max(1.0, float(real_f.sum()))
    parts = {
        "area": float(area.detach().mean()),
        "smoothness": float(smooth.detach().mean()),
        "destroyer": float((destroyer.detach() * real_f).sum()) / n_real,
        "preserver": float((preserver.detach() * real_f).sum()) / n_real,
    }
    return per_sample.mean(), parts


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_rts(
    network: SaliencyNetwork,
    images: torch.Tensor,
    labels: torch.Tensor,
    object_masks: torch.Tensor | None,
    batch_size: int = 100,
) -> dict[str, float]:
    """Localisation quality of an RTS network on labelled images.

    Returns the mean true-class mask area and the mean fake-class mask area (selector = label + 1)
    and, where ``object_masks`` are given, the pointing game and the mean top-k IoU (k = object
    area, and averaged over 10..50 %).
    """
    with network.frozen():
        true_masks, fake_masks = [], []
        for chunk, chunk_labels in zip(images.split(batch_size), labels.split(batch_size)):
            true_masks.append(network(chunk, chunk_labels))
            fake_masks.append(network(chunk, (chunk_labels + 1) % network.num_classes))
    masks = torch.cat(true_masks)
    fakes = torch.cat(fake_masks)
    scores = {"true_mask_area": float(masks.mean()), "fake_mask_area": float(fakes.mean())}
    if object_masks is None:
        return scores
    grid = [0.1, 0.2, 0.3, 0.4, 0.5]
    return {
        "pointing_game": float(pointing_game(masks, object_masks, tolerance=0).float().mean()),
        "iou_object_area": float(object_iou(masks, object_masks).mean()),
        "iou_grid_10_50": float(torch.stack([object_iou(masks, object_masks, f) for f in grid]).mean()),
        **scores,
    }


# ---------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RtsTrainConfig:
    """Everything that determines a trained RTS network (defaults = the shipped ones)."""

    model: str = "shapes-resnet"
    dataset: str = "shapes"
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    fake_fraction: float = 0.5
    objective: RtsObjective = field(default_factory=RtsObjective)
    train_size: int = 8000
    eval_size: int = 200
    encoder: str | None = None  # encoder checkpoint (a ShapesResNet); None = the shipped one
    decoder_width: int = 64
    mask_smoothing: int = 3
    data_seed: int = 0  # seed of the shapes benchmark the images come from
    #: the model's metadata (a ``[models.NAME]`` table: input size, channels, class names, ...)
    model_options: Mapping[str, Any] = field(default_factory=dict)
    #: with an image folder: pre-train the encoder on it for this many epochs (0 = ``encoder``)
    encoder_epochs: int = 0

    def validate(self) -> None:
        if self.dataset != "shapes" and not Path(self.dataset).is_dir():
            raise InputError(
                f"RTS training data must be 'shapes' or an image folder (one subfolder per class), got {self.dataset!r}"
            )
        for name in ("epochs", "batch_size", "train_size", "eval_size", "decoder_width"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if isinstance(self.encoder_epochs, bool) or not isinstance(self.encoder_epochs, int) or self.encoder_epochs < 0:
            raise InputError(f"encoder_epochs must be an integer >= 0, got {self.encoder_epochs!r}")
        if self.encoder_epochs and self.encoder is not None:
            raise InputError("give an encoder checkpoint or encoder epochs to train one, not both")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.fake_fraction < 1.0:
            raise InputError(f"fake_fraction must be in [0, 1), got {self.fake_fraction}")


@dataclass(frozen=True)
class RtsTrainResult:
    path: Path
    metrics: dict[str, float]
    final_losses: dict[str, float]
    seconds: float


def load_encoder(path: str | Path | None = None) -> tuple[ShapesResNet, dict[str, Any]]:
    """The RTS encoder: a ``ShapesResNet`` classifier checkpoint (default: the shipped one)."""
    path = Path(path) if path is not None else shipped_rts_path(SHIPPED_ENCODER)
    if not path.is_file():
        raise InputError(
            f"RTS encoder checkpoint {str(path)!r} does not exist; pre-train one with "
            "underfire.training.rts.pretrain_encoder (or `underfire train classifier "
            "--arch resnet --seed 1`) and pass its path"
        )
    state, meta = load_checkpoint(path)
    if meta.get("architecture") != "resnet":
        raise InputError(
            f"the RTS encoder must be a 'resnet' checkpoint, {str(path)!r} is {meta.get('architecture')!r}"
        )
    encoder = ShapesResNet(num_classes=len(meta["class_names"]))
    encoder.load_state_dict(state, strict=True)
    return encoder.eval(), meta


def pretrain_encoder(
    out: str | Path,
    *,
    seed: int = 1,
    epochs: int = 5,
    train_size: int = 8000,
    batch_size: int = 32,
    progress: bool = True,
) -> Any:
    """Pre-train the RTS encoder as a shapes classifier (a ``TrainResult``).

    The paper's encoder is an ImageNet ResNet-50, trained independently of the models it explains;
    here a ``ShapesResNet`` trained with another seed on other images plays that role.
    """
    from .classifier import TrainConfig, train_classifier

    config = TrainConfig(arch="resnet", seed=seed, epochs=epochs, train_size=train_size, batch_size=batch_size)
    return train_classifier(config, out, progress=progress)


def render_shapes(
    split: str, size: int, seed: int, length: int, progress: bool = False, with_masks: bool = False
) -> tuple[torch.Tensor, ...]:
    """Render ``length`` shapes images once: uint8 (N, 3, H, W), labels (N,) [, masks (N, 1, H, W)]."""
    dataset = ShapesDataset(split, size, seed, length=length)
    images = np.empty((length, size, size, 3), dtype=np.uint8)
    labels = np.empty(length, dtype=np.int64)
    masks = np.empty((length, size, size), dtype=bool) if with_masks else None
    for i in track(range(length), desc=f"render {split}", enabled=progress, unit="img"):
        sample = dataset.render(i)
        images[i], labels[i] = sample.image, sample.label
        if masks is not None:
            masks[i] = sample.mask
    out: tuple[torch.Tensor, ...] = (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(labels),
    )
    if masks is not None:
        out = out + (torch.from_numpy(masks)[:, None],)
    return out


def fake_selectors(
    labels: torch.Tensor, num_classes: int, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(selectors, real): a ``fraction`` of labels replaced by a uniformly drawn *other* class."""
    n = labels.shape[0]
    fake = torch.rand(n, generator=generator) < fraction
    shift = torch.randint(1, max(num_classes, 2), (n,), generator=generator)
    selectors = torch.where(fake, (labels + shift) % num_classes, labels)
    return selectors, ~fake


def train_steps(
    network: SaliencyNetwork,
    classifier: Classifier,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    config: RtsTrainConfig,
    *,
    progress: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    resume: Path | None = None,
) -> list[dict[str, float]]:
    """Train ``network`` on uint8 images for ``config.epochs``; returns per-step loss records.

    The encoder stays frozen (eval mode, no gradients); the classifier runs frozen. With
    ``resume``, the state after every epoch (network, optimizer, schedule, random generator,
    records) is written there, and a run started again with the same config continues after the
    last finished epoch, as if it had never stopped.
    """
    generator = torch.Generator().manual_seed(config.seed)
    for param in network.encoder.parameters():
        param.requires_grad_(False)
    trainable = [p for name, p in network.named_parameters() if not name.startswith("encoder.")]
    if optimizer is None:
        optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    device = classifier.device
    network.to(device)
    steps = math.ceil(len(labels) / config.batch_size) * config.epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    records: list[dict[str, float]] = []
    first_epoch = 0
    if resume is not None and resume.is_file():
        first_epoch, records = _restore(resume, config, network, optimizer, schedule, generator)
    done = first_epoch * math.ceil(len(labels) / config.batch_size)
    bar = progress_bar(steps, initial=done, desc=f"train rts {config.model}", enabled=progress, unit="batch")
    network.train()
    network.encoder.eval()
    try:
        with classifier.frozen():
            for epoch in range(first_epoch, config.epochs):
                order = torch.randperm(len(labels), generator=generator)
                flips = torch.rand(len(labels), generator=generator) < 0.5
                for batch in order.split(config.batch_size):
                    images = images_u8[batch].float().div_(255)
                    images = torch.where(flips[batch, None, None, None], images.flip(3), images).to(device)
                    selectors, real = fake_selectors(
                        labels[batch], network.num_classes, config.fake_fraction, generator
                    )
                    with torch.no_grad():
                        features = network.encode(images)
                    masks = network.decode(features, selectors.to(device))
                    loss, parts = rts_loss(
                        classifier,
                        images,
                        masks,
                        selectors.to(device),
                        real.to(device),
                        config.objective,
                        _device_generator(generator, device),
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    record = {"loss": float(loss.detach()), **parts, "epoch": epoch + 1}
                    records.append(record)
                    bar.update()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.3f}", area=f"{parts['area']:.3f}")
                if resume is not None:
                    _save_progress(resume, config, epoch + 1, network, optimizer, schedule, generator, records)
    finally:
        bar.close()
        network.eval()
    return records


def _save_progress(
    path: Path,
    config: RtsTrainConfig,
    epochs: int,
    network: SaliencyNetwork,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    generator: torch.Generator,
    records: list[dict[str, float]],
) -> None:
    trained = {k: v for k, v in network.state_dict().items() if not k.startswith("encoder.")}
    write_progress(
        path,
        {
            "config": repr(config),
            "epochs": epochs,
            "network": trained,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "generator": generator.get_state(),
            "records": records,
        },
    )


def write_progress(path: Path, state: dict[str, Any]) -> None:
    """Write a training run's progress ``state`` atomically (a kill mid-write leaves the old file)."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def read_progress(path: Path, config: Any, what: str) -> dict[str, Any]:
    """The progress state at ``path``, refused in one line if unreadable or of another ``config``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file cut short by a kill, or not ours
        raise InputError(f"cannot resume from '{path}' ({type(error).__name__}); delete it to start again") from None
    if state.get("config") != repr(config):
        raise InputError(f"'{path}' holds the progress of another {what} config; delete it or use another --out")
    return state


def _restore(
    path: Path,
    config: RtsTrainConfig,
    network: SaliencyNetwork,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    generator: torch.Generator,
) -> tuple[int, list[dict[str, float]]]:
    """The epoch to continue from and the records so far, from a progress file of the same config."""
    state = read_progress(path, config, "RTS training")
    network.load_state_dict(state["network"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    return int(state["epochs"]), list(state["records"])


def progress_path(out: Path) -> Path:
    """Where ``train_rts`` (and ``train_adversarial_rts``) keep the progress of an unfinished run for ``out``."""
    return out.with_name(out.stem + ".progress.pt")


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from the CPU generator (so CUDA runs stay reproducible)."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def train_rts(config: RtsTrainConfig, out: str | Path, progress: bool = True, device: str = "cpu") -> RtsTrainResult:
    """Train an RTS network for ``config.model`` and write ``out`` (.safetensors) + JSON metadata.

    Data: the shapes benchmark, or a user's image folder (one subfolder per class, matched to the
    model's classes by name; the first ``eval_size`` images, at most a fifth, are held out). The
    metadata records the explained model's spec and classes, input and mask sizes, the whole
    config, the final losses, the localisation scores on the held-out images (pointing game and
    top-k IoU where object masks exist, true/fake mask areas always), the encoder used, library
    versions and training seconds. A killed run resumes from its last finished epoch
    (``progress_path(out)``) when started again with the same config.
    """
    config.validate()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"the RTS output path must end in .safetensors, got {out.name!r}")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    options = ModelOptions.from_mapping("model options", config.model_options)
    classifier = load_model(config.model, options, device=device, hint="the model flags").eval()
    size = classifier.input_size or 64
    if config.dataset == "shapes":
        images, labels = render_shapes("train", size, config.data_seed, config.train_size, progress)
        test_images, test_labels, test_masks = render_shapes(
            "test", size, config.data_seed, config.eval_size, with_masks=True
        )
    else:
        images, labels, test_images, test_labels, test_masks = _folder_images(config, classifier, size)
    if config.encoder_epochs:
        encoder, encoder_meta = _pretrain_on(images, labels, classifier, config, progress)
    else:
        encoder, encoder_meta = load_encoder(config.encoder)
        if encoder_meta.get("input_size") not in (None, size):
            raise InputError(
                f"the encoder was trained at {encoder_meta['input_size']} px, the model expects {size} px; "
                "pre-train one on your images with --encoder-epochs N"
            )
    network = SaliencyNetwork(
        classifier.num_classes, encoder, decoder_width=config.decoder_width, mask_smoothing=config.mask_smoothing
    )
    records = train_steps(network, classifier, images, labels, config, progress=progress, resume=progress_path(out))
    network.to(device)
    masks = None if test_masks is None else test_masks.to(device)
    metrics = evaluate_rts(network, test_images.float().div(255).to(device), test_labels.to(device), masks)
    tail = records[-max(1, len(records) // 10) :]  # mean over the last 10 % of the steps
    final_losses = {
        key: round(sum(r[key] for r in tail) / len(tail), 5)
        for key in ("loss", "area", "smoothness", "destroyer", "preserver")
    }
    seconds = time.perf_counter() - start
    with torch.no_grad(), network.frozen():
        probe = torch.zeros(1, classifier.in_channels, size, size, device=device)
        mask_size = int(network(probe, torch.zeros(1, dtype=torch.long, device=device)).shape[-1])
    config_dict = asdict(config)
    config_dict["model_options"] = dict(config.model_options)
    if config.encoder_epochs:
        encoder_name = f"pre-trained on {config.dataset} ({config.encoder_epochs} epochs)"
    else:
        encoder_name = Path(config.encoder).name if config.encoder else SHIPPED_ENCODER
    metadata = {
        "model": config.model,
        "class_names": classifier.class_names,
        "input_size": size,
        "mask_size": mask_size,
        "encoder": {
            "path": encoder_name,
            "test_accuracy": encoder_meta.get("test_accuracy"),
            "config": encoder_meta.get("config"),
        },
        "config": config_dict,
        "final_losses": final_losses,
        "evaluation": {
            "images": int(test_labels.numel()),
            "split": "test" if config.dataset == "shapes" else "held out",
            **{k: round(v, 5) for k, v in metrics.items()},
        },
        "pointing_game": None if "pointing_game" not in metrics else round(metrics["pointing_game"], 5),
        "train_seconds": round(seconds, 1),
        "versions": software_versions(),
        "reference": "Dabkowski & Gal, Real Time Image Saliency for Black Box Classifiers, NeurIPS 2017",
    }
    path = save_saliency_network(network.cpu(), out, metadata)
    progress_path(out).unlink(missing_ok=True)
    return RtsTrainResult(path, metrics, final_losses, seconds)


def _folder_images(
    config: RtsTrainConfig, classifier: Classifier, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A user's folder as uint8 training images and held-out test images (with masks if any)."""
    from ..data.images import ImageFolderDataset

    dataset = ImageFolderDataset(
        config.dataset,
        size,
        class_names=classifier.class_names,
        channels=classifier.in_channels,
        outputs=classifier.num_classes,
    )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.data_seed)).tolist()
    held = min(config.eval_size, max(1, len(dataset) // 5))
    if len(dataset) - held < 1:
        raise InputError(f"'{config.dataset}' holds {len(dataset)} image(s); RTS training needs at least 2")
    train_ids, test_ids = order[held:][: config.train_size], order[:held]
    images, labels, _ = dataset.tensors(train_ids)
    test_images, test_labels, test_masks = dataset.tensors(test_ids)
    to_u8 = lambda x: x.mul(255).round().to(torch.uint8)  # noqa: E731
    return to_u8(images), labels, to_u8(test_images), test_labels, test_masks


def _pretrain_on(
    images_u8: torch.Tensor, labels: torch.Tensor, classifier: Classifier, config: RtsTrainConfig, progress: bool
) -> tuple[ShapesResNet, dict[str, Any]]:
    """An RTS encoder trained on the user's own images (a ``ShapesResNet`` classifier of their
    classes), separate from the model it will explain, as the paper's encoder is."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    torch.manual_seed(config.seed + 1)
    encoder = ShapesResNet(num_classes=classifier.num_classes)
    # the saliency network's own normalisation (a grey batch broadcasts to RGB against it)
    mean = torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, -1, 1, 1)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = math.ceil(len(labels) / config.batch_size) * config.encoder_epochs
    bar = progress_bar(steps, desc="train rts encoder", enabled=progress, unit="batch")
    encoder.train()
    try:
        for _ in range(config.encoder_epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(config.batch_size):
                images = images_u8[batch].float().div_(255)
                logits = encoder((images - mean) / std)
                loss = F.cross_entropy(logits, labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    finally:
        bar.close()
    encoder.eval()
    with torch.no_grad():
        predicted = torch.cat([encoder((chunk.float() / 255 - mean) / std).argmax(1) for chunk in images_u8.split(256)])
    accuracy = float((predicted == labels).float().mean())
    return encoder, {
        "train_accuracy": round(accuracy, 5),
        "config": {"epochs": config.encoder_epochs, "seed": config.seed + 1},
    }
