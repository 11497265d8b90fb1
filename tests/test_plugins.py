"""Plugins: a real third-party package (examples/underfire-example-plugin, installed by pip into a
folder of its own) adds an interpreter and an attack that work everywhere the built-ins do; broken
plugins are skipped with one warning each and never break the built-ins."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from underfire.attacks import ATTACKS, Attack
from underfire.cli import app
from underfire.interpreters import INTERPRETERS, Interpreter, build_interpreter
from underfire.models import load_model
from underfire.registry import PluginWarning, Registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "underfire-example-plugin"


def _refresh() -> None:
    INTERPRETERS.refresh()
    ATTACKS.refresh()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example package installed with pip into its own folder, put on sys.path for this module."""
    target = tmp_path_factory.mktemp("site")
    source = shutil.copytree(
        EXAMPLE, tmp_path_factory.mktemp("source") / EXAMPLE.name
    )  # build files stay out of the repo
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    sys.path.insert(0, str(target))
    _refresh()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m.startswith("underfire_example_plugin")]:
            del sys.modules[name]
        _refresh()


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_the_plugin_is_registered_next_to_the_builtins(plugin: Path) -> None:
    assert INTERPRETERS.names()[-1] == "example_gxi" and not INTERPRETERS.is_builtin("example_gxi")
    assert ATTACKS.names() == ["pgd", "adv2", "fgsm"]
    code, out, _ = cli("interpreters", "--options")
    assert (
        code == 0 and "example_gxi" in out and "back-propagation: gradient × input" in out and "relu: str = 'h'" in out
    )
    code, out, _ = cli("attacks")
    assert code == 0 and "fgsm" in out and "one targeted fast-gradient-sign step" in out


