"""What underfire knows and inferred about a loaded model (``underfire models --describe SPEC``).

A user's first question about their own model is "what will underfire do with it?": the input it
was probed with, where its metadata came from, which layers CAM and Grad-CAM read, and which
interpreters can be explained and attacked on it (each interpreter is built, and asked whether its
surrogate reaches the model, exactly as an attack would ask).
"""

from __future__ import annotations

from typing import Any

from .errors import UnderfireError
from .interpreters import INTERPRETERS, build_interpreter
from .models.classifier import Classifier
from .smoothing import PIECEWISE_ACTIVATIONS, SMOOTH_ACTIVATIONS

__all__ = ["describe_model"]


def describe_model(classifier: Classifier) -> dict[str, Any]:
    """A JSON-able description: metadata, inferred facts and each interpreter's support."""
    size = classifier.input_size or 224
    names = classifier.class_names
    network = classifier.network
    parameters = sum(p.numel() for p in network.parameters()) if hasattr(network, "parameters") else None
    facts: dict[str, Any] = {
        "model": classifier.name,
        "format": classifier.metadata.get("format", "module"),
        "card": classifier.metadata.get("card"),
        "input": f"{classifier.in_channels}×{size}×{size} in [0, 1]"
        + ("" if classifier.input_size else " (size not given: 224 assumed)"),
        "mean": [round(float(v), 6) for v in classifier.mean.flatten()],
        "std": [round(float(v), 6) for v in classifier.std.flatten()],
        "classes": classifier.num_classes,
        "class_names": list(names) if names else "not given (class ids only; give --classes to match folders by name)",
        "parameters": parameters,
        "rts": classifier.metadata.get("rts"),
    }
    support: dict[str, str] = {}
    for name in INTERPRETERS:
        try:
            interpreter = build_interpreter(name, classifier)
        except UnderfireError as error:
            support[name] = f"unavailable: {error}"
            continue
        layers = getattr(interpreter, "layers", None)
        where = f" (feature map {layers.feature_name}, head {layers.head_name or 'any'})" if layers is not None else ""
        try:
            interpreter.check_attackable()
        except UnderfireError as error:
            support[name] = f"explain only{where}; ADV² refused: {error}"
            continue
        support[name] = f"explain and attack{where}"
    facts["interpreters"] = support
    facts["activations"] = activation_handling(network)
    return facts


#: Activation modules by class name → what the attack's surrogate does with them.
_ACTIVATION_MODULES = {
    "ReLU": "relu",
    "ReLU6": "relu6",
    "Hardtanh": "hardtanh",
    "LeakyReLU": "leaky_relu",
    "PReLU": "prelu",
    "Hardswish": "hardswish",
    "Hardsigmoid": "hardsigmoid",
    "SiLU": "silu",
    "GELU": "gelu",
    "Softplus": "softplus",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "ELU": "elu",
    "SELU": "selu",
    "Mish": "mish",
}


def activation_handling(network: Any) -> dict[str, str]:
    """The activation modules of ``network`` and what an attack's second derivative through each
    gets: the ReLU-gradient surrogate for the piecewise-linear family, the exact derivative for
    smooth ones. Functional calls (``F.relu`` in torchvision's DenseNet) are reached the same way
    but are not modules, so they are not listed."""
    found: dict[str, str] = {}
    modules = network.modules() if hasattr(network, "modules") else ()
    for module in modules:
        kind = _ACTIVATION_MODULES.get(type(module).__name__)
        if kind is None or kind in found:
            continue
        if kind in PIECEWISE_ACTIVATIONS:
            found[kind] = "surrogate (second derivative zero almost everywhere; the attack smooths it)"
        elif kind in SMOOTH_ACTIVATIONS:
            found[kind] = "smooth: exact derivatives"
    return found
