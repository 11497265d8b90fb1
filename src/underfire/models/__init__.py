"""Classifiers: the wrapper, the built-in architectures, model specs, checkpoints and training."""

from .architectures import ShapesDenseNet, ShapesResNet, build_architecture
from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .classifier import IMAGENET_MEAN, IMAGENET_STD, CamLayers, Classifier, find_cam_layers
from .specs import BUILTIN_MODELS, ModelOptions, ModelSpec, load_model, parse_model_spec
from .training import TrainConfig, TrainResult, train_classifier

__all__ = [
    "BUILTIN_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CamLayers",
    "Classifier",
    "ModelOptions",
    "ModelSpec",
    "ShapesDenseNet",
    "ShapesResNet",
    "TrainConfig",
    "TrainResult",
    "build_architecture",
    "find_cam_layers",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "parse_model_spec",
    "save_checkpoint",
    "train_classifier",
]
