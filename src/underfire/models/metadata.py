"""What underfire must know about a model that the model file does not say, and the check of it.

A user's TorchScript archive, exported program or factory carries weights, not its input size,
normalisation, channel count or class names. ``ModelOptions`` holds them, from three places, the
first that gives a field winning: the command line (``--input-size``, ``--mean``, ...) or a run
config's ``[models.NAME]`` table; a *model card*, ``NAME.toml`` beside the model file
(``cnn.pt`` + ``cnn.toml``); what the spec itself knows (a built-in checkpoint's JSON,
torchvision's ImageNet constants). ``probe_classifier`` then runs one forward pass before any
work, so a wrong size is one line naming the option to set instead of a shape error deep inside
an attack.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomllib
import torch

from ..errors import InputError, SpecError
from ..options import check_seed

__all__ = ["CARD_KEYS", "ModelOptions", "card_for", "parse_class_names", "parse_numbers", "probe_classifier"]

#: Keys of a model card and of a run config's ``[models.NAME]`` table (``classes`` is
#: ``ModelOptions.class_names``: a list, a comma-separated string or a file with one name per line).
CARD_KEYS: tuple[str, ...] = (
    "weights",
    "input_size",
    "channels",
    "mean",
    "std",
    "classes",
    "feature_layer",
    "head",
    "rts",
)

#: Input sides tried when a model rejects its probe, to suggest the one it accepts.
_SUGGESTED_SIZES = (224, 32, 28, 64, 96, 128, 256, 299, 384, 512)


@dataclass(frozen=True)
class ModelOptions:
    """A model's metadata where the spec does not carry it (``None`` = not given here).

    Attributes:
        weights: a local weights file for the spec.
        input_size: the square side the model takes; images are resized to it.
        channels: 3 (RGB) or 1 (grey) input channels.
        mean, std: per-channel normalisation applied inside the wrapper ([0, 1] pixels → model input).
        class_names: index = class id; folders of a data set are matched to them by name.
        feature_layer, head: module names for CAM and Grad-CAM.
        rts: an RTS checkpoint trained for this model (``underfire train rts``).
        device: where the model runs.
        seed: seeds what a spec initialises randomly (``torchvision:NAME@random``, a factory's
            fresh layers), so two runs of one command build the same model.
    """

    weights: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    class_names: Sequence[str] | None = None
    input_size: int | None = None
    channels: int | None = None
    feature_layer: str | None = None
    head: str | None = None
    rts: str | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        check_seed("seed", self.seed)
        if self.input_size is not None:
            if (
                isinstance(self.input_size, bool)
                or not isinstance(self.input_size, int)
                or not 1 <= self.input_size <= 8192
            ):
                raise InputError(f"input size must be a whole number of pixels in 1..8192, got {self.input_size!r}")
        if self.channels is not None and (isinstance(self.channels, bool) or self.channels not in (1, 3)):
            raise InputError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, parse_numbers(name, value))
        if self.std is not None and any(v <= 0 for v in self.std):
            raise InputError(f"std must be positive, got {list(self.std)}")
        if self.class_names is not None:
            set_(self, "class_names", parse_class_names(self.class_names))
        for name in ("weights", "feature_layer", "head", "rts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InputError(f"{name} must be a non-empty string, got {value!r}")

    def given(self) -> dict[str, Any]:
        """The fields set here (not ``None``), device and seed excluded (they are the command's)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("device", "seed") and getattr(self, f.name) is not None
        }

    def as_table(self) -> dict[str, Any]:
        """The given fields as a ``[models.NAME]`` table (``from_mapping`` reads it back)."""
        table = {("classes" if key == "class_names" else key): value for key, value in self.given().items()}
        return {key: list(value) if isinstance(value, tuple) else value for key, value in table.items()}

    def over(self, fallback: ModelOptions) -> ModelOptions:
        """These options, with ``fallback``'s where a field is not given here."""
        return replace(fallback, **self.given(), device=self.device, seed=self.seed)

    @classmethod
    def from_mapping(cls, where: str, table: Mapping[str, Any], base: Path | None = None) -> ModelOptions:
        """From a model card or a ``[models.NAME]`` table; relative paths (``weights``, ``rts``, a
        ``classes`` file) are taken relative to ``base`` when given. Errors name ``where``."""
        if not isinstance(table, Mapping):
            raise InputError(f"{where} must be a table of {', '.join(CARD_KEYS)}")
        unknown = sorted(set(table) - set(CARD_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(CARD_KEYS)})")
        values = dict(table)
        if "classes" in values:
            values["class_names"] = _classes_value(values.pop("classes"), base)
        for key in ("weights", "rts"):
            if isinstance(values.get(key), str) and base is not None and not Path(values[key]).is_absolute():
                values[key] = str(base / values[key])
        try:
            return cls(**values)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None


