"""Model specification strings: one string names a model everywhere (CLI, configs, Python).

Accepted forms (nothing is ever downloaded):

* ``shapes-resnet``, ``shapes-densenet`` — the built-in models shipped with the package;
* ``PATH.safetensors`` or ``checkpoint:PATH`` — a checkpoint written by ``underfire train``;
* ``torchvision:NAME@WEIGHTS`` — a torchvision architecture with a local weights file
  (``@random`` for random weights, useful for benchmarks);
* ``torchscript:PATH`` — a TorchScript archive;
* ``export:PATH.pt2`` — a ``torch.export`` program (``torch.export.save``), unflattened so its
  module names (CAM's layers) and its ReLU calls (GRAD's surrogate) are reachable;
* ``module:function`` or ``path/to/file.py:function`` — a user factory returning an ``nn.Module``,
  optionally ``...@WEIGHTS``.

A weights file can also be passed separately (``weights=``, the CLI's ``--weights``). What a spec
does not say (input size, channels, normalisation, class names, CAM's layers, an RTS checkpoint)
comes from ``ModelOptions`` or a model card beside the file (``models.metadata``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import CheckpointError, SpecError
from .architectures import build_architecture
from .checkpoint import load_checkpoint, load_weights, metadata_path
from .classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from .metadata import ModelOptions, card_for, probe_classifier, read_card

__all__ = ["BUILTIN_MODELS", "ModelOptions", "ModelSpec", "load_model", "parse_model_spec"]
from .torchvision_compat import import_torchvision

BUILTIN_MODELS: dict[str, str] = {
    "shapes-resnet": "shapes-resnet.safetensors",
    "shapes-densenet": "shapes-densenet.safetensors",
}

SPEC_FORMS = (
    "a built-in name (" + ", ".join(BUILTIN_MODELS) + "), PATH.safetensors, "
    "torchvision:NAME@WEIGHTS, torchscript:PATH, export:PATH.pt2, or module:function"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model specification."""

    kind: str  # builtin | checkpoint | torchvision | torchscript | export | factory
    target: str
    weights: str | None = None

    def __str__(self) -> str:
        prefix = "" if self.kind in ("builtin", "checkpoint", "factory") else f"{self.kind}:"
        suffix = f"@{self.weights}" if self.weights else ""
        return f"{prefix}{self.target}{suffix}"


def builtin_weights_path(name: str) -> Path:
    """Location of a built-in model's weights inside the installed package."""
    return Path(str(resources.files("underfire.models") / "weights" / BUILTIN_MODELS[name]))


