"""The one contract every attack follows, so runs, the CLI and the report need no list of attacks.

An attack is a stateless object built for a classifier (and, when ``uses_interpreter``, for the
interpreter whose map it must keep): called with images, target classes and target maps it returns
an ``AttackResult``. ``Attack.__call__`` owns everything around the algorithm, as torchattacks'
``Attack.__call__`` does: it checks the inputs, freezes the model (eval mode, no parameter
gradients, restored afterwards), runs the configured restarts and finishes each run (8-bit grid
inside the ε-ball, classified). A subclass implements ``run`` alone: one run of its algorithm,
returning the iterate it keeps per sample. It declares its name, its label in reports, a
one-line description and its configuration type; ``configure`` builds that configuration for an
experiment from the preset settings of the interpreters it serves. Adding an attack = one module
with one subclass, plus one entry-point line (``underfire.attacks``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from ..errors import InputError
from ..interpreters.base import Interpreter
from ..models.classifier import Classifier
from ..options import MAX_SEED, coerce_options, dataclass_options
from .config import AttackConfig
from .targets import check_targets


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


@dataclass(frozen=True)
class Iterates:
    """What one run of an attack keeps, per sample: ``chosen`` (any point; ``Attack.__call__``
    projects it onto the ε-ball's 8-bit grid), the step it was found at (``chosen_step``, −1:
    none), the final iterate (``last``; default: ``chosen``) and, for an attack on a map, the map
    distance of the chosen iterate (``map_distance``; NaN where none qualified)."""

    chosen: torch.Tensor
    chosen_step: torch.Tensor
    last: torch.Tensor | None = None
    map_distance: torch.Tensor | None = None


class Attack(ABC):
    """Base class of attacks (see the module docstring).

    Args:
        classifier: the model under attack.
        config: an instance of ``config_type`` (default: its defaults).
        interpreter: the interpreter whose map the attack keeps (attacks with ``uses_interpreter``).
    """

    #: Registry name (``--attack NAME``); must equal the entry point's name.
    name: ClassVar[str]
    #: How reports label it ("PGD", "ADV²").
    label: ClassVar[str] = ""
    #: One line for ``underfire attacks``.
    description: ClassVar[str] = ""
    #: The (frozen dataclass) type of its configuration; it must have an ``eps`` field, and
    #: ``restarts`` > 1 needs ``restarts``, ``random_start`` and ``seed`` fields too.
    config_type: ClassVar[type] = AttackConfig
    #: Whether the result depends on an interpreter (ADV²) or not (PGD). An interpreter-free
    #: attack runs once per batch and its images are explained by every interpreter of a run; an
    #: interpreter-bound one runs per interpreter and target map.
    uses_interpreter: ClassVar[bool] = True

    def __init__(self, classifier: Classifier, config: Any = None, *, interpreter: Interpreter | None = None) -> None:
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

    def __call__(
        self, images: torch.Tensor, targets: Any, target_maps: torch.Tensor | None = None, *, labels: Any = None
    ) -> AttackResult:
        """Attack ``images`` toward ``targets``, keeping the map near ``target_maps`` where the
        attack uses an interpreter (default: the interpreter's benign maps of ``images``);
        ``labels`` (optional) refuses targets equal to the true class."""
        clf = self.classifier
        images, targets = check_batch(clf, images, targets, labels)
        target_maps = self.check_target_maps(images, target_maps) if self.uses_interpreter else None
        self.prepare()

        def one_run(config: Any) -> AttackResult:
            return finish(clf, images, targets, self.run(images, targets, target_maps, config), config.eps)

        with clf.frozen():
            return best_of_restarts(self.config, one_run)

    def prepare(self) -> None:
        """Checks that need the built attack, once per call before any step (the base has none)."""

    @abstractmethod
    def run(
        self, images: torch.Tensor, targets: torch.Tensor, target_maps: torch.Tensor | None, config: Any
    ) -> Iterates:
        """One run of the algorithm under ``config`` (the attack's own, or a restart's copy of it),
        on checked inputs, inside ``classifier.frozen()``."""

    def check_target_maps(self, images: torch.Tensor, target_maps: torch.Tensor | None) -> torch.Tensor:
        """The target maps an interpreter-bound attack keeps: the interpreter's benign maps of
        ``images`` when none are given, else ``target_maps`` checked against its map shape."""
        interpreter = self.interpreter
        assert interpreter is not None
        if target_maps is None:
            return interpreter(images, seed=getattr(self.config, "seed", 0))
        if not isinstance(target_maps, torch.Tensor):
            raise InputError(f"target maps must be a tensor, got {type(target_maps).__name__}")
        expected = interpreter.map_shape(images)
        target_maps = target_maps.detach().to(images.device, torch.float32)
        if target_maps.dim() == 2:
            target_maps = target_maps[None, None]
        n = images.shape[0]
        if target_maps.dim() != 4 or tuple(target_maps.shape[1:]) != (1, *expected):
            raise InputError(
                f"target maps have shape {tuple(target_maps.shape)}, the {interpreter.name} "
                f"interpreter makes maps of shape ({n}, 1, {expected[0]}, {expected[1]})"
            )
        if target_maps.shape[0] not in (1, n):
            raise InputError(f"got {target_maps.shape[0]} target maps for {n} images")
        if not torch.isfinite(target_maps).all() or target_maps.min() < 0 or target_maps.max() > 1:
            raise InputError("target maps must be finite and in [0, 1]")
        return target_maps.expand(n, -1, -1, -1)

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


def check_batch(
    classifier: Classifier, images: Any, targets: Any, labels: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` as the classifier takes them and ``targets`` as one class per image, each
    checked with a one-line error; ``labels`` (optional) refuses a target equal to the true class."""
    images = classifier.prepare_images(images)
    targets = classifier.check_classes(targets, images.shape[0])
    if labels is not None:
        check_targets(classifier.check_classes(labels, images.shape[0]), targets)
    return images, targets


def project(x: torch.Tensor, origin: torch.Tensor, eps: float) -> torch.Tensor:
    """Closest point of the ε-ball around ``origin`` intersected with [0, 1]."""
    return torch.minimum(torch.maximum(x, origin - eps), origin + eps).clamp(0.0, 1.0)


def quantize(x: torch.Tensor, origin: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to the 8-bit grid, staying inside the ε-ball and [0, 1].

    Rounding to the nearest level can leave the ball by up to half a level when ``origin`` is not
    itself on the grid; such pixels move one level back toward ``origin`` (the ball is at least one
    level wide for ε ≥ 1/255, so a grid point always exists inside it).
    """
    # work in integer levels so the result is exactly k/255, the value a PNG reads back as
    levels = torch.round(x.clamp(0, 1) * 255.0)
    slack = 1e-6
    levels = torch.where(levels / 255.0 - origin > eps + slack, levels - 1, levels)
    levels = torch.where(origin - levels / 255.0 > eps + slack, levels + 1, levels)
    return levels.clamp(0, 255) / 255.0


def finish(
    classifier: Classifier, images: torch.Tensor, targets: torch.Tensor, iterates: Iterates, eps: float
) -> AttackResult:
    """The ``AttackResult`` of one run's chosen iterates: put on the 8-bit grid inside the ε-ball,
    then classified (success and p(c_t) are measured on what a PNG file holds)."""
    adversarial = quantize(iterates.chosen, images, eps)
    with torch.no_grad():
        probabilities = classifier(adversarial).softmax(1)
    return AttackResult(
        adversarial=adversarial,
        targets=targets,
        success=probabilities.argmax(1) == targets,
        confidence=probabilities.gather(1, targets[:, None]).squeeze(1),
        last=iterates.chosen if iterates.last is None else iterates.last,
        chosen_step=iterates.chosen_step,
        map_distance=iterates.map_distance,
    )


def best_of_restarts(config: Any, run: Callable[[Any], AttackResult]) -> AttackResult:
    """``run(config)``, then ``config.restarts − 1`` more runs from seeded random starts; per sample
    the best result: successful first, then the smallest map distance (an attack on a map; a
    result that never qualified has none), then the highest p(c_t)."""
    result = run(config)
    for restart in range(1, getattr(config, "restarts", 1)):
        seed = (config.seed + restart) % (MAX_SEED + 1)
        result = _better_of(result, run(replace(config, random_start=True, seed=seed)))
    return result


def _better_of(first: AttackResult, second: AttackResult) -> AttackResult:
    def distance(result: AttackResult) -> torch.Tensor:
        if result.map_distance is None:
            return torch.zeros_like(result.confidence)
        return torch.nan_to_num(result.map_distance, nan=float("inf"))

    same = first.success == second.success
    closer, level = distance(second) < distance(first), distance(second) == distance(first)
    take = (second.success & ~first.success) | (same & (closer | (level & (second.confidence > first.confidence))))

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(take.view(-1, *([1] * (a.dim() - 1))), b, a)

    return AttackResult(
        adversarial=pick(first.adversarial, second.adversarial),
        targets=first.targets,
        success=pick(first.success, second.success),
        confidence=pick(first.confidence, second.confidence),
        last=pick(first.last, second.last),
        chosen_step=pick(first.chosen_step, second.chosen_step),
        # both runs come from one attack: both have map distances (ADV²) or neither (PGD)
        map_distance=None
        if first.map_distance is None or second.map_distance is None
        else pick(first.map_distance, second.map_distance),
    )
