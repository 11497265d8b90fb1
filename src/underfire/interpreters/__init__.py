"""Interpreters: one module per method behind one contract (``base.Interpreter``).

``INTERPRETERS`` maps the CLI names to classes; ``build_interpreter`` makes one for a classifier.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..models.classifier import Classifier
from .base import Interpreter, normalize_maps
from .cam import CAM, GradCAM
from .gradient import Grad, SmoothGrad
from .mask import Mask, MaskConfig
from .rts import Rts, SaliencyNetwork

INTERPRETERS: dict[str, type[Interpreter]] = {
    cls.name: cls for cls in (Grad, SmoothGrad, CAM, GradCAM, Rts, Mask)
}

#: One line per interpreter for ``underfire interpreters``: the paper's class and the source.
DESCRIPTIONS: dict[str, str] = {
    "grad": "back-propagation: vanilla gradient saliency (Simonyan et al. 2014)",
    "smoothgrad": "back-propagation: gradient averaged over noisy copies (Smilkov et al. 2017)",
    "cam": "representation: class activation mapping (Zhou et al. 2016)",
    "gradcam": "representation: gradient-weighted CAM (Selvaraju et al. 2017)",
    "rts": "model-guided: real-time saliency network (Dabkowski & Gal 2017)",
    "mask": "perturbation: meaningful perturbation mask (Fong & Vedaldi 2017)",
}


def build_interpreter(name: str, classifier: Classifier, **options: Any) -> Interpreter:
    """Instantiate the interpreter registered as ``name`` for ``classifier``."""
    try:
        cls = INTERPRETERS[name]
    except KeyError:
        raise InputError(f"unknown interpreter {name!r}; choose one of {', '.join(INTERPRETERS)}") from None
    return cls(classifier, **options)


__all__ = [
    "CAM",
    "DESCRIPTIONS",
    "INTERPRETERS",
    "Grad",
    "GradCAM",
    "Interpreter",
    "Mask",
    "MaskConfig",
    "Rts",
    "SaliencyNetwork",
    "SmoothGrad",
    "build_interpreter",
    "normalize_maps",
]
