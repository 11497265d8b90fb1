"""The built-in architectures: small ResNet and DenseNet classifiers for 64×64 images.

They mirror the structure (and the module names) of torchvision's ResNet and DenseNet — the
paper's ResNet-50 and DenseNet-169 — at a size that trains in minutes on a laptop CPU:

* ResNet: ``conv1 → bn1 → relu → layer1..layer4 → avgpool → fc``, BasicBlocks with one in-place
  ReLU module reused twice per block and ``out += identity``, exactly the constructs that break
  naive hook-based interpreters.
* DenseNet: ``features`` (conv0, norm0, relu0, dense blocks, transitions, norm5) followed by a
  *functional* in-place ReLU, global average pooling and ``classifier``, as in torchvision.

Both end in global average pooling followed by one linear layer, so CAM is defined exactly, with
an 8×8 final feature map at 64×64 input (ResNet-50 has 7×7 at 224).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (He et al., 2016), torchvision layout."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ShapesResNet(nn.Module):
    """A 4-stage ResNet (one BasicBlock per stage) with a stride-2 stem.

    At 64×64 input the stages run at 32, 16, 8 and 8 pixels; ``layer4`` is the CAM layer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 16, 32, 64, 128),
        strides: Sequence[int] = (1, 2, 2, 1),
    ) -> None:
        super().__init__()
        if len(widths) != 5 or len(strides) != 4:
            raise SpecError("ShapesResNet needs 5 widths (stem + 4 stages) and 4 strides")
        self.conv1 = nn.Conv2d(3, widths[0], 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(widths[0], widths[1], strides[0])
        self.layer2 = BasicBlock(widths[1], widths[2], strides[1])
        self.layer3 = BasicBlock(widths[2], widths[3], strides[2])
        self.layer4 = BasicBlock(widths[3], widths[4], strides[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[4], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DenseLayer(nn.Module):
    """BN-ReLU-1×1 conv (bottleneck) then BN-ReLU-3×3 conv; output is concatenated (Huang et al.)."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bottleneck * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bottleneck * growth_rate, growth_rate, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    """BN-ReLU-1×1 conv halving the channels, then 2×2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class ShapesDenseNet(nn.Module):
    """A 2-block DenseNet-BC with torchvision's stem (stride-2 conv, max-pool); blocks run at 16
    and 8 pixels."""

    def __init__(
        self,
        num_classes: int = 10,
        growth_rate: int = 16,
        block_config: Sequence[int] = (4, 6),
        init_features: int = 32,
        bottleneck: int = 4,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, init_features, 3, 2, 1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        channels = init_features
        for i, n_layers in enumerate(block_config):
            block = nn.Sequential()
            for j in range(n_layers):
                block.add_module(f"denselayer{j + 1}", DenseLayer(channels, growth_rate, bottleneck))
                channels += growth_rate
            self.features.add_module(f"denseblock{i + 1}", block)
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


ARCHITECTURES: dict[str, type[nn.Module]] = {"resnet": ShapesResNet, "densenet": ShapesDenseNet}


def build_architecture(name: str, num_classes: int = 10) -> nn.Module:
    """Instantiate a built-in architecture by its short name (``resnet`` or ``densenet``)."""
    try:
        return ARCHITECTURES[name](num_classes=num_classes)
    except KeyError:
        raise SpecError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None
