"""The saliency network of RTS (real-time saliency): its architecture and checkpoint files.

Dabkowski & Gal, "Real Time Image Saliency for Black Box Classifiers", NeurIPS 2017: a trained
network predicts, in one forward pass, the mask that a slow perturbation method would find. Its
parts, as in the paper and its reference code (``sal/saliency_model.py``):

* an **encoder**, a ResNet that is *separate from* the classifier being explained (the paper uses an
  ImageNet ResNet-50 for every target model). Here: a ``ShapesResNet`` trained on its own, with a
  different seed and different images than the built-in classifiers, shared by both shipped RTS
  networks and frozen while they train. Its stem/``layer1``..``layer4`` feature maps (32/32/16/8/8
  pixels at 64 px) are the skips of the upsampler;
* a **class selector**: an embedding ``e_c`` of the class to explain. As in the reference code, the
  deepest features ``s4`` are gated per position by ``σ(⟨s4[:, i, j], e_c⟩)``; the gate is also
  passed to the upsampler as one extra channel, which lets this small network switch the whole
  mask off for a class that is not in the image (the "fake selector" objective);
* a **U-Net-style upsampler** with skip connections ending in 2 channels ``(z_a, z_b)`` and the
  mask ``m = a / (a + b)`` with ``a = exp(4·tanh(z_a/4))``, ``b = exp(4·tanh(z_b/4))`` (a softmax
  over two bounded channels), at 1/4 of the input resolution (16×16 at 64 px, 56×56 at 224 like
  the reference). Why bounded: with a plain softmax, masks saturate to exactly 1.0 in float32 on
  large plateaus, which breaks the ranking inside the object (pointing game, top-k) and gives the
  attack no gradient there. The reference's ``a, b = |z|`` avoids that but could not empty the
  masks of wrong classes in our runs; the bounded softmax does both (docs/tuning.md). A fixed 3×3
  box filter (part of the network, trained through) ends it, as the mask of Fong & Vedaldi's
  perturbation method is blurred: without it the masks are flat-topped plateaus a little wider
  than the object, whose maximum lands anywhere on the plateau, often on its rim just outside the
  object; with the filter the maximum lands inside it (docs/tuning.md).

The interpreter that explains with it is ``underfire.interpreters.rts.Rts``. The network takes [0, 1] pixels and normalises inside. It is trained by
``underfire.training.rts.train_rts`` against the frozen classifier it explains;
checkpoints are an underfire safetensors + JSON pair. Trained networks for ``shapes-resnet`` and
``shapes-densenet`` ship with the package, so ``Rts(load_model("shapes-resnet"))`` just works.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from .architectures import ShapesResNet
from .checkpoint import load_checkpoint, save_checkpoint
from .classifier import IMAGENET_MEAN, IMAGENET_STD, frozen_module

__all__ = [
    "SHIPPED_ADVERSARIAL_RTS",
    "SHIPPED_ENCODER",
    "SHIPPED_RTS",
    "SaliencyNetwork",
    "load_saliency_network",
    "save_saliency_network",
    "shipped_rts_path",
]

#: Built-in classifier name → file of its shipped RTS network (in ``underfire/models/weights``).
SHIPPED_RTS: dict[str, str] = {
    "shapes-resnet": "rts-shapes-resnet.safetensors",
    "shapes-densenet": "rts-shapes-densenet.safetensors",
}
#: The same, fine-tuned against ADV² (``underfire train rts-adversarial``; Rts ``variant="adversarial"``).
SHIPPED_ADVERSARIAL_RTS: dict[str, str] = {
    model: file.removesuffix(".safetensors") + "-adversarial.safetensors" for model, file in SHIPPED_RTS.items()
}
#: The shared, separately trained encoder the shipped RTS networks were built on.
SHIPPED_ENCODER = "rts-encoder.safetensors"
#: ``kind`` field of an RTS checkpoint's metadata (tells it apart from a classifier checkpoint).
CHECKPOINT_KIND = "rts-saliency-network"
#: The two output channels are squashed to (−4, 4) before a, b = exp(·): masks stay within
#: [σ(−8), σ(8)] = [3e-4, 0.9997], never on exact 0/1 plateaus.
LOGIT_BOUND = 4.0


def shipped_rts_path(name: str) -> Path:
    """Location of a packaged weights file (an RTS network or the shared encoder) by file name."""
    return Path(str(resources.files("underfire.models") / "weights" / name))


class _UpBlock(nn.Module):
    """Upsample to the skip's resolution, concatenate the skip, then two conv-BN-ReLU layers."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels + skip_channels, out_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = F.relu(self.bn1(self.conv1(torch.cat([x, skip], 1))))
        return F.relu(self.bn2(self.conv2(x)))