def parse_model_spec(spec: str, weights: str | None = None) -> ModelSpec:
    """Parse a spec string into a ``ModelSpec``; raise ``SpecError`` naming the accepted forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty model spec; use {SPEC_FORMS}")
    spec = spec.strip()
    if spec in BUILTIN_MODELS:
        return ModelSpec("builtin", spec, weights)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("torchvision", "torchscript", "export", "checkpoint"):
        target, inline = _split_weights(rest) if kind == "torchvision" else (rest, None)
        if not target:
            raise SpecError(f"model spec {spec!r} names no {'architecture' if kind == 'torchvision' else 'file'}")
        return ModelSpec(kind, target, weights or inline)
    if spec.endswith(".safetensors"):
        return ModelSpec("checkpoint", spec, weights)
    if sep:
        target, inline = _split_weights(spec)
        module, _, function = target.rpartition(":")
        if module and function.isidentifier():
            return ModelSpec("factory", target, weights or inline)
    raise SpecError(f"cannot parse model spec {spec!r}; use {SPEC_FORMS}")


def load_model(
    spec: str | ModelSpec, options: ModelOptions | None = None, *, hint: str = "model options", **overrides: Any
) -> Classifier:
    """Build a ``Classifier`` from a spec and check it with one probe forward.

    ``options`` (or ``overrides``, its fields) win over the model card beside the model file,
    which wins over what the spec knows. ``hint`` names where the caller's options are set, for
    the probe's error messages (the CLI's flags, a run config's table).
    """
    options = options or ModelOptions()
    if overrides:
        options = ModelOptions(**{**options.__dict__, **overrides})
    parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec, options.weights)
    card_file = card_for(_model_file(parsed))
    if card_file is not None:
        options = options.over(read_card(card_file))
        if parsed.weights is None and options.weights is not None:
            parsed = ModelSpec(parsed.kind, parsed.target, options.weights)
    _check_weights_apply(parsed)
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random state untouched
        torch.manual_seed(options.seed)
        model, defaults, metadata = _build(parsed)
    metadata = {**metadata, "format": parsed.kind, "files": _files_read(parsed, card_file)}
    if card_file is not None:
        metadata["card"] = str(card_file)
    if options.rts is not None:
        metadata["rts"] = options.rts

    def pick(field: str) -> Any:
        value = getattr(options, field)
        return value if value is not None else defaults.get(field)

    classifier = Classifier(
        model,
        pick("mean"),
        pick("std"),
        class_names=pick("class_names"),
        input_size=pick("input_size"),
        in_channels=options.channels or 3,
        feature_layer=options.feature_layer,
        head=options.head,
        name=str(parsed),
        metadata=metadata,
    )
    # load_model built this module itself, so inference mode is the right state to hand back
    classifier = classifier.eval().to(resolve_device(options.device))
    probe_classifier(classifier, hint)
    return classifier


def _build(parsed: ModelSpec) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The module of a spec, the metadata defaults it knows, and what it records about itself."""
    if parsed.kind in ("builtin", "checkpoint"):
        path = builtin_weights_path(parsed.target) if parsed.kind == "builtin" else Path(parsed.target)
        state, meta = load_checkpoint(path)
        model = build_architecture(meta["architecture"], len(meta["class_names"]))
        _load_state(model, state, path)
        defaults = {
            "mean": meta.get("mean"),
            "std": meta.get("std"),
            "class_names": meta["class_names"],
            "input_size": meta.get("input_size"),
        }
        metadata = meta
    elif parsed.kind == "torchvision":
        model = _torchvision_model(parsed)
        defaults = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": 224}
        metadata = {"weights": parsed.weights}
    elif parsed.kind == "torchscript":
        model = _torchscript_model(parsed.target)
        defaults, metadata = {}, {}
    elif parsed.kind == "export":
        model = _exported_model(parsed.target)
        defaults, metadata = {}, {}
    else:
        model = _factory_model(parsed.target)
        if parsed.weights:
            _load_state(model, load_weights(parsed.weights), Path(parsed.weights))
        defaults, metadata = {}, {"weights": parsed.weights}
    return model, defaults, metadata


def _files_read(spec: ModelSpec, card: Path | None) -> list[str]:
    """The files a spec's model was built from (a run fingerprints them, ``runs.fingerprint``)."""
    files: list[str | Path] = []
    if spec.kind in ("builtin", "checkpoint"):
        path = builtin_weights_path(spec.target) if spec.kind == "builtin" else Path(spec.target)
        files += [path, metadata_path(path)]
    elif spec.kind in ("torchscript", "export"):
        files.append(spec.target)
    elif spec.kind == "factory" and spec.target.rpartition(":")[0].endswith(".py"):
        files.append(spec.target.rpartition(":")[0])
    if spec.weights and spec.weights != "random":
        files.append(spec.weights)
    if card is not None:
        files.append(card)
    return [str(path) for path in files]


def _check_weights_apply(spec: ModelSpec) -> None:
    """A weights file only applies to torchvision and factory specs: anywhere else it would be
    ignored, and a run would silently attack other weights than the user named."""
    if spec.weights is None or spec.kind in ("torchvision", "factory"):
        return
    if spec.kind == "builtin":
        raise SpecError(
            f"a weights file (--weights) does not apply to the built-in model {spec.target!r} (its weights ship with it); "
            "to attack other weights of its architecture, give their checkpoint PATH.safetensors as the model"
        )
    raise SpecError(
        f"a weights file (--weights) does not apply to {spec.kind} model {spec.target!r}: the file holds its weights"
    )


