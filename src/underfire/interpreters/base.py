"""The one contract every interpreter follows.

An interpreter explains a ``Classifier``: images (N, C, H, W) in [0, 1] and classes (N,) → maps
(N, 1, h, w) in [0, 1], "high = important". Calling it validates the inputs, runs the model frozen
(eval mode, no parameter gradients, every flag restored afterwards), leaves no hook behind and
returns detached maps. ``surrogate`` is the same map as a differentiable function of the images:
what the ADV² attack optimises. ``surrogate_and_logits`` adds the classifier's logits
of the same images, which the attack's prediction loss needs: interpreters that run the classifier
on the clean images anyway (GRAD, CAM, Grad-CAM) override it to hand back the logits of their own
forward pass instead of paying for a second one. ``attack_terms`` is the one place an
interpreter adds terms of its own to the ADV² objective (RTS's encoder, MASK's deletion evidence).

Adding an interpreter = one module with one subclass that declares its ``name``, ``description``,
``paper_class`` (and, a plugin, optionally ``presets``; the built-ins' are in ``underfire.presets``)
next to its code, plus one entry-point line (``underfire.interpreters``). Its keyword-only
constructor parameters are its options: what a run config's ``[interpreters.NAME]`` table and the
CLI's ``--option KEY=VALUE`` set. Every interpreter remembers the arguments it was built with, so
``with_options`` can build the copy an attack differentiates (``AttackConfig.surrogate_options``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..errors import ModelStructureError
from ..models.classifier import Classifier
from ..options import OptionSpec, coerce_options, constructor_options

#: The paper's four interpreter classes (Zhang et al. 2020, §2), plus one for anything else.
PAPER_CLASSES: tuple[str, ...] = ("back-propagation", "representation", "model-guided", "perturbation", "other")

#: When the attack asks for extra terms: stage 1 (the PGD warm start) or stage 2 (the joint objective).
AttackStage = Literal["warm_start", "joint"]

#: Added to the max−min range so a constant map normalises to zeros instead of NaN.
NORMALISE_EPS = 1e-12
#: A benign map whose max − min is at most this is constant (``Interpreter.check_informative``).
CONSTANT_MAP_SPREAD = 1e-9


def keep_rows(value: Any, kept: torch.Tensor) -> Any:
    """``value`` with the rows ``kept`` of every per-sample tensor in it (``Interpreter.keep_samples``)."""
    if isinstance(value, torch.Tensor):
        return value[kept] if value.dim() > 0 and value.shape[0] == kept.shape[0] else value
    if isinstance(value, (tuple, list)):
        return type(value)(keep_rows(item, kept) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: keep_rows(getattr(value, f.name), kept) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    return value


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of a (N, 1, h, w) batch to [0, 1], differentiably."""
    flat = maps.flatten(1)
    low = flat.min(1, keepdim=True).values
    high = flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low + NORMALISE_EPS)).view_as(maps)


@dataclass(frozen=True)
class AttackTerms:
    """Per-sample (N,) loss terms an interpreter adds to the ADV² objective.

    ``interpretation`` is added to ℓ_int (so it is scaled by λ, and the selection's map distance
    does not include it); ``extra`` is added to the objective as it is. ``None``: no such term.
    """

    interpretation: torch.Tensor | None = None
    extra: torch.Tensor | None = None