class SaliencyNetwork(nn.Module):
    """RTS masking model: encoder → class selector → U-Net upsampler → mask at 1/4 resolution.

    Args:
        num_classes: classes of the classifier being explained (size of the class selector).
        encoder: a ``ShapesResNet`` (its ``fc`` gives ``encoder_logits``); a fresh one by default.
        mean, std: normalisation the encoder expects; images are given in [0, 1].
        decoder_width: channels of the first upsampler block (the second has half).
        mask_smoothing: size of the fixed box filter applied to the mask (1 = none).

    ``forward(images, classes)`` returns masks (N, 1, ⌈H/4⌉, ⌈W/4⌉) in [0, 1], high = salient.
    """

    def __init__(
        self,
        num_classes: int = 10,
        encoder: ShapesResNet | None = None,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        decoder_width: int = 64,
        mask_smoothing: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise InputError(f"num_classes must be positive, got {num_classes}")
        if mask_smoothing < 1 or mask_smoothing % 2 == 0:
            raise InputError(f"mask_smoothing must be a positive odd size, got {mask_smoothing}")
        encoder = encoder if encoder is not None else ShapesResNet()
        if not isinstance(encoder, ShapesResNet):
            raise InputError(f"the RTS encoder must be a ShapesResNet, got {type(encoder).__name__}")
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.decoder_width = int(decoder_width)
        self.mask_smoothing = int(mask_smoothing)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        c2 = encoder.layer2.conv1.out_channels
        c3 = encoder.layer3.conv1.out_channels
        c4 = encoder.layer4.conv1.out_channels
        self.selector = nn.Embedding(self.num_classes, c4)
        nn.init.normal_(self.selector.weight, 0.0, 1.0 / math.sqrt(c4))  # reference initialisation
        self.up3 = _UpBlock(c4 + 1, c3, self.decoder_width)  # +1: the selector's gate
        self.up2 = _UpBlock(self.decoder_width, c2, self.decoder_width // 2)
        self.to_saliency = nn.Conv2d(self.decoder_width // 2, 2, 1)

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds this architecture (stored in checkpoints)."""
        enc = self.encoder
        widths = [enc.conv1.out_channels] + [getattr(enc, f"layer{i}").conv1.out_channels for i in range(1, 5)]
        strides = [getattr(enc, f"layer{i}").conv1.stride[0] for i in range(1, 5)]
        return {
            "num_classes": self.num_classes,
            "encoder_classes": enc.fc.out_features,
            "encoder_widths": widths,
            "encoder_strides": strides,
            "decoder_width": self.decoder_width,
            "mask_smoothing": self.mask_smoothing,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SaliencyNetwork:
        """Build an (untrained) network from ``config`` (see ``config``)."""
        encoder = ShapesResNet(
            num_classes=int(config["encoder_classes"]),
            widths=tuple(config["encoder_widths"]),
            strides=tuple(config["encoder_strides"]),
        )
        return cls(
            int(config["num_classes"]),
            encoder,
            mean=config.get("mean", IMAGENET_MEAN),
            std=config.get("std", IMAGENET_STD),
            decoder_width=int(config["decoder_width"]),
            mask_smoothing=int(config.get("mask_smoothing", 1)),
        )

    # ------------------------------------------------------------------ forward
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps [layer1, layer2, layer3, layer4] of [0, 1] images (32/16/8/8 px at 64)."""
        enc = self.encoder
        x = enc.relu(enc.bn1(enc.conv1((images - self.mean) / self.std)))
        features = []
        for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4):
            x = layer(x)
            features.append(x)
        return features

    def decode(self, features: Sequence[torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """Masks (N, 1, h, w) from encoder features and class ids: selector, upsampler, a/(a+b)."""
        _, s2, s3, s4 = features
        embedding = self.selector(classes.to(s4.device).long().flatten())  # (N, C4)
        gate = torch.sigmoid((s4 * embedding[:, :, None, None]).sum(1, keepdim=True))
        x = self.up3(torch.cat([s4 * gate, gate], 1), s3)
        x = self.up2(x, s2)
        logits = LOGIT_BOUND * torch.tanh(self.to_saliency(x) / LOGIT_BOUND)
        masks = torch.softmax(logits, 1)[:, :1]  # a/(a+b), a and b = exp(bounded logits) > 0
        return self.smooth(masks)

    def smooth(self, masks: torch.Tensor) -> torch.Tensor:
        """The fixed box filter ending the network (``mask_smoothing`` × ``mask_smoothing``)."""
        k = self.mask_smoothing
        if k == 1:
            return masks
        return F.avg_pool2d(masks, k, 1, k // 2, count_include_pad=False)

    def forward(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Masks (N, 1, H/4, W/4) in [0, 1] of [0, 1] images for ``classes`` (N,)."""
        return self.decode(self.encode(images), classes)

    def masks_and_logits(self, images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and the encoder's own logits from one encoder pass (what the ADV² attack needs)."""
        features = self.encode(images)
        return self.decode(features, classes), self.encoder_head(features[-1])

    def encoder_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's own classification logits of [0, 1] images (differentiable)."""
        return self.encoder_head(self.encode(images)[-1])

    def encoder_head(self, s4: torch.Tensor) -> torch.Tensor:
        """The encoder's classification logits from its deepest features (``encode(...)[-1]``)."""
        return self.encoder.fc(torch.flatten(self.encoder.avgpool(s4), 1))

    # ------------------------------------------------------------------ state
    @contextmanager
    def frozen(self) -> Iterator[SaliencyNetwork]:
        """Eval mode and frozen parameters inside; every module flag and ``requires_grad`` restored."""
        with frozen_module(self):
            yield self


# ---------------------------------------------------------------------------------- checkpoints


def save_saliency_network(network: SaliencyNetwork, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write an RTS checkpoint: ``path`` (.safetensors, the whole network) + ``.json`` metadata."""
    meta = dict(metadata or {})
    meta["kind"] = CHECKPOINT_KIND
    meta["network"] = network.config
    return save_checkpoint(network.state_dict(), path, meta)


def load_saliency_network(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SaliencyNetwork, dict[str, Any]]:
    """Read an RTS checkpoint written by ``save_saliency_network`` / ``train_rts``; eval mode."""
    state, meta = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND or "network" not in meta:
        raise CheckpointError(f"{str(path)!r} is not an RTS network checkpoint (train one with `underfire train rts`)")
    network = SaliencyNetwork.from_config(meta["network"])
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"RTS weights {str(path)!r} do not fit their architecture: {detail}") from None
    return network.eval().to(device), meta


# ---------------------------------------------------------------------------------- interpreter
