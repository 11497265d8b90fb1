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
    return facts
