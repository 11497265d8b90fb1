"""Interpreters: one module per method behind one contract (``base.Interpreter``).

``INTERPRETERS`` is the registry (entry-point group ``underfire.interpreters``: the built-ins and
any installed plugin); ``build_interpreter`` makes one for a classifier, with validated options.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..models.classifier import Classifier
from ..registry import Registry
from .attribution import Attribution
from .base import PAPER_CLASSES, AttackTerms, Interpreter, normalize_maps
from .cam import CAM, GradCAM
from .cam_layers import CamLayers, find_cam_layers
from .deeplift import DeepLift
from .ensemble import Ensemble
from .gradient import Grad, SmoothGrad
from .inputxgrad import InputXGrad
from .integrated import IntegratedGradients
from .lrp import Lrp
from .mask import Mask, MaskConfig
from .rollout import AttentionRollout, TransformerAttribution
from .rts import Rts, SaliencyNetwork


def _paper_order(cls: type[Interpreter]) -> tuple[int, str]:
    rank = PAPER_CLASSES.index(cls.paper_class) if cls.paper_class in PAPER_CLASSES else len(PAPER_CLASSES)
    return rank, cls.name


#: The paper's order: back-propagation, representation, model-guided, perturbation, then others.
INTERPRETERS: Registry[Interpreter] = Registry("underfire.interpreters", Interpreter, "interpreter", order=_paper_order)


def build_interpreter(name: str, classifier: Classifier, **options: Any) -> Interpreter:
    """Instantiate the interpreter registered as ``name`` for ``classifier``: the interpreter whose
    maps are judged (``underfire explain``, a run's benign maps and measures) with these options.

    ``options`` (the interpreter's keyword arguments; text such as ``"0.1"`` is converted to the
    declared type) are checked against what it declares: an unknown key or a wrong type is a
    one-line ``InputError``. Constructor arguments that are objects rather than settings (RTS's
    ``network``, MASK's ``config``) pass through unchanged. Presets never change it: they set the
    attack's settings and the options of the copy the attack differentiates
    (``underfire.presets``).
    """
    cls = INTERPRETERS.get(name)
    objects = [p for p in list(inspect.signature(cls.__init__).parameters)[2:] if p not in cls.option_specs()]
    passed = {key: options.pop(key) for key in list(options) if key in objects}
    return cls(classifier, **passed, **cls.check_options(options, f"{name} options"))


def describe_interpreter(name: str) -> str:
    """One line: the paper's class and what the method is (``underfire interpreters``)."""
    cls = INTERPRETERS.get(name)
    return f"{cls.paper_class}: {cls.description}" if cls.description else cls.paper_class


__all__ = [
    "CAM",
    "AttentionRollout",
    "INTERPRETERS",
    "PAPER_CLASSES",
    "AttackTerms",
    "Attribution",
    "CamLayers",
    "DeepLift",
    "Ensemble",
    "Grad",
    "GradCAM",
    "InputXGrad",
    "IntegratedGradients",
    "Interpreter",
    "Lrp",
    "Mask",
    "MaskConfig",
    "Rts",
    "SaliencyNetwork",
    "SmoothGrad",
    "TransformerAttribution",
    "build_interpreter",
    "describe_interpreter",
    "find_cam_layers",
    "normalize_maps",
]
