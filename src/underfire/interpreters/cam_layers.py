"""Where CAM and Grad-CAM read a model, and the hook that reads it.

The CAM interpreters own their layer discovery and their feature hook, as zennit's composites own
theirs: the ``Classifier`` only carries the layer-name hints (``Classifier.cam_layer_names``, from
its ``feature_layer=`` / ``head=`` arguments) as model metadata.

* ``find_cam_layers`` runs one probe forward with a hook on every module and returns the
  ``CamLayers``: the feature module whose global-average-pooled output feeds the linear head that
  produces the logits.
* ``FeatureCapture`` does that once for one classifier (a seeded random probe at the classifier's
  ``input_size``, frozen, without gradient) and then, on every call of ``features_and_logits``,
  hooks the feature module for one forward pass and returns the feature map with the logits.
* Grad-CAM needs no GAP head: where there is none (VGG-style or Flatten→dense models), or where the
  named ``feature_layer`` does not feed one, ``find_cam_layers(gap_head=False)`` picks, from the
  same probe forward, the named module or the last one with a spatial 4-D output, and
  ``FeatureCapture.features_in_graph`` hands the rest of the forward a copy of its output, so the
  logits are a differentiable function of the captured map (``∂z_c/∂a_k`` by autograd, as
  pytorch-grad-cam and captum's ``LayerGradCam`` compute it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelStructureError
from ..models.classifier import Classifier

__all__ = ["CamLayers", "FeatureCapture", "find_cam_layers"]


@dataclass(frozen=True)
class CamLayers:
    """Where CAM reads a model: the last conv feature map and the linear head it feeds.

    ``post_relu`` is True when the model applies a (functional) ReLU between the feature module and
    global average pooling, as torchvision's DenseNet does after ``features``. ``head`` is None
    when the feature map feeds no GAP→linear head (Grad-CAM's general case).
    """

    feature_name: str
    feature_module: nn.Module
    head_name: str | None
    head: nn.Module | None  # nn.Linear, or a module that computes F.linear with its 2-D weight
    post_relu: bool
    #: a transformer's token output (N, T, C): the number of tokens before the patch tokens (the
    #: class token), which the map drops; the patch tokens are read on their square grid
    prefix_tokens: int | None = None


def tokens_to_grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """(N, T, C) tokens → the patch tokens as a feature map (N, C, g, g), the first ``prefix`` dropped."""
    patches = tokens[:, prefix:]
    side = math.isqrt(patches.shape[1])
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def grid_to_tokens(grid: torch.Tensor, prefix_part: torch.Tensor) -> torch.Tensor:
    """The inverse of ``tokens_to_grid``, the dropped tokens put back in front."""
    return torch.cat([prefix_part, grid.flatten(2).transpose(1, 2)], dim=1)


def _token_grid(output: torch.Tensor, prefix: int = 1) -> bool:
    """Whether ``output`` is a transformer's tokens: (N, T, C) with T − ``prefix`` a square > 1."""
    if output.dim() != 3 or output.shape[1] <= prefix + 1:
        return False
    side = math.isqrt(output.shape[1] - prefix)
    return side * side == output.shape[1] - prefix


class FeatureCapture:
    """CAM's view of one classifier: its ``CamLayers`` (found once, at construction) and a
    one-forward ``features_and_logits`` that hooks the feature module for that forward only.

    Args:
        classifier: the wrapped model; it must be an ``nn.Module`` (a plain callable has no layers
            to read: ``ModelStructureError``).
        feature_layer, head: module names restricting the discovery; ``None`` falls back to the
            classifier's hints (``classifier.cam_layer_names``, its ``feature_layer=`` / ``head=``
            arguments).

    Raises ``ModelStructureError`` when the model has no GAP→linear head (see ``find_cam_layers``),
    unless ``gap_head=False``: then a model without one gets its last spatial feature map
    (``layers.head`` is None; ``find_cam_layers``) and is read through ``features_in_graph``.
    """

    def __init__(
        self,
        classifier: Classifier,
        *,
        feature_layer: str | None = None,
        head: str | None = None,
        gap_head: bool = True,
    ) -> None:
        network = classifier.network
        if not isinstance(network, nn.Module):
            raise ModelStructureError("CAM needs an nn.Module model; a plain callable has no layers to read")
        hinted_feature, hinted_head = classifier.cam_layer_names
        self.classifier = classifier
        #: the module names the discovery was restricted to: (feature_layer, head), ``None`` = free
        self.names: tuple[str | None, str | None] = (
            feature_layer if feature_layer is not None else hinted_feature,
            head if head is not None else hinted_head,
        )
        #: the feature map must be copied in the hook (the model writes to it in place)
        self.copy_features = False
        size = classifier.input_size or 224
        generator = torch.Generator().manual_seed(0)
        probe = torch.rand((2, classifier.in_channels, size, size), generator=generator)
        with classifier.frozen(), torch.no_grad():
            inputs = classifier.normalize(probe.to(classifier.device))
            self.layers: CamLayers = find_cam_layers(network, inputs, *self.names, gap_head=gap_head)

    def features_in_graph(self, images: torch.Tensor, *, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass returning (feature map, logits) with the logits a differentiable
        function of the returned map, whatever the head: the hook hands the rest of the forward a
        copy of the module's output (so in-place ops downstream leave the returned map intact).
        ``detach=True`` (benign maps) makes the map a fresh leaf, so the graph starts there."""
        captured: list[torch.Tensor] = []

        prefix = self.layers.prefix_tokens

        def substitute(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
            source = output.detach().requires_grad_(True) if detach else output
            if prefix is not None:  # tokens: the map is the patch grid, which the rest then reads
                grid = tokens_to_grid(source, prefix)
                captured.append(grid)
                return grid_to_tokens(grid, source[:, :prefix])
            captured.append(source)
            return source.clone()

        handle = self.layers.feature_module.register_forward_hook(substitute)
        try:
            with torch.enable_grad():
                logits = self.classifier(images)
        finally:
            handle.remove()
        return captured[-1], logits

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass returning (CAM feature map (N, K, h, w), logits), both differentiable.

        The feature map is the one global average pooling reduces (ReLU applied where the model
        applies it after the feature module). The hook lives only for this call. The captured
        output is used as is unless the model modifies it in place later in the forward (its
        version counter moves, as with torchvision DenseNet's in-place ReLU); then this forward is
        run again copying it, and every later call copies it straight away.
        """
        layers = self.layers
        captured: list[tuple[torch.Tensor, int | None]] = []
        copy = self.copy_features

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if copy or output.is_inference():  # inference tensors have no version counter: copy
                captured.append((output.clone(), None))
            else:
                captured.append((output, output._version))

        handle = layers.feature_module.register_forward_hook(keep)
        try:
            logits = self.classifier(images)
        finally:
            handle.remove()
        features, version = captured[-1]
        if version is not None and features._version != version:
            self.copy_features = True
            return self.features_and_logits(images)
        if layers.post_relu:
            features = torch.relu(features)
        return features, logits


def find_cam_layers(
    model: nn.Module,
    probe: torch.Tensor,
    feature_layer: str | None = None,
    head: str | None = None,
    *,
    gap_head: bool = True,
) -> CamLayers:
    """Find the feature module whose global-average-pooled output feeds the logits' linear head.

    Discovery is by verification, not by family names: one probe forward records every module's
    output; the head is the last linear layer whose output is the logits, and the feature map is
    the last 4-D output (spatial > 1×1) whose spatial mean — as is, or after a ReLU — equals the
    head's input. This covers ResNet and DenseNet (ours and torchvision's) and any GAP→linear net.
    ``feature_layer`` / ``head`` restrict the search to the named modules.

    With ``gap_head=False`` (Grad-CAM) and no ``head`` named, a model without such a head gets,
    from the same probe forward, the named feature module or else the last module (in execution
    order) with a spatial 4-D output — the last convolutional block, the layer Selvaraju et al.
    and pytorch-grad-cam use — and ``head`` None.
    """
    modules = dict(model.named_modules())
    for label, wanted in (("feature layer", feature_layer), ("head", head)):
        if wanted is not None and wanted not in modules:
            raise ModelStructureError(f"{label} {wanted!r} is not a module of the model")
    records, head_inputs, logits = _record_outputs(model, modules, probe)
    try:
        return _gap_layers(records, head_inputs, modules, logits, feature_layer, head)
    except ModelStructureError:
        if gap_head or head is not None:
            raise
    spatial = [
        name
        for name, output in records
        if output.dim() == 4 and output.shape[2] * output.shape[3] > 1 and feature_layer in (None, name)
    ]
    tokens = (
        None
        if spatial and feature_layer is not None
        else _reached_tokens(model, modules, probe, records, feature_layer)
    )
    if spatial and tokens is None:
        return CamLayers(spatial[-1], modules[spatial[-1]], None, None, post_relu=False)
    if tokens is not None:
        return CamLayers(tokens, modules[tokens], None, None, post_relu=False, prefix_tokens=1)
    where = f"module {feature_layer!r} outputs" if feature_layer else "no module outputs"
    raise ModelStructureError(
        f"{where} a spatial feature map (N, K, h, w) or patch tokens (N, 1 + g·g, C) that the class score "
        "reaches, for Grad-CAM to read"
    )


def _reached_tokens(
    model: nn.Module,
    modules: dict[str, nn.Module],
    probe: torch.Tensor,
    records: list[tuple[str, torch.Tensor]],
    feature_layer: str | None = None,
) -> str | None:
    """A transformer's token layer for Grad-CAM: the named one, or else the last module (in
    execution order) with a token output whose patch tokens the logits depend on. After a vision
    transformer's last block only the class token reaches the head, so the last block's first
    LayerNorm is what this finds (where pytorch-grad-cam's ViT tutorial reads)."""
    names = [name for name, output in records if _token_grid(output) and feature_layer in (None, name)]
    if not names:
        return None
    if feature_layer is not None:
        return names[-1]
    # one probe forward keeping every candidate's output in the graph, one backward for them all
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name] = output

        return hook

    candidates = list(dict.fromkeys(names))
    handles = [modules[name].register_forward_hook(keep(name)) for name in candidates]
    try:
        with torch.enable_grad():
            total = model(probe.detach().requires_grad_(True)).sum()
    finally:
        for handle in handles:
            handle.remove()
    gradients = torch.autograd.grad(total, [captured[name] for name in candidates], allow_unused=True)
    for name, gradient in reversed(list(zip(candidates, gradients))):
        if gradient is not None and bool((gradient[:, 1:] != 0).any()):
            return name
    return None


def _record_outputs(
    model: nn.Module, modules: dict[str, nn.Module], probe: torch.Tensor
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, torch.Tensor], Any]:
    """One probe forward with a hook on every module: (name, output) in execution order, each
    linear layer's input, and the logits."""
    records: list[tuple[str, torch.Tensor]] = []
    head_inputs: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor):
                records.append((name, output.detach().clone()))
            if _linear_like(module) and inputs and isinstance(inputs[0], torch.Tensor):
                head_inputs[name] = inputs[0].detach().clone()

        return hook

    handles = []
    try:
        for name, module in modules.items():
            if name:
                handles.append(module.register_forward_hook(recorder(name)))
    except RuntimeError as error:  # e.g. TorchScript modules refuse Python hooks
        for handle in handles:
            handle.remove()
        raise ModelStructureError(f"cannot inspect the model's layers for CAM: {error}") from None
    try:
        logits = model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return records, head_inputs, logits


