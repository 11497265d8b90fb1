"""The one contract every attack follows, so runs, the CLI and the report need no list of attacks.

An attack is a stateless object built for a classifier (and, when ``uses_interpreter``, for the
interpreter whose map it must keep): called with images, target classes and target maps it returns
an ``AttackResult``. It declares its name, its label in reports, a one-line description and its
configuration type; ``configure`` builds that configuration for an experiment from the preset
settings of the interpreters it serves. Adding an attack = one module with one subclass, plus one
entry-point line (``underfire.attacks``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import InputError
from ..interpreters.base import Interpreter
from ..models.classifier import Classifier
from ..options import coerce_options, dataclass_options
from .config import AttackConfig


@dataclass(frozen=True)
class AttackResult:
    """What an attack returns, per sample.

    ``adversarial`` lies on the 8-bit grid inside the ε-ball and [0, 1]; ``success`` and
    ``confidence`` (p(c_t)) are measured on it. ``last`` is the final iterate before selection
    (useful to compare trajectories); ``map_distance`` is ℓ_int of the chosen iterate (ADV²; of
    the powered maps when ``map_power`` ≠ 1, with the soft top-k IoU term when
    ``soft_iou_weight`` > 0); ``chosen_step`` is its step index counted over both
    stages (−1: none qualified, the warm start's result is returned).
    """

    adversarial: torch.Tensor
    targets: torch.Tensor
    success: torch.Tensor
    confidence: torch.Tensor
    last: torch.Tensor
    chosen_step: torch.Tensor
    map_distance: torch.Tensor | None = None


class Attack(ABC):
    """Base class of attacks (see the module docstring)."""

    #: Registry name (``--attack NAME``); must equal the entry point's name.
    name: ClassVar[str]
    #: How reports label it ("PGD", "ADV²").
    label: ClassVar[str] = ""
    #: One line for ``underfire attacks``.
    description: ClassVar[str] = ""
    #: The (frozen dataclass) type of its configuration; it must have an ``eps`` field.
    config_type: ClassVar[type] = AttackConfig
    #: Whether the result depends on an interpreter (ADV²) or not (PGD). An interpreter-free
    #: attack runs once per batch and its images are explained by every interpreter of a run; an
    #: interpreter-bound one runs per interpreter and target map.
    uses_interpreter: ClassVar[bool] = True

    def __init__(self, classifier: Classifier, config: Any = None, interpreter: Interpreter | None = None) -> None:
        if self.uses_interpreter:
            if interpreter is None:
                raise InputError(f"the {self.name} attack needs an interpreter")
            if interpreter.classifier is not classifier:
                raise InputError("the interpreter explains a different classifier than the one attacked")
        self.classifier = classifier
        self.interpreter = interpreter
        config = self.config_type() if config is None else config
        if not isinstance(config, self.config_type):
            raise InputError(f"the {self.name} attack takes a {self.config_type.__name__}, got {type(config).__name__}")
        self.config = config

    @abstractmethod
    def __call__(
        self, images: torch.Tensor, targets: Any, target_maps: torch.Tensor | None = None, *, labels: Any = None
    ) -> AttackResult:
        """Attack ``images`` toward ``targets`` (keeping the map near ``target_maps`` where the
        attack uses an interpreter); ``labels`` (optional) refuses targets equal to the true class."""

    @classmethod
    def configure(cls, base: Sequence[AttackConfig], settings: Mapping[str, Any]) -> Any:
        """This attack's configuration in an experiment.

        ``base`` holds the preset ``AttackConfig`` of each interpreter the attack serves (one for
        an interpreter-bound attack; every configured interpreter otherwise), with the run's ε,
        seed and overrides applied; ``settings`` is the run config's ``[attacks.NAME]`` table.
        The default: an ``AttackConfig`` type takes the first base config with ``settings``
        applied; any other type takes the fields it shares with it (ε, seed, ...) and ``settings``.
        """
        where = f"attacks.{cls.name}"
        if issubclass(cls.config_type, AttackConfig):
            return base[0].with_settings(where, settings)
        specs = dataclass_options(cls.config_type)
        shared = {f.name: getattr(base[0], f.name) for f in dataclasses.fields(base[0]) if f.name in specs}
        values = {**shared, **coerce_options(where, settings, specs)}
        try:
            return cls.config_type(**values)
        except TypeError as error:
            raise InputError(f"{where}: {error}") from None
