"""An example underfire plugin: an interpreter and an attack, each one class.

Credits: gradient × input is Shrikumar et al. 2016 ("Not just a black box"); the fast gradient
sign method is Goodfellow et al. 2015 (here its targeted form, one step towards c_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from underfire.attacks import Attack, Iterates, project
from underfire.errors import InputError
from underfire.interpreters import Interpreter, normalize_maps
from underfire.smoothing import relu_surrogate


class GradientTimesInput(Interpreter):
    """|x ⊙ ∂z_c/∂x| (max over colour channels), min-max normalised; ``relu`` is the ReLU-gradient
    surrogate the attack differentiates through (the benign map uses the exact gradient)."""

    name = "example_gxi"
    description = "gradient × input, an example plugin (Shrikumar et al. 2016)"
    paper_class = "back-propagation"

    def __init__(self, classifier: Any, *, relu: str = "h") -> None:
        super().__init__(classifier)
        self.relu = relu

    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            return self._maps(x, classes, create_graph=False).detach()

    def surrogate(self, images: torch.Tensor, classes: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        x = images if images.requires_grad else images.detach().requires_grad_(True)
        with torch.enable_grad(), relu_surrogate(self.relu):
            return self._maps(x, classes, create_graph=True), None

    def _maps(self, x: torch.Tensor, classes: torch.Tensor, create_graph: bool) -> torch.Tensor:
        score = self.classifier(x).gather(1, classes.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, x, create_graph=create_graph)
        return normalize_maps((x * grad).abs().amax(1, keepdim=True))


@dataclass(frozen=True)
class FGSMConfig:
    """One step of size ``eps`` (the whole budget); ``seed`` is unused (FGSM is deterministic)."""

    eps: float = 8 / 255
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, float) and math.isfinite(self.eps) and 0 < self.eps <= 1):
            raise InputError(f"FGSM eps must be in (0, 1], got {self.eps!r}")


class TargetedFGSM(Attack):
    """x − ε·sign(∇ CE(f(x), c_t)), projected and put on the 8-bit grid."""

    name = "fgsm"
    label = "FGSM"
    description = "one targeted fast-gradient-sign step, an example plugin (Goodfellow et al. 2015)"
    config_type = FGSMConfig
    uses_interpreter = False

    def run(self, images: torch.Tensor, targets: torch.Tensor, target_maps: Any, config: FGSMConfig) -> Iterates:
        # Attack.__call__ has checked the inputs, frozen the model and puts the result on the
        # 8-bit grid; an attack is its step alone
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(self.classifier(x), targets), x)
        stepped = project(images - config.eps * grad.sign(), images, config.eps)
        return Iterates(stepped, torch.zeros_like(targets))