def _gap_layers(
    records: list[tuple[str, torch.Tensor]],
    head_inputs: dict[str, torch.Tensor],
    modules: dict[str, nn.Module],
    logits: Any,
    feature_layer: str | None,
    head: str | None,
) -> CamLayers:
    """The GAP→linear reading of the recorded forward (``find_cam_layers``)."""
    head_name = _find_head(records, head_inputs, modules, logits, head)
    pooled = head_inputs[head_name]
    if pooled.dim() != 2:
        raise ModelStructureError(
            f"the head {head_name!r} receives a {pooled.dim()}-D input; CAM needs a vector of "
            "globally average-pooled features"
        )
    seen: set[str] = set()
    for name, output in reversed(records):
        if name in seen or (feature_layer is not None and name != feature_layer):
            continue
        seen.add(name)
        if output.dim() != 4 or output.shape[2] * output.shape[3] <= 1:
            continue
        if output.shape[:2] != pooled.shape:
            continue
        for post_relu in (False, True):
            activation = torch.relu(output) if post_relu else output
            if torch.allclose(activation.mean((2, 3)), pooled, rtol=1e-4, atol=1e-5):
                return CamLayers(name, modules[name], head_name, modules[head_name], post_relu)
    where = f"module {feature_layer!r}" if feature_layer else "no module"
    raise ModelStructureError(
        f"{where} outputs a feature map whose global average pool feeds the linear head "
        f"{head_name!r}; CAM needs a GAP→linear head (name the layers with feature_layer=/head=)"
    )


