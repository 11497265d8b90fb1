"""Classifiers: the wrapper, the built-in architectures, model specs and checkpoints (training: ``underfire.training``)."""

from .architectures import ShapesDenseNet, ShapesResNet, build_architecture
from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from .specs import BUILTIN_MODELS, ModelOptions, ModelSpec, load_model, parse_model_spec

__all__ = [
    "BUILTIN_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Classifier",
    "ModelOptions",
    "ModelSpec",
    "ShapesDenseNet",
    "ShapesResNet",
    "build_architecture",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "parse_model_spec",
    "save_checkpoint",
]
