"""Training what underfire needs: the built-in classifiers and RTS saliency networks."""

from .classifier import TrainConfig, TrainResult, train_classifier
from .rts import RtsTrainConfig, RtsTrainResult, train_rts

__all__ = ["RtsTrainConfig", "RtsTrainResult", "TrainConfig", "TrainResult", "train_classifier", "train_rts"]
