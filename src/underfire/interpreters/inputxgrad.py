"""Gradient × Input (Shrikumar et al. 2016, "Not just a black box"; Ancona et al., ICLR 2018,
"Towards better understanding of gradient-based attribution methods").

Attribution = x ⊙ ∂score_c/∂x with x the image in [0, 1] (pixel space, what captum's
``InputXGradient`` computes on a model that normalises inside, as underfire's ``Classifier``
does). On a ReLU network without biases it equals LRP-0 and DeepLIFT with a black baseline
(Ancona et al. 2018). The ADV² surrogate is GRAD's (a second derivative through the smoothed
ReLU derivative) times x, whose own derivative is exact.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .gradient import Grad


class InputXGrad(Grad):
    """Gradient × Input of the class score (the logit by default, ``score="ce"`` as GRAD's).

    Args:
        score, pool, relu, relu_scale, share_forward, softplus_beta: as for :class:`~.gradient.Grad`.
    """

    name: ClassVar[str] = "inputxgrad"
    description: ClassVar[str] = "gradient times input (Shrikumar et al. 2016; Ancona et al. 2018)"

    def _from_gradient(self, x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return x * gradient