def test_the_plugin_interpreter_explains_and_has_a_live_surrogate(plugin: Path, tmp_path: Path) -> None:
    from underfire import ShapesDataset

    clf = load_model("shapes-resnet")
    explainer = build_interpreter("example_gxi", clf, relu="sigmoid")
    images, labels, _ = ShapesDataset("test").tensors(range(2))
    maps = explainer(images, labels)
    assert maps.shape == (2, 1, 64, 64) and 0 <= maps.min() and maps.max() <= 1
    with clf.frozen():
        x = images.clone().requires_grad_(True)
        surrogate, _ = explainer.surrogate(x, labels)
        (gradient,) = torch.autograd.grad(surrogate.pow(2).sum(), x)
    assert gradient.abs().sum() > 0  # the interpretation term reaches the input
    source = tmp_path / "png"
    cli("data", "export", "shapes:test", str(source), "--limit", "1")
    files = [str(p) for p in (source / "images").rglob("*.png")]
    code, out, err = cli(
        "explain", *files, "-i", "example_gxi", "--option", "relu=none", "--out", str(tmp_path / "maps"), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["images"][0]["map_shape"] == [64, 64]
    code, _, err = cli(
        "explain", *files, "-i", "example_gxi", "--option", "colour=red", "--out", str(tmp_path / "maps")
    )
    assert code == 2 and "unknown option 'colour'" in err and len(err.strip().splitlines()) == 1


def test_the_plugin_interpreter_and_attack_through_attack_and_the_defaults(plugin: Path, tmp_path: Path) -> None:
    from underfire.presets import preset

    default = preset("quick", "example_gxi")  # no preset of its own: underfire's defaults
    assert (default.pgd_steps, default.adv_steps) == (60, 200)
    code, out, err = cli(
        "attack",
        "--data",
        "shapes:test",
        "--limit",
        "2",
        "-i",
        "example_gxi",
        "--attack",
        "adv2",
        "--pgd-steps",
        "3",
        "--adv-steps",
        "3",
        "--out",
        str(tmp_path / "adv2"),
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["interpreter"] == "example_gxi" and report["summary"]["images"] == 2
    code, out, err = cli(
        "attack",
        "--data",
        "shapes:test",
        "--limit",
        "2",
        "-i",
        "cam",
        "--attack",
        "fgsm",
        "--out",
        str(tmp_path / "fgsm"),
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["attack"] == "fgsm" and report["config"] == {"eps": pytest.approx(8 / 255), "seed": 0}
    assert all(row["linf"] <= 8 / 255 + 1e-6 for row in report["images"])


def test_the_plugin_in_an_experiment_and_its_report(plugin: Path, tmp_path: Path) -> None:
    config = tmp_path / "experiment.toml"
    config.write_text(
        '[experiment]\nname = "plugins"\nimages = 2\nbatch_size = 2\nmodels = ["shapes-resnet"]\n'
        'interpreters = ["cam", "example_gxi"]\nattacks = ["pgd", "adv2", "fgsm"]\n'
        '[overrides]\npgd_steps = 2\nadv_steps = 2\n[interpreters.example_gxi]\nrelu = "sigmoid"\n'
    )
    run_dir = tmp_path / "run"
    code, _, err = cli("run", str(config), "--out", str(run_dir))
    assert code == 0, err
    from underfire.store import open_reader

    with open_reader(run_dir) as reader:
        rows = reader.results()
        assert {(r["interpreter"], r["attack"]) for r in rows} == {
            (i, a) for i in ("cam", "example_gxi") for a in ("pgd", "adv2", "fgsm")
        }
        options = {r["interpreter"]: json.loads(r["interpreter_options"]) for r in rows}
        assert options["example_gxi"] == {"relu": "sigmoid"} and options["cam"] == {}
        transfer = {(c["source_interpreter"], c["target_interpreter"]) for c in reader.transfer_means()}
        assert ("example_gxi", "cam") in transfer and ("cam", "example_gxi") in transfer
    code, _, err = cli("report", str(run_dir))
    assert code == 0, err
    page = (run_dir / "report.html").read_text()
    for key in ("fgsm_n", "fgsm_iou", "adv2_iou", "pgd_iou", "fgsm_iou_gain", "iou_gain"):
        assert f'data-key="{key}"' in page, key
    assert 'data-interpreter="example_gxi"' in page and "FGSM not run" not in page
    code, out, _ = cli("report", str(run_dir), "--format", "csv", "--out", str(tmp_path / "s.csv"))
    header = (tmp_path / "s.csv").read_text().splitlines()[0]
    assert header.startswith("model,interpreter,target_map,images,pgd_n,adv2_n,fgsm_n")


def _write_distribution(folder: Path, name: str, entry_points: str) -> None:
    """A real installed distribution as importlib.metadata reads it: a dist-info folder."""
    info = folder / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_broken_plugins_warn_once_each_and_the_builtins_still_work(tmp_path: Path) -> None:
    (tmp_path / "not_an_interpreter.py").write_text("class Thing:\n    name = 'wrongbase'\n")
    _write_distribution(
        tmp_path,
        "broken-plugins",
        "[underfire.interpreters]\nmissing = no_such_module_anywhere:Nope\nwrongbase = not_an_interpreter:Thing\n"
        "cam = underfire.interpreters.gradient:Grad\n",
    )
    sys.path.insert(0, str(tmp_path))
    try:
        registry: Registry[Interpreter] = Registry(
            "underfire.interpreters", Interpreter, "interpreter", order=INTERPRETERS.order
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = registry.names()
        messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
        assert len(messages) == 3 and all("\n" not in m for m in messages)
        assert any("'missing'" in m and "ModuleNotFoundError" in m for m in messages)
        assert any("'wrongbase'" in m and "not a subclass of underfire.Interpreter" in m for m in messages)
        assert any("'cam'" in m and "already taken by a built-in" in m for m in messages)
        assert names[:10] == [
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
        ]
        assert registry.get("cam").__name__ == "CAM"  # the built-in, not the clashing plugin
        attacks: Registry[Attack] = Registry("underfire.attacks", Attack, "attack")
        assert "pgd" in attacks.names()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("not_an_interpreter", None)
