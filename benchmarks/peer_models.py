"""Copies of the built-in and torchvision models in the form captum's and zennit's hooks need.

captum's DeepLift hooks ReLU *modules* and requires each to run once per forward pass; ResNets
reuse one ReLU module twice per block and DenseNets call a functional ReLU before pooling, which
its hooks cannot see. zennit needs the residual sum as a module (its ResNet canonizer) and the
final pooling as a module. These copies compute the same function (checked by the tests) with
those constructs made explicit; underfire runs on the originals.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn

from underfire.models.torchvision_compat import import_torchvision

import_torchvision()  # zennit imports torchvision's models; this registers the operators they need

from zennit.canonizers import (  # noqa: E402
    AttributeCanonizer,
    CompositeCanonizer,
    NamedMergeBatchNorm,
    SequentialMergeBatchNorm,
)
from zennit.layer import Sum  # noqa: E402


def _is_basic_block(module: nn.Module) -> bool:
    return all(
        hasattr(module, name) for name in ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")
    ) and not hasattr(module, "conv3")


def _block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_out(out + identity)


class _DenseHead(nn.Module):
    """features → ReLU → global average pool → classifier, each as a module."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features, self.classifier = net.features, net.classifier
        self.relu, self.pool, self.flatten = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.relu(self.features(x)))))


def captum_ready(network: nn.Module) -> nn.Module:
    """A copy with one out-of-place ReLU module per use (captum's DeepLift and LRP)."""
    net = copy.deepcopy(network)
    if hasattr(net, "features") and hasattr(net, "classifier"):
        net = _DenseHead(net)
    for module in net.modules():
        if _is_basic_block(module):
            module.relu_out = nn.ReLU()
            module.forward = types.MethodType(_block_forward, module)
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return net.eval()


class BasicBlockSum(AttributeCanonizer):
    """zennit's ResNet BasicBlock canonizer (the residual sum as a ``Sum`` module) for any block
    with torchvision's attribute names: the built-in ResNet's and torchvision's."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict | None:
        if not _is_basic_block(module):
            return None
        return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}

    @staticmethod
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


class _ExactIdentity:
    """zennit's merge leaves the BatchNorm computing x / sqrt(1 + eps), so the canonised model is
    off by 5e-6 relative per merged layer (enough to move LRP maps where a denominator is near
    zero); this one sets eps to 0 while merged."""

    def register(self, linears: list, batch_norm: nn.Module) -> None:
        super().register(linears, batch_norm)  # type: ignore[misc]
        self._eps, batch_norm.eps = batch_norm.eps, 0.0

    def remove(self) -> None:
        super().remove()  # type: ignore[misc]
        self.batch_norm.eps = self._eps  # type: ignore[attr-defined]


class ExactSequentialMerge(_ExactIdentity, SequentialMergeBatchNorm):
    pass


class ExactNamedMerge(_ExactIdentity, NamedMergeBatchNorm):
    pass


def zennit_canonizers(network: nn.Module) -> list:
    """BatchNorm merged into the layer whose output it normalises; residual sums as modules.

    zennit's ``SequentialMergeBatchNorm`` pairs layers by module order, which in a DenseNet also
    pairs a layer's last convolution with the next layer's first BatchNorm (that one normalises
    the concatenation): there only the true pairs (the stem, each bottleneck) are named.
    """
    if not any(name.endswith("norm2") for name, _ in network.named_modules()):
        return [CompositeCanonizer((ExactSequentialMerge(), BasicBlockSum()))]
    pairs = [
        ((f"{name}.conv1",), f"{name}.norm2") for name, module in network.named_modules() if hasattr(module, "norm2")
    ]
    stem = next(name for name, _ in network.named_modules() if name.endswith("conv0"))
    return [ExactNamedMerge([((stem,), stem.replace("conv0", "norm0")), *pairs])]
