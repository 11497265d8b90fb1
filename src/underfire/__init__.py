"""underfire: ADV² attacks on interpretable deep learning systems (Zhang et al., USENIX Security 2020).

Work in [0, 1] NCHW pixel space; a ``Classifier`` owns normalisation and the model's state.
"""

from .data import (
    SHAPE_CLASSES,
    ImageFolderDataset,
    ShapesDataset,
    export_dataset,
    load_images,
    open_dataset,
    read_image,
)
from .errors import (
    AttackError,
    CheckpointError,
    ImageReadError,
    InputError,
    ModelStructureError,
    SpecError,
    UnderfireError,
)
from .evaluation import EvaluationResult, evaluate
from .models import (
    BUILTIN_MODELS,
    Classifier,
    ModelOptions,
    load_model,
    parse_model_spec,
)
from .report import summary_rows, write_report
from .runs import ExperimentConfig, RunOutcome, demo_config, load_experiment_config, run_experiment
from .store import ResultStore
from .training import TrainConfig, train_classifier
from .versions import __version__

__all__ = [
    "AttackError",
    "BUILTIN_MODELS",
    "SHAPE_CLASSES",
    "CheckpointError",
    "Classifier",
    "EvaluationResult",
    "ExperimentConfig",
    "ImageFolderDataset",
    "ImageReadError",
    "InputError",
    "ModelOptions",
    "ModelStructureError",
    "ResultStore",
    "RunOutcome",
    "ShapesDataset",
    "SpecError",
    "TrainConfig",
    "UnderfireError",
    "__version__",
    "demo_config",
    "evaluate",
    "export_dataset",
    "load_experiment_config",
    "load_images",
    "load_model",
    "open_dataset",
    "parse_model_spec",
    "read_image",
    "run_experiment",
    "summary_rows",
    "train_classifier",
    "write_report",
]
