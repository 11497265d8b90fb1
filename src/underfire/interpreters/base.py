"""The one contract every interpreter follows.

An interpreter explains a ``Classifier``: images (N, C, H, W) in [0, 1] and classes (N,) → maps
(N, 1, h, w) in [0, 1], "high = important". Calling it validates the inputs, runs the model frozen
(eval mode, no parameter gradients, every flag restored afterwards), leaves no hook behind and
returns detached maps. ``surrogate`` is the same map as a differentiable function of the images:
what the ADV² attack optimises (DESIGN §2). ``surrogate_and_logits`` adds the classifier's logits
of the same images, which the attack's prediction loss needs: interpreters that run the classifier
on the clean images anyway (GRAD, CAM, Grad-CAM) override it to hand back the logits of their own
forward pass instead of paying for a second one. Adding an interpreter = one module with one
subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..models.classifier import Classifier

#: Added to the max−min range so a constant map normalises to zeros instead of NaN.
NORMALISE_EPS = 1e-12


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of a (N, 1, h, w) batch to [0, 1], differentiably."""
    flat = maps.flatten(1)
    low = flat.min(1, keepdim=True).values
    high = flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low + NORMALISE_EPS)).view_as(maps)


class Interpreter(ABC):
    """Base class: subclasses implement ``surrogate`` (and may override ``explain``)."""

    #: Registry name used by the CLI (``--interpreter NAME``).
    name: ClassVar[str]

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    def __call__(
        self, images: torch.Tensor, classes: Any = None, *, seed: int | None = None
    ) -> torch.Tensor:
        """Maps (N, 1, h, w) in [0, 1] for ``classes`` (default: the predicted classes)."""

        def benign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            generator = None if seed is None else torch.Generator(x.device).manual_seed(seed)
            return self.explain(x, c, generator=generator)

        return self.run_frozen(images, classes, benign)

    def run_frozen(
        self,
        images: torch.Tensor,
        classes: Any,
        compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Validate, default the classes to the predictions, run ``compute`` frozen, detach."""
        clf = self.classifier
        images = clf.prepare_images(images)
        with clf.frozen():
            if classes is None:
                with torch.no_grad():
                    classes = clf(images).argmax(1)
            classes = clf.check_classes(classes, images.shape[0])
            maps = compute(images, classes)
        return maps.detach()

    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The benign map; by default the surrogate evaluated without keeping a graph."""
        with torch.enable_grad():
            maps, _ = self.surrogate(images, classes)
        return maps

    def initial_state(self, seed: int, device: torch.device) -> Any:
        """The ``state`` an attack passes to the first ``surrogate`` call (stateless: ``None``)."""
        return None

    def map_shape(self, images: torch.Tensor) -> tuple[int, int]:
        """(h, w) of the maps this interpreter makes for ``images``' size.

        The default explains one image; interpreters whose map size follows from their settings
        override it with arithmetic.
        """
        return tuple(self(images[:1]).shape[-2:])  # type: ignore[return-value]

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``surrogate``'s maps and state, plus the classifier's logits of ``images``.

        Returns ``(maps, logits, state)``; the logits equal ``classifier(images)`` (the same values)
        and are differentiable with respect to ``images`` like the maps. The default calls
        ``surrogate`` and then the classifier: one extra forward pass. Interpreters whose surrogate
        already runs the classifier on exactly these images override it and return that forward's
        logits; one whose forward passes see other inputs (SmoothGrad's noisy copies, MASK's
        perturbed images) or another network (RTS) keeps this default. Called inside
        ``classifier.frozen()``, like ``surrogate``.
        """
        maps, state = self.surrogate(images, classes, state)
        return maps, self.classifier(images), state

    @abstractmethod
    def surrogate(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, Any]:
        """Differentiable maps (N, 1, h, w) in [0, 1] of ``images`` for ``classes``, and a state.

        Called inside ``classifier.frozen()``. The maps must carry gradient back to ``images``
        (the ADV² interpretation loss depends on it). Stateless interpreters return ``None`` as
        state; iterative ones (MASK) take the state of the previous call and return the next.
        """
