"""Where CAM and Grad-CAM read a model, and the hook that reads it (DESIGN §1.3).

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
  named ``feature_layer`` does not feed one, ``find_feature_layer`` picks the named module or the
  last one with a spatial 4-D output, and ``FeatureCapture.features_in_graph`` hands the rest of
  the forward a copy of its output, so the logits are a differentiable function of the captured
  map (``∂z_c/∂a_k`` by autograd, as pytorch-grad-cam and captum's ``LayerGradCam`` compute it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
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
    head: nn.Linear | None
    post_relu: bool


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
    unless ``gap_head=False``: then a model without one gets the layers of ``find_feature_layer``
    (``layers.head`` is None) and is read through ``features_in_graph``.
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
            raise ModelStructureError(
                "CAM needs an nn.Module model; a plain callable has no layers to read"
            )
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
            try:
                self.layers: CamLayers = find_cam_layers(network, inputs, *self.names)
            except ModelStructureError:
                if gap_head or self.names[1] is not None:
                    raise
                self.layers = find_feature_layer(network, inputs, self.names[0])

    def features_in_graph(self, images: torch.Tensor, *, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass returning (feature map, logits) with the logits a differentiable
        function of the returned map, whatever the head: the hook hands the rest of the forward a
        copy of the module's output (so in-place ops downstream leave the returned map intact).
        ``detach=True`` (benign maps) makes the map a fresh leaf, so the graph starts there."""
        captured: list[torch.Tensor] = []

        def substitute(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
            source = output.detach().requires_grad_(True) if detach else output
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
) -> CamLayers:
    """Find the feature module whose global-average-pooled output feeds the logits' linear head.

    Discovery is by verification, not by family names: one probe forward records every module's
    output; the head is the last ``nn.Linear`` whose output is the logits, and the feature map is
    the last 4-D output (spatial > 1×1) whose spatial mean — as is, or after a ReLU — equals the
    head's input. This covers ResNet and DenseNet (ours and torchvision's) and any GAP→linear net.
    ``feature_layer`` / ``head`` restrict the search to the named modules.
    """
    modules = dict(model.named_modules())
    for label, wanted in (("feature layer", feature_layer), ("head", head)):
        if wanted is not None and wanted not in modules:
            raise ModelStructureError(f"{label} {wanted!r} is not a module of the model")

    records: list[tuple[str, torch.Tensor]] = []
    head_inputs: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor):
                records.append((name, output.detach().clone()))
            if isinstance(module, nn.Linear) and inputs and isinstance(inputs[0], torch.Tensor):
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

    head_name = _find_head(records, modules, logits, head)
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


def find_feature_layer(model: nn.Module, probe: torch.Tensor, feature_layer: str | None = None) -> CamLayers:
    """Grad-CAM's layer on any convolutional model: the named module, else the last module (in
    execution order) whose output is a spatial 4-D map — the last convolutional block, the
    layer Selvaraju et al. and pytorch-grad-cam use."""
    modules = dict(model.named_modules())
    if feature_layer is not None and feature_layer not in modules:
        raise ModelStructureError(f"feature layer {feature_layer!r} is not a module of the model")
    outputs: list[tuple[str, tuple[int, ...]]] = []

    def recorder(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                outputs.append((name, tuple(output.shape)))

        return hook

    handles = []
    try:
        for name, module in modules.items():
            if name and (feature_layer is None or name == feature_layer):
                handles.append(module.register_forward_hook(recorder(name)))
        model(probe)
    except RuntimeError as error:  # e.g. TorchScript modules refuse Python hooks
        raise ModelStructureError(f"cannot inspect the model's layers for Grad-CAM: {error}") from None
    finally:
        for handle in handles:
            handle.remove()
    spatial = [name for name, shape in outputs if len(shape) == 4 and shape[2] * shape[3] > 1]
    if not spatial:
        where = f"module {feature_layer!r} outputs" if feature_layer else "no module outputs"
        raise ModelStructureError(f"{where} a spatial feature map (N, K, h, w) for Grad-CAM to read")
    name = spatial[-1]
    return CamLayers(name, modules[name], None, None, post_relu=False)


def _find_head(
    records: list[tuple[str, torch.Tensor]],
    modules: dict[str, nn.Module],
    logits: Any,
    head: str | None,
) -> str:
    if head is not None:
        if not isinstance(modules[head], nn.Linear):
            raise ModelStructureError(f"head {head!r} is a {type(modules[head]).__name__}, not nn.Linear")
        return head
    if isinstance(logits, torch.Tensor):
        for name, output in reversed(records):
            if isinstance(modules[name], nn.Linear) and output.shape == logits.shape:
                if torch.equal(output, logits.detach()):
                    return name
    raise ModelStructureError(
        "no nn.Linear layer produces the model's logits; CAM needs a GAP→linear head "
        "(name it with head=)"
    )
