"""Experiments (``underfire run``): a TOML config of models × interpreters × attacks × target maps,
run resumably into a folder holding a SQLite database and the image and map files."""

from .config import ExperimentConfig, load_experiment_config
from .demo import DEMO_IMAGES, demo_config
from .execute import RunOutcome, prepare_models, run_experiment
from .summary import format_summary, summarise_run

__all__ = [
    "DEMO_IMAGES",
    "ExperimentConfig",
    "RunOutcome",
    "demo_config",
    "format_summary",
    "load_experiment_config",
    "prepare_models",
    "run_experiment",
    "summarise_run",
]
