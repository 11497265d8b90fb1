"""Experiments (``underfire run``, and ``underfire attack`` as a one-attack experiment): a TOML config
of models × interpreters × attacks × target maps, planned into units, computed by an executor
and committed by one driver into a folder holding a SQLite database and the image and map files."""

from .config import ExperimentConfig, load_experiment_config
from .demo import DEMO_IMAGES, demo_config
from .execute import RunOutcome, run_experiment
from .executor import Executor, SerialExecutor
from .job import attack_experiment, attack_report, run_attack
from .plan import Unit, prepare_models
from .summary import format_summary, summarise_run
from .worker import UnitOutput, UnitWorker

__all__ = [
    "DEMO_IMAGES",
    "Executor",
    "ExperimentConfig",
    "RunOutcome",
    "SerialExecutor",
    "Unit",
    "UnitOutput",
    "UnitWorker",
    "attack_experiment",
    "attack_report",
    "demo_config",
    "format_summary",
    "load_experiment_config",
    "prepare_models",
    "run_attack",
    "run_experiment",
    "summarise_run",
]