class Interpreter(ABC):
    """Base class: subclasses implement ``surrogate`` (and may override ``explain``)."""

    #: Registry name (``--interpreter NAME``); must equal the entry point's name.
    name: ClassVar[str]
    #: One line for ``underfire interpreters``: what the method is and its source.
    description: ClassVar[str] = ""
    #: Which of the paper's classes the method belongs to (``PAPER_CLASSES``).
    paper_class: ClassVar[str] = "other"
    #: A plugin's own presets (preset name → ``underfire.presets.Preset``), which win over the
    #: table in ``underfire.presets``; missing names or keys: ``underfire.presets.DEFAULT``.
    presets: ClassVar[Mapping[str, Any]] = {}
    #: Whether a target map drawn at the map's size (a shape, a user ``.npy``) means anything for
    #: this interpreter; a composite whose map is several maps side by side says no.
    accepts_drawn_targets: ClassVar[bool] = True
    #: Whether a constant benign map can only mean that the class score does not reach what the
    #: interpreter reads (``check_informative`` then refuses it). An interpreter whose map may be
    #: empty on purpose (RTS for a class not in the image, MASK when nothing needs deleting)
    #: says no.
    refuses_constant_maps: ClassVar[bool] = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Interpreter:
        # remember the construction so ``with_options`` can build a copy with other options
        instance = super().__new__(cls)
        instance._arguments = (args, kwargs)
        return instance

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    @classmethod
    def option_specs(cls) -> dict[str, OptionSpec]:
        """The options this interpreter accepts: its constructor's keyword-only parameters."""
        return constructor_options(cls)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        """``options`` checked against ``option_specs`` and converted to the declared types
        (text such as ``"0.1"`` from a config file or the command line); errors name ``where``."""
        return coerce_options(where, options, cls.option_specs())

    @classmethod
    def preset_surrogate(cls, table: Mapping[str, Any], chosen: Mapping[str, Any]) -> Mapping[str, Any]:
        """The surrogate options a preset's ``table`` contributes when the user chose the judged
        options ``chosen`` (typed): all of them by default; an interpreter drops those a user's
        choice makes moot, so that a preset never turns a valid choice into a conflict."""
        return table

    def with_options(self, **changes: Any) -> Interpreter:
        """A new interpreter of the same kind, built with the same arguments and ``changes`` to
        its options (checked and converted as ``build_interpreter`` does)."""
        if not changes:
            return self
        args, kwargs = self._arguments
        changes = self.check_options(changes, f"{self.name} surrogate options")
        return type(self)(*args, **{**kwargs, **changes})

    def source_files(self) -> tuple[str, ...]:
        """Files this interpreter read when it was built (a trained network of its own): a run
        fingerprints them, so a resume after their contents changed is refused. The base reads none."""
        return ()

    def check_attackable(self) -> None:
        """Raise ``ModelStructureError`` (one line saying what to do) when this interpreter's
        surrogate cannot give an attack a gradient on this classifier; the base always can.
        ADV² calls it before its first step, ``underfire models --describe`` to report it."""

    def attack_terms(
        self,
        stage: AttackStage,
        images: torch.Tensor,
        classes: torch.Tensor,
        target_maps: torch.Tensor,
        state: Any = None,
    ) -> AttackTerms | None:
        """Extra terms of this interpreter for the ADV² objective at ``stage``; the base has none.

        ``images`` is the attack's iterate (differentiable), ``classes`` the target classes,
        ``target_maps`` the maps the attacker wants. In the ``joint`` stage ``state`` is what this
        step's ``surrogate_and_logits`` returned (so a term can reuse its by-products); in the
        ``warm_start`` stage it is ``None``. Called inside ``classifier.frozen()``.
        """
        return None

    def __call__(self, images: torch.Tensor, classes: Any = None, *, seed: int | None = None) -> torch.Tensor:
        """Maps (N, 1, h, w) in [0, 1] for ``classes`` (default: the predicted classes)."""

        def benign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            generator = None if seed is None else torch.Generator(x.device).manual_seed(seed)
            maps = self.explain(x, c, generator=generator)
            if self.refuses_constant_maps:
                self.check_informative(maps, c)
            return maps

        return self.run_frozen(images, classes, benign)

    def check_informative(self, maps: torch.Tensor, classes: torch.Tensor) -> None:
        """Refuse a map that is the same value everywhere: it says nothing, and shown as a map (or
        compared by an attack) it would pass for a real one. It happens when nothing the
        interpreter reads depends on the class asked: a zero-initialised head, a layer whose
        output does not reach the class score (a vision transformer's patch tokens after its last
        block). ``ModelStructureError``, one line, naming the first such image."""
        flat = maps.detach().flatten(1)
        flat = flat.masked_fill(~torch.isfinite(flat), 0.0)
        constant = (flat.max(1).values - flat.min(1).values) <= CONSTANT_MAP_SPREAD
        if bool(constant.any()):
            index = int(constant.nonzero()[0])
            raise ModelStructureError(
                f"{self.name}: the map of class {int(classes[index])} is constant on image {index} of the batch "
                f"({flat[index, 0].item():.3g} everywhere) on {self.classifier.name}: nothing this interpreter reads "
                "depends on that class score (a head that outputs constants, or a layer the score does not reach: "
                "choose another layer where the interpreter takes one)"
            )

    def run_frozen(
        self,
        images: torch.Tensor,
        classes: Any,
        compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Validate, default the classes to the predictions, run ``compute`` frozen, detach."""
        clf = self.classifier
        images = clf.prepare_images(images)
        with clf.frozen():
            if classes is None:
                with torch.no_grad():
                    classes = clf(images).argmax(1)
            classes = clf.check_classes(classes, images.shape[0])
            maps = compute(images, classes)
        return maps.detach()

    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The benign map; by default the surrogate evaluated without keeping a graph."""
        with torch.enable_grad():
            maps, _ = self.surrogate(images, classes)
        return maps

    def initial_state(self, seed: int, device: torch.device) -> Any:
        """The ``state`` an attack passes to the first ``surrogate`` call (stateless: ``None``)."""
        return None

    def pilot_options(self, scale: float) -> dict[str, Any]:
        """Options of a copy whose own iterative work (a solve that is not an attack step) is cut
        to about ``scale`` of this one's, for the timed pilots of ``--estimate``; none by default.
        The cost of the copy's work must be proportional to ``scale``, as the attack's steps are."""
        return {}

    def keep_samples(self, state: Any, kept: torch.Tensor) -> Any:
        """``state`` for the samples ``kept`` (a boolean (N,) mask over the batch it was made for),
        when the attack stops the others early. The default keeps the rows of every tensor whose
        first dimension is the batch, inside dataclasses, tuples and lists; everything else (a
        generator, counters) is shared by the batch and stays as it is."""
        return keep_rows(state, kept)

    def map_shape(self, images: torch.Tensor) -> tuple[int, int]:
        """(h, w) of the maps this interpreter makes for ``images``' size.

        The default explains one image; interpreters whose map size follows from their settings
        override it with arithmetic.
        """
        return tuple(self(images[:1]).shape[-2:])  # type: ignore[return-value]

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``surrogate``'s maps and state, plus the classifier's logits of ``images``.

        Returns ``(maps, logits, state)``; the logits equal ``classifier(images)`` (the same values)
        and are differentiable with respect to ``images`` like the maps. The default calls
        ``surrogate`` and then the classifier: one extra forward pass. Interpreters whose surrogate
        already runs the classifier on exactly these images override it and return that forward's
        logits; one whose forward passes see other inputs (SmoothGrad's noisy copies, MASK's
        perturbed images) or another network (RTS) keeps this default. Called inside
        ``classifier.frozen()``, like ``surrogate``.
        """
        maps, state = self.surrogate(images, classes, state)
        return maps, self.classifier(images), state

    @abstractmethod
    def surrogate(self, images: torch.Tensor, classes: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Differentiable maps (N, 1, h, w) in [0, 1] of ``images`` for ``classes``, and a state.

        Called inside ``classifier.frozen()``. The maps must carry gradient back to ``images``
        (the ADV² interpretation loss depends on it). Stateless interpreters return ``None`` as
        state; iterative ones (MASK) take the state of the previous call and return the next.
        """
