"""The command line, run in-process through typer's runner on real data and real checkpoints."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from underfire import load_model
from underfire.cli import app
from underfire.data import ShapesDataset
from underfire.models.specs import BUILTIN_MODELS, builtin_weights_path

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_models_lists_the_builtins() -> None:
    code, out, _ = run("models", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(rows) == set(BUILTIN_MODELS)
    assert all(row["test_accuracy"] >= 0.97 for row in rows.values())
    code, out, _ = run("models")
    assert code == 0 and "shapes-densenet" in out


@pytest.mark.parametrize("model", list(BUILTIN_MODELS))
def test_evaluate_json_reports_accuracy(model: str) -> None:
    code, out, _ = run("evaluate", "--model", model, "--limit", "300", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["images"] == 300 and report["accuracy"] >= 0.95
    assert len(report["per_class"]) == 10 and sum(report["counts"].values()) == 300


def test_export_then_evaluate_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "png"
    code, text, _ = run("data", "export", "shapes:test", str(out), "--limit", "40")
    assert code == 0 and "40 images" in text
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 40 and len(list((out / "masks").rglob("*.png"))) == 40
    first = np.asarray(Image.open(pngs[0]))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    code, text, _ = run("evaluate", "--model", "shapes-resnet", "--data", str(out), "--json")
    assert code == 0
    folder = json.loads(text)
    _, direct, _ = run("evaluate", "--model", "shapes-resnet", "--limit", "40", "--json")
    # PNG export is lossless, and folder classes map to the model's classes by name
    assert folder["accuracy"] == json.loads(direct)["accuracy"]


def test_evaluate_plain_output() -> None:
    code, out, _ = run("evaluate", "--model", "shapes-densenet", "--limit", "50")
    assert code == 0 and "accuracy" in out and "circle" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("evaluate", "--model", "no-such-model"), "cannot parse model spec"),
        (("evaluate", "--data", "shapes:nope"), "shapes"),
        (("evaluate", "--data", "/no/such/folder"), "/no/such/folder"),
        (("evaluate", "--limit", "0"), "--limit must be a positive"),
        (("evaluate", "--model", "torchvision:resnet18"), "needs a local weights file"),
        (("train", "classifier", "--arch", "vgg"), "unknown architecture 'vgg'"),
        (("train", "classifier", "--epochs", "0"), "epochs must be positive"),
    ],
)
def test_user_errors_are_one_line_with_status_2(args: tuple[str, ...], message: str) -> None:
    code, out, err = run(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in out + err


def test_corrupt_image_in_a_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "imgs" / "circle"
    folder.mkdir(parents=True)
    image, _ = ShapesDataset("test", length=1)[0]
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run("evaluate", "--data", str(tmp_path / "imgs"))
    assert code == 2 and "broken.png" in err


def test_train_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "tiny.safetensors"
    code, text, _ = run(
        "train",
        "classifier",
        "--arch",
        "densenet",
        "--epochs",
        "1",
        "--train-size",
        "256",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert code == 0 and "test accuracy" in text
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["architecture"] == "densenet" and meta["config"]["seed"] == 3
    assert {"torch", "underfire", "numpy"} <= set(meta["versions"])
    clf = load_model(str(out))
    assert clf.class_names == meta["class_names"] and clf.input_size == 64


def test_shipped_metadata_records_how_it_was_made() -> None:
    for name in BUILTIN_MODELS:
        meta = json.loads(builtin_weights_path(name).with_suffix(".json").read_text())
        assert meta["config"]["dataset"] == "shapes"
        assert meta["test_accuracy"] >= 0.97
        assert meta["config"]["epochs"] >= 1 and meta["train_seconds"] > 0


@pytest.mark.parametrize("interpreter", ["grad", "cam"])
def test_explain_writes_maps_and_overlays(tmp_path: Path, interpreter: str) -> None:
    source = tmp_path / "png"
    run("data", "export", "shapes:test", str(source), "--limit", "3")
    files = sorted(str(p) for p in (source / "images").rglob("*.png"))
    code, out, _ = run(
        "explain", "--model", "shapes-resnet", "-i", interpreter, *files, "--out", str(tmp_path / "maps"), "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["interpreter"] == interpreter and len(report["images"]) == 3
    for row, file in zip(report["images"], files):
        assert row["image"] == file
        assert Path(file).parent.name == row["predicted_name"]  # the shipped model is right on these
        saliency = np.load(row["map"])
        assert saliency.dtype == np.float32 and saliency.ndim == 2 and list(saliency.shape) == row["map_shape"]
        assert 0 <= saliency.min() and saliency.max() <= 1
        picture = Image.open(row["overlay"])
        assert picture.mode == "RGB" and picture.size == (256, 256)


def test_explain_refuses_a_corrupt_image_before_any_work(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "maps"
    code, _, err = run("explain", "-i", "cam", str(broken), "--out", str(out))
    assert code == 2 and "broken.jpg" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_interpreters_are_listed() -> None:
    code, out, _ = run("interpreters")
    assert code == 0
    # the paper's classes in order, names alphabetical within each
    assert [line.split()[0] for line in out.strip().splitlines()] == [
        "deeplift",
        "grad",
        "ig",
        "inputxgrad",
        "lrp",
        "smoothgrad",
        "cam",
        "gradcam",
        "rts",
        "mask",
        "ensemble",
        "rollout",
        "transformer_attribution",
    ]


def test_evaluate_with_an_interpreter_reports_localisation() -> None:
    code, out, _ = run("evaluate", "--model", "shapes-resnet", "--limit", "40", "-i", "cam", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["pointing_game"] >= 0.9 and 0 < report["object_iou"] <= 1


def test_attack_on_files_saves_measured_pngs(tmp_path: Path) -> None:
    source = tmp_path / "png"
    run("data", "export", "shapes:test", str(source), "--limit", "2")
    files = sorted(str(p) for p in (source / "images").rglob("*.png"))
    out = tmp_path / "attack"
    code, text, _ = run(
        "attack",
        *files,
        "--model",
        "shapes-resnet",
        "-i",
        "cam",
        "--eps",
        "8/255",
        "--pgd-steps",
        "8",
        "--adv-steps",
        "8",
        "--restarts",
        "2",
        "--out",
        str(out),
        "--json",
    )
    assert code == 0
    with sqlite3.connect(out / "results.sqlite") as db:
        assert {json.loads(config)["restarts"] for (config,) in db.execute("SELECT config FROM results")} == {2}
    report = json.loads(text)
    assert json.loads((out / "report.json").read_text()) == report
    assert report["summary"]["images"] == 2
    for row in report["images"]:
        assert row["target_class"] != row["true_class"]
        assert row["linf"] <= 8 / 255 + 1e-6
        assert set(row) >= {"success", "confidence", "l1", "l2", "iou", "iou_by_k", "predicted_class"}
        assert len(row["iou_by_k"]) == 10
        assert all(
            Path(row[key]).is_file() and out in Path(row[key]).parents for key in ("adversarial", "map", "benign_map")
        )
    # the attack command is a one-attack run: its folder is a run folder the report reads
    assert run("report", str(out))[0] == 0 and (out / "report.html").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--eps", "0"), "eps must be in"),
        (("--eps", "2"), "eps must be in"),
        (("--eps", "abc"), "cannot read 'abc'"),
        (("-i", "lime"), "unknown interpreter 'lime'"),
        (("--target", "circle"), "equals the true class"),
        (("--target", "zebra"), "unknown class 'zebra'"),
        (("--attack", "fgsm"), "unknown attack 'fgsm'"),
        (("--restarts", "0"), "restarts must be an integer >= 1"),
        (("--target-map", "nope.npy"), "does not exist"),
    ],
)
def test_attack_argument_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    image = tmp_path / "circle.png"
    picture, _ = ShapesDataset("test", length=1)[0]  # test image 0 is a circle
    Image.fromarray((picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(image)
    code, _, err = run(
        "attack", str(image), "--out", str(tmp_path / "o"), "--pgd-steps", "1", "--adv-steps", "1", *args
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_train_rts_writes_a_usable_network(tmp_path: Path) -> None:
    from underfire.interpreters import Rts

    out = tmp_path / "rts.safetensors"
    code, text, _ = run(
        "train", "rts", "--model", "shapes-resnet", "--epochs", "1", "--train-size", "32", "--out", str(out)
    )
    assert code == 0 and "pointing_game" in text
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["config"]["model"] == "shapes-resnet" and meta["config"]["train_size"] == 32
    clf = load_model("shapes-resnet")
    images, labels, _ = ShapesDataset("test", length=2).tensors()
    maps = Rts(clf, checkpoint=out)(images, labels)
    assert maps.shape == (2, 1, 16, 16)