def _linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, or a module holding a 2-D ``weight`` (the linear layer of an unflattened
    ``torch.export`` program is such a module); ``_find_head`` checks that it computes
    ``F.linear``."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (isinstance(weight, torch.Tensor) and weight.dim() == 2)


def _computes_linear(module: nn.Module, inputs: torch.Tensor | None, output: torch.Tensor) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if inputs is None:
        return False
    expected = F.linear(inputs, module.weight, getattr(module, "bias", None))
    return expected.shape == output.shape and torch.allclose(expected, output, rtol=1e-5, atol=1e-6)


def _find_head(
    records: list[tuple[str, torch.Tensor]],
    head_inputs: dict[str, torch.Tensor],
    modules: dict[str, nn.Module],
    logits: Any,
    head: str | None,
) -> str:
    outputs = dict(records)
    if head is not None:
        module = modules[head]
        if not _linear_like(module) or (
            head in outputs and not _computes_linear(module, head_inputs.get(head), outputs[head])
        ):
            raise ModelStructureError(
                f"head {head!r} is a {type(module).__name__}, not nn.Linear (nor a module computing F.linear)"
            )
        return head
    if isinstance(logits, torch.Tensor):
        for name, output in reversed(records):
            module = modules[name]
            if _linear_like(module) and output.shape == logits.shape and torch.equal(output, logits.detach()):
                if _computes_linear(module, head_inputs.get(name), output):
                    return name
    raise ModelStructureError(
        "no nn.Linear layer produces the model's logits; CAM needs a GAP→linear head (name it with head=)"
    )