def _model_file(spec: ModelSpec) -> str | None:
    """The file a model card sits beside: the graph file, else the weights file, else a factory's
    source file."""
    if spec.kind in ("torchscript", "export"):
        return spec.target
    if spec.weights and spec.weights != "random":
        return spec.weights
    if spec.kind == "factory":
        module = spec.target.rpartition(":")[0]
        return module if module.endswith(".py") else None
    return None


def _split_weights(text: str) -> tuple[str, str | None]:
    target, sep, weights = text.rpartition("@")
    return (target, weights or None) if sep else (text, None)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"weights {str(path)!r} do not fit the architecture: {detail}") from None


def _torchvision_model(spec: ModelSpec) -> nn.Module:
    if spec.weights is None:
        raise SpecError(
            f"torchvision:{spec.target} needs a local weights file (torchvision:{spec.target}@PATH, "
            "or @random); underfire never downloads weights"
        )
    torchvision = import_torchvision()
    try:
        builder = torchvision.models.get_model_builder(spec.target)
    except ValueError:
        raise SpecError(f"torchvision has no model named {spec.target!r}") from None
    if spec.weights == "random":
        return builder(weights=None)
    state = load_weights(spec.weights)
    model = builder(weights=None)
    heads = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    key = f"{heads[-1]}.weight" if heads else None
    if key in state and state[key].shape[0] != model.get_submodule(heads[-1]).out_features:
        model = builder(weights=None, num_classes=int(state[key].shape[0]))
    _load_state(model, state, Path(spec.weights))
    return model


def _torchscript_model(path: str) -> nn.Module:
    if not Path(path).is_file():
        raise SpecError(f"TorchScript file {path!r} does not exist")
    try:
        return torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpecError(f"cannot load TorchScript file {path!r}: {message}") from None


def _exported_model(path: str) -> nn.Module:
    """A ``torch.export`` program as a module: unflattened, so it keeps its module hierarchy
    (CAM's hooks) and calls its ops from Python (the ReLU surrogates see them)."""
    if not Path(path).is_file():
        raise SpecError(f"exported program {path!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices about its pytree specs
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.load(path)
            return torch.export.unflatten(program)
    except Exception as error:  # torch.export raises many types for a file that is not a program
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpecError(f"cannot load exported program {path!r} (save it with torch.export.save): {message}") from None


@contextmanager
def _user_code(what: str) -> Iterator[None]:
    """A user's factory or module that raises is the user's mistake, not underfire's: one line
    naming the spec, the error and the line of the user's code that raised it."""
    try:
        yield
    except SpecError:
        raise
    except Exception as error:  # noqa: BLE001 - any exception of the user's code
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not _is_library_frame(frame.filename)]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} ({(frames[-1].line or '').strip()})" if frames else ""
        if isinstance(error, SyntaxError) and error.filename:
            where = f" at {error.filename}:{error.lineno} ({(error.text or '').strip()})"
        raise SpecError(f"{what} raised {type(error).__name__}: {_first_message(error)}{where}") from None


def _is_library_frame(filename: str) -> bool:
    """Frames of underfire, the standard library's import machinery and installed packages."""
    return (
        filename.startswith("<frozen")
        or str(Path(__file__).resolve().parents[1]) in filename
        or "importlib" in filename
    )


def _first_message(error: BaseException) -> str:
    text = str(error.msg if isinstance(error, SyntaxError) else error).strip()
    return text.splitlines()[0][:200] if text else "(no message)"


def _factory_model(target: str) -> nn.Module:
    module_name, _, function_name = target.rpartition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise SpecError(f"factory file {module_name!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"underfire_user_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise SpecError(f"cannot import {module_name!r}")
        module = importlib.util.module_from_spec(module_spec)
        with _user_code(f"importing {module_name!r}"):
            module_spec.loader.exec_module(module)
    else:
        try:
            found = importlib.util.find_spec(module_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise SpecError(f"cannot import module {module_name!r}: no such module on the Python path")
        with _user_code(f"importing module {module_name!r}"):
            module = importlib.import_module(module_name)
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise SpecError(f"{module_name!r} has no callable {function_name!r}")
    with _user_code(f"the model factory {target!r}"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise SpecError(f"{target} returned {type(model).__name__}, not an nn.Module")
    return model
