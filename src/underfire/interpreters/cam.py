"""Representation-guided interpreters: CAM and Grad-CAM.

* **CAM** (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016; the
  ADV² paper's Eq. 7): for a network whose last conv feature maps ``a_k`` feed global average
  pooling and a linear head with weights ``w_{k,c}``, the map of class ``c`` is
  ``m_c[i, j] = Σ_k w_{k,c} a_k[i, j]``. As in the official ADV² code: no ReLU, no head bias,
  min-max normalised per image, kept at feature resolution (8×8 for the built-in models at 64 px,
  7×7 for ResNet-50 at 224). The map is a differentiable function of the input, so the attack's
  surrogate is the map itself.
* **Grad-CAM** (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization", ICCV 2017): ``α_k = mean_ij ∂z_c/∂a_k[i, j]``,
  ``map = ReLU(Σ_k α_k a_k)``, min-max normalised.

Where the model applies a ReLU between the feature module and the pooling (``post_relu``, as in
torchvision's DenseNet), both interpreters use the post-ReLU map ``a = relu(features)``: the tensor
global average pooling actually reduces, so Grad-CAM is taken with respect to it.

The interpreters own their layer discovery and their feature hook (``cam_layers.FeatureCapture``,
built with the interpreter): the layers are found once — restricted to the modules named by the
interpreter's ``feature_layer=`` / ``head=``, else by the classifier's hints
(``Classifier.cam_layer_names``) — and the hook lives for one forward pass at a time.

How Grad-CAM gets ∂z_c/∂a: ``FeatureCapture.features_and_logits`` returns the hooked feature map —
a *clone* of it where the model overwrites it in place (or in inference mode), and without a graph
in benign (no-grad) calls — so the classifier's logits cannot in general be differentiated with
respect to that tensor. The interpreters only accept models whose logits are exactly
``head(mean_ij(a))`` (``find_cam_layers`` verifies it), so Grad-CAM recomputes the logits from the
returned features through the head and differentiates those; the recomputed logits are checked
against the classifier's own on every call (a ``ModelStructureError`` otherwise). For such a
GAP→linear head ``∂z_c/∂a_k[i, j] = w_{k,c}/(h·w)``, hence ``Grad-CAM = ReLU(CAM)/(h·w)`` exactly
(a test checks it); Grad-CAM therefore differs from CAM only by the ReLU, which zeroes the negative
evidence before normalisation.

Convention notes against the usual libraries (all checked by the tests): torch-cam's ``CAM``
computes the same un-rectified ``Σ_k w_{k,c} a_k`` (its docstring shows a ReLU, its code applies
none); captum's ``LayerGradCam`` equals our raw Grad-CAM with ``relu_attributions=True`` (its
default is False); pytorch-grad-cam's ``GradCAM`` applies the ReLU and then normalises and resizes
the map to the input size, which we do not (maps stay at feature resolution).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from ..errors import ModelStructureError
from ..models.classifier import Classifier
from .base import Interpreter, normalize_maps
from .cam_layers import CamLayers, FeatureCapture

__all__ = ["CAM", "GradCAM"]

#: Relative tolerance for the check that head(mean(features)) reproduces the model's logits.
HEAD_CHECK_RTOL = 1e-4


class _RepresentationInterpreter(Interpreter):
    """Shared plumbing: eager layer discovery and the validated, frozen ``raw`` entry point.

    Args:
        classifier: the model to explain (an ``nn.Module`` with a GAP→linear head).
        feature_layer, head: module names of the feature map and the linear head, overriding the
            classifier's hints (``Classifier.cam_layer_names``); unnamed layers are found by
            verification (``find_cam_layers``).

    ``layers`` is the ``CamLayers`` the interpreter reads and ``capture`` the ``FeatureCapture``
    that found them and hooks the feature map.
    """

    #: whether the interpreter needs a GAP→linear head (CAM) or reads any feature map (Grad-CAM)
    needs_gap_head: bool = True

    def __init__(self, classifier: Classifier, *, feature_layer: str | None = None, head: str | None = None) -> None:
        super().__init__(classifier)
        # Find the feature layer and the head now, so a model without the layers fails when the
        # interpreter is built (ModelStructureError), not in the middle of an attack.
        self.capture = FeatureCapture(classifier, feature_layer=feature_layer, head=head, gap_head=self.needs_gap_head)
        self.layers: CamLayers = self.capture.layers

    def raw(self, images: torch.Tensor, classes: Any = None) -> torch.Tensor:
        """Un-normalised maps (N, 1, h, w) for ``classes`` (default: the predicted classes).

        Validated and run frozen like calling the interpreter; returns detached maps.
        """
        return self.run_frozen(images, classes, self._raw_benign)

    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The benign map, computed without building a graph to the input (deterministic)."""
        return normalize_maps(self._raw_benign(images, classes))

    def surrogate(self, images: torch.Tensor, classes: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, None]:
        """The normalised map with its graph to ``images``: the map itself is differentiable."""
        raw, _ = self._raw_and_logits(images, classes)
        return normalize_maps(raw), None

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The normalised map and the logits of the one forward pass that produced its features
        (``FeatureCapture.features_and_logits``): the attack needs no second forward."""
        raw, logits = self._raw_and_logits(images, classes)
        return normalize_maps(raw), logits, None

    @abstractmethod
    def _raw_benign(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The un-normalised map without a graph to the input."""

    @abstractmethod
    def _raw_and_logits(self, images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The un-normalised map with its graph to the input, and the logits of the same forward."""


class CAM(_RepresentationInterpreter):
    """Class activation mapping (Zhou et al. 2016; ADV² Eq. 7): ``Σ_k w_{k,c} a_k``, no ReLU.

    Maps are min-max normalised per image and stay at the feature map's resolution.
    """

    name = "cam"
    description = "class activation mapping (Zhou et al. 2016)"
    paper_class = "representation"

    def _raw_and_logits(self, images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.capture.features_and_logits(images)
        return _class_map(features, self.layers.head.weight, classes), logits

    def _raw_benign(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._raw_and_logits(images, classes)[0]


class GradCAM(_RepresentationInterpreter):
    """Gradient-weighted class activation mapping (Selvaraju et al. 2017), on any conv network.

    ``α_k`` is the spatial mean of ``∂z_c/∂a_k``, the map is ``ReLU(Σ_k α_k a_k)``, min-max
    normalised, at feature resolution. The surrogate keeps the graph of the gradient
    (``create_graph=True``) so the map is differentiable with respect to the input. On a
    GAP→linear head it is read as CAM is (and equals ``ReLU(CAM)/(h·w)``); on any other head
    (Flatten→dense, VGG) at ``feature_layer`` or the last spatial feature map, with the
    gradient taken through the model's own forward (``FeatureCapture.features_in_graph``).
    """

    name = "gradcam"
    description = "gradient-weighted CAM (Selvaraju et al. 2017)"
    paper_class = "representation"
    needs_gap_head = False
    #: ReLU(Σ α a) is 0 everywhere when no position supports the class: an answer; a layer the
    #: score does not reach is refused where the gradient is taken (``_weighted_map``)
    refuses_constant_maps = False

    def _raw_and_logits(self, images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layers.head is None:
            features, logits = self.capture.features_in_graph(images, detach=False)
            return _weighted_map(features, logits, classes, create_graph=True), logits
        features, logits = self.capture.features_and_logits(images)
        return self._grad_cam(features, logits, classes, create_graph=True), logits

    def _raw_benign(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if self.layers.head is None:
            features, logits = self.capture.features_in_graph(images, detach=True)
            return _weighted_map(features, logits, classes, create_graph=False).detach()
        with torch.no_grad():
            features, logits = self.capture.features_and_logits(images)
        return self._grad_cam(features, logits, classes, create_graph=False).detach()

    def _grad_cam(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        classes: torch.Tensor,
        *,
        create_graph: bool,
    ) -> torch.Tensor:
        head = self.layers.head
        assert head is not None
        with torch.enable_grad():
            # Without a graph to the input (benign maps), differentiate w.r.t. a detached leaf.
            source = features if features.requires_grad else features.detach().requires_grad_(True)
            scores = head(source.mean((2, 3)))
            _check_head_logits(scores.detach(), logits.detach(), self.classifier, self.layers)
        return _weighted_map(source, scores, classes, create_graph=create_graph, features=features)


def _weighted_map(
    source: torch.Tensor,
    logits: torch.Tensor,
    classes: torch.Tensor,
    *,
    create_graph: bool,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grad-CAM's ``ReLU(Σ_k α_k a_k)`` with ``α_k = mean_ij ∂z_c/∂a_k[i, j]``, the gradient taken
    with respect to ``source`` (``features`` defaults to it)."""
    with torch.enable_grad():
        picked = logits.gather(1, classes.view(-1, 1)).sum()  # samples are independent
        (grads,) = torch.autograd.grad(picked, source, create_graph=create_graph)
    unreached = (grads.detach().flatten(1) == 0).all(1)
    if bool(unreached.any()):
        index = int(unreached.nonzero()[0])
        raise ModelStructureError(
            f"gradcam: the score of class {int(classes[index])} has no gradient at the feature layer (image {index} "
            "of the batch), so its map would be 0 everywhere: the score does not reach that layer (after a vision "
            "transformer's last block only the class token does); choose one it reaches with feature_layer="
        )
    alpha = grads.mean((2, 3), keepdim=True)
    return torch.relu((alpha * (source if features is None else features)).sum(1, keepdim=True))


def _class_map(features: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Σ_k w_{k,c} a_k[i, j] for each sample's class: (N, K, h, w) → (N, 1, h, w)."""
    w = weight.to(features.dtype)[classes]  # (N, K)
    # one batched (1, K) × (K, h·w) product: what einsum("nkhw,nk->nhw") computes, bit for bit,
    # without its per-call planning (6× faster at batch 16, which is a tenth of a CAM call there)
    n, _, height, width = features.shape
    return torch.bmm(w.unsqueeze(1), features.flatten(2)).view(n, 1, height, width)


def _check_head_logits(scores: torch.Tensor, logits: torch.Tensor, clf: Classifier, layers: CamLayers) -> None:
    """Refuse to differentiate logits that are not the model's (the recomputation is only exact
    for a GAP→linear head)."""
    scale = max(1.0, float(logits.abs().max()))
    if scores.shape != logits.shape or not torch.allclose(
        scores, logits.to(scores.dtype), rtol=HEAD_CHECK_RTOL, atol=HEAD_CHECK_RTOL * scale
    ):
        raise ModelStructureError(
            f"Grad-CAM: the logits of {clf.name} are not {layers.head_name}(mean of "
            f"{layers.feature_name}); Grad-CAM needs a GAP→linear head"
        )
