"""Model specs: every kind parses and loads from local files; unsafe pickles are refused."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from underfire import CheckpointError, Classifier, SpecError, load_model, parse_model_spec
from underfire.interpreters import CAM
from underfire.models import ShapesResNet, load_weights, save_checkpoint
from underfire.models.specs import BUILTIN_MODELS, ModelSpec
from underfire.models.torchvision_compat import import_torchvision


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("shapes-resnet", ModelSpec("builtin", "shapes-resnet")),
        ("shapes-densenet", ModelSpec("builtin", "shapes-densenet")),
        ("runs/model.safetensors", ModelSpec("checkpoint", "runs/model.safetensors")),
        ("checkpoint:runs/model.bin", ModelSpec("checkpoint", "runs/model.bin")),
        ("torchvision:resnet50@w/r50.pth", ModelSpec("torchvision", "resnet50", "w/r50.pth")),
        ("torchvision:resnet50@random", ModelSpec("torchvision", "resnet50", "random")),
        ("torchvision:resnet50", ModelSpec("torchvision", "resnet50")),
        ("torchscript:model.pt", ModelSpec("torchscript", "model.pt")),
        ("mypkg.models:build", ModelSpec("factory", "mypkg.models:build")),
        ("models/net.py:make@w.pt", ModelSpec("factory", "models/net.py:make", "w.pt")),
    ],
)
def test_specs_parse(text: str, expected: ModelSpec) -> None:
    assert parse_model_spec(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "resnet", "torchvision:", "foo:1bad", "nonsense-model"])
def test_bad_specs_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_model_spec(text)
    assert "\n" not in str(info.value)


def test_separate_weights_argument_wins_over_none() -> None:
    assert parse_model_spec("torchvision:resnet18", weights="a.pt").weights == "a.pt"


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_models_load_with_metadata(name: str) -> None:
    clf = load_model(name)
    assert isinstance(clf, Classifier)
    assert clf.input_size == 64 and clf.num_classes == 10 and len(clf.class_names) == 10
    assert clf.metadata["test_accuracy"] >= 0.97
    assert clf.predict(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    assert CAM(clf).layers.feature_module is not None


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = ShapesResNet().eval()
    meta = {
        "architecture": "resnet",
        "class_names": list("abcdefghij"),
        "input_size": 64,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    path = save_checkpoint(model.state_dict(), tmp_path / "m.safetensors", meta)
    assert json.loads(path.with_suffix(".json").read_text())["architecture"] == "resnet"
    for spec in (str(path), f"checkpoint:{path}"):
        clf = load_model(spec)
        images = torch.rand(2, 3, 64, 64)
        expected = model((images - 0.5) / 0.25)
        torch.testing.assert_close(clf.predict(images), expected)
        assert clf.class_names == list("abcdefghij")
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_checkpoint_errors(tmp_path: Path) -> None:
    model = ShapesResNet()
    path = save_checkpoint(
        model.state_dict(), tmp_path / "m.safetensors", {"architecture": "densenet", "class_names": list("abcdefghij")}
    )
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_model(str(path))
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="no metadata file"):
        load_model(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_weights(corrupt)


def write_torchvision_weights(tmp_path: Path, name: str, num_classes: int) -> tuple[Path, nn.Module]:
    torchvision = import_torchvision()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_spec_with_local_weights(tmp_path: Path, name: str) -> None:
    path, reference = write_torchvision_weights(tmp_path, name, num_classes=7)
    clf = load_model(f"torchvision:{name}@{path}")
    assert clf.num_classes == 7 and clf.input_size == 224
    images = torch.rand(1, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference((images - mean) / std)
    torch.testing.assert_close(clf.predict(images), expected)
    # the same weights passed separately
    assert load_model(f"torchvision:{name}", weights=str(path)).num_classes == 7


def test_torchvision_spec_needs_weights_and_a_known_name(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="needs a local weights file"):
        load_model("torchvision:resnet18")
    with pytest.raises(SpecError, match="no model named 'resnet9000'"):
        load_model("torchvision:resnet9000@random")
    assert load_model("torchvision:resnet18@random").num_classes == 1000


def test_wrapped_and_data_parallel_state_dicts_load(tmp_path: Path) -> None:
    path, reference = write_torchvision_weights(tmp_path, "resnet18", num_classes=3)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3}, wrapped)
    clf = load_model(f"torchvision:resnet18@{wrapped}")
    torch.testing.assert_close(clf.network.fc.weight, reference.fc.weight)


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_carrying_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load .*arbitrary unpickling") as info:
        load_model(f"torchvision:resnet18@{evil}")
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the payload ran"


def test_torchscript_spec(tmp_path: Path) -> None:
    model = ShapesResNet().eval()
    path = tmp_path / "net.pt"
    torch.jit.script(model).save(str(path))
    clf = load_model(f"torchscript:{path}")
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(clf.predict(images), model(images))
    with pytest.raises(SpecError, match="does not exist"):
        load_model(f"torchscript:{tmp_path / 'missing.pt'}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(SpecError, match="cannot load TorchScript"):
        load_model(f"torchscript:{bad}")


def test_factory_specs_from_module_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = textwrap.dedent(
        """
        import torch
        from torch import nn

        def build():
            torch.manual_seed(1)
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

        def not_a_model():
            return 42
        """
    )
    (tmp_path / "user_models.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = load_model("user_models:build", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    from_file = load_model(f"{tmp_path / 'user_models.py'}:build")
    assert from_module.num_classes == 2 and from_file.num_classes == 2
    # weights for a factory model
    weights = tmp_path / "w.pt"
    reference = from_file.network
    torch.save(reference.state_dict(), weights)
    loaded = load_model(f"user_models:build@{weights}")
    torch.testing.assert_close(loaded.network[3].weight, reference[3].weight)
    with pytest.raises(SpecError, match="not an nn.Module"):
        load_model("user_models:not_a_model")
    with pytest.raises(SpecError, match="has no callable 'missing'"):
        load_model("user_models:missing")
    with pytest.raises(SpecError, match="cannot import module"):
        load_model("no_such_module_xyz:build")
    with pytest.raises(SpecError, match="does not exist"):
        load_model(f"{tmp_path / 'nope.py'}:build")


def test_no_network_access_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading every built-in must not touch torch.hub (no downloads at run time)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("attempted download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", os.devnull)
    for name in BUILTIN_MODELS:
        load_model(name)
    load_model("torchvision:resnet18@random")