def parse_numbers(what: str, value: Any) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"``, a number or a list of numbers → a tuple of finite floats."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be numbers separated by commas (e.g. 0.5,0.5,0.5), got {value!r}") from None
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise InputError(f"{what} must be finite numbers, got {value!r}")
    return numbers


def parse_class_names(value: Any) -> tuple[str, ...]:
    """A list of names or a comma-separated string → unique, non-empty names."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise InputError(f"class names must be a list of names, got {value!r}")
    names = tuple(str(v).strip() for v in value)
    if not names or any(not n for n in names):
        raise InputError("class names must be non-empty")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputError(f"class name {duplicated[0]!r} is given twice")
    return names


def _classes_value(value: Any, base: Path | None) -> Any:
    """A ``classes`` value: a file (one name per line) where it names one, else the names."""
    if isinstance(value, str) and "," not in value:
        path = Path(value) if base is None or Path(value).is_absolute() else base / value
        if path.is_file() or path.suffix in (".txt", ".names"):
            from ..data.images import read_class_names

            return read_class_names(path)
    return value


def class_names_option(value: str) -> tuple[str, ...]:
    """The CLI's ``--classes``: a file with one name per line, or names separated by commas."""
    return parse_class_names(_classes_value(value, None))


def card_for(model_file: str | None) -> Path | None:
    """The model card of a model file: the same name with ``.toml`` (``cnn.pt`` → ``cnn.toml``)."""
    if model_file is None:
        return None
    card = Path(model_file).with_suffix(".toml")
    return card if card.is_file() else None


def read_card(path: Path) -> ModelOptions:
    """A model card (TOML, keys ``CARD_KEYS``) as ``ModelOptions``."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read model card '{path}': {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"model card '{path}' is not valid TOML: {error}") from None
    return ModelOptions.from_mapping(f"model card '{path}'", table, base=path.parent)


def probe_classifier(classifier: Any, hint: str) -> None:
    """One forward pass at the classifier's input size and channels, before any work.

    A model that rejects it, returns something else than (1, classes) logits, or has another
    number of outputs than class names, is a one-line ``SpecError`` naming the option to set
    (``hint`` says where options go: the CLI's flags, a config table or a card). The number of
    classes is known afterwards.
    """
    size, channels = classifier.input_size or 224, classifier.in_channels
    try:
        logits = _forward(classifier, channels, size)
    except RuntimeError as error:
        reason = _first_line(error)
        accepted = _accepted_input(classifier, (channels, size))
        advice = "set the input size and channels"
        if accepted is not None:
            advice = f"it accepts 1×{accepted[0]}×{accepted[1]}×{accepted[1]}: set --channels {accepted[0]} --input-size {accepted[1]}"
        raise SpecError(
            f"{classifier.name} rejects a 1×{channels}×{size}×{size} input ({reason}); {advice} ({hint})"
        ) from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SpecError(
            f"{classifier.name} returned {shape} for one image, not (1, classes) logits; wrap it in a module that returns the logits"
        )
    outputs = int(logits.shape[1])
    names = classifier.class_names
    if names is not None and len(names) != outputs:
        raise SpecError(
            f"{classifier.name} has {outputs} outputs but {len(names)} class names are given; give {outputs} (--classes, {hint})"
        )
    classifier._num_classes = outputs


def _forward(classifier: Any, channels: int, size: int) -> Any:
    probe = torch.full((1, channels, size, size), 0.5, device=classifier.device)
    with classifier.frozen(), torch.no_grad():
        return classifier.network(classifier.normalize(probe) if channels == classifier.in_channels else probe)


def _accepted_input(classifier: Any, tried: tuple[int, int]) -> tuple[int, int] | None:
    """The first (channels, size) of the usual ones the model accepts, for the error's advice."""
    for channels in (classifier.in_channels, 4 - classifier.in_channels):
        for size in _SUGGESTED_SIZES:
            if (channels, size) == tried:
                continue
            try:
                _forward(classifier, channels, size)
            except RuntimeError:
                continue
            return channels, size
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    # TorchScript errors open with a traceback of the graph; the last line says what went wrong
    text = (
        lines[-1]
        if lines and lines[0].startswith("The following operation failed")
        else (lines[0] if lines else type(error).__name__)
    )
    return text[:200]
