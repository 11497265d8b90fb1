"""The interpreter whose maps are judged is the one ``underfire explain`` builds: a preset changes
the attack (and the copy of the interpreter the attack differentiates), never the benign map or
the measures."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from underfire.attacks import ADV2, AttackConfig
from underfire.cli import app
from underfire.data import ShapesDataset
from underfire.interpreters import INTERPRETERS, build_interpreter
from underfire.models import Classifier
from underfire.presets import PRESETS, preset, surrogate_options
from underfire.runs import ExperimentConfig, run_experiment
from underfire.visualize import to_uint8

runner = CliRunner()
#: every registered interpreter that reads a convolutional network (the attention ones do not)
ALL = [name for name in INTERPRETERS if name not in ("rollout", "transformer_attribution")]


def tiny_classifier() -> Classifier:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).eval()
    return Classifier(net, input_size=16, num_classes=4)


def test_explain_writes_the_benign_map_a_run_stores_for_every_interpreter(tmp_path: Path) -> None:
    """Same image, model and interpreter options: ``explain``'s map file equals the run's stored
    benign map, for every registered interpreter, under the ``quick`` preset (IG's 8-node attack
    surrogate included)."""
    images, _, _ = ShapesDataset("test").tensors([3])
    image = images[0]
    path = tmp_path / "photo.png"
    Image.fromarray(to_uint8(image)).save(path)
    config = ExperimentConfig.from_mapping(
        {
            "experiment": {
                "name": "truth",
                "preset": "quick",
                "files": [str(path)],
                "models": ["shapes-resnet"],
                "interpreters": ALL,
                "attacks": ["pgd"],
                "transfer": False,
            },
            "attacks": {"pgd": {"pgd_steps": 1}},
        }
    )
    run_experiment(config, tmp_path / "run")
    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as connection:
        stored = dict(connection.execute("SELECT interpreter, benign_map_path FROM results"))
    assert set(stored) == set(ALL)
    for name in ALL:
        result = runner.invoke(
            app, ["explain", str(path), "-m", "shapes-resnet", "-i", name, "-o", str(tmp_path / name)]
        )
        assert result.exit_code == 0, result.output
        (written,) = (tmp_path / name).glob("*.npy")
        explained = np.load(written)
        benign = np.load(tmp_path / "run" / stored[name])
        assert explained.shape == benign.shape, name
        np.testing.assert_allclose(explained, benign, atol=1e-5, err_msg=name)


def test_presets_set_the_attack_and_its_surrogate_never_the_judged_options() -> None:
    config = ExperimentConfig.from_mapping(
        {
            "experiment": {"preset": "quick", "interpreters": ["ig", "grad", "cam"], "models": ["shapes-resnet"]},
            "interpreters": {"ig": {"steps": 16}},
            "overrides": {"grad": {"surrogate_options": {"relu": "sigmoid"}}},
        }
    )
    assert config.options_for("ig") == {"steps": 16} and config.options_for("grad") == {}
    # the preset's 8-node surrogate is the attack's, on top of the judged 16 nodes
    assert config.config_for("adv2", "ig").surrogate_options == {"relu_scale": "relative", "steps": 8}
    # a user's surrogate options merge onto the preset's, key by key
    assert config.config_for("adv2", "grad").surrogate_options == {"relu": "sigmoid", "relu_scale": "relative"}
    assert config.config_for("adv2", "cam").surrogate_options == {}
    assert config.config_for("pgd").surrogate_options == {}  # PGD differentiates no interpreter
    assert set(config.plans) == {("pgd", None), ("adv2", "ig"), ("adv2", "grad"), ("adv2", "cam")}


def test_a_bad_surrogate_option_is_one_line_naming_where() -> None:
    from underfire.errors import InputError

    with pytest.raises(InputError, match=r"overrides\.ig\.surrogate_options: unknown option 'nodes'") as error:
        ExperimentConfig.from_mapping(
            {"experiment": {"interpreters": ["ig"]}, "overrides": {"ig": {"surrogate_options": {"nodes": 4}}}}
        )
    assert "\n" not in str(error.value)


def test_every_preset_entry_names_a_registered_interpreter_and_its_options() -> None:
    for name, table in PRESETS.items():
        assert name in INTERPRETERS, name
        for preset_name in table:
            surrogate_options(preset_name, name)  # every key is an option of that interpreter


def test_adv2_differentiates_the_surrogate_and_keeps_the_judged_maps() -> None:
    """ADV² against a 4-node IG with an 1-node surrogate: the target maps default to the judged
    (4-node) maps, the attack's copy has 1 node, and the judged interpreter is left as it was."""
    clf = tiny_classifier()
    judged = build_interpreter("ig", clf, steps=4)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 2])
    config = AttackConfig(pgd_steps=2, adv_steps=2, surrogate_options={"steps": "1"})
    attack = ADV2(clf, config, interpreter=judged)
    assert attack.surrogate is not judged and attack.surrogate.steps == 1 and judged.steps == 4
    calls: list[int] = []
    original = type(judged).surrogate_and_logits

    def spy(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - records which copy is differentiated
        calls.append(self.steps)
        return original(self, *args, **kwargs)

    type(judged).surrogate_and_logits = spy
    try:
        attack(x, targets)
    finally:
        type(judged).surrogate_and_logits = original
    assert calls and set(calls) == {1}
    assert ADV2(clf, AttackConfig(pgd_steps=1, adv_steps=1), interpreter=judged).surrogate is judged


def test_a_quick_ig_attack_config_says_its_surrogate() -> None:
    assert preset("quick", "ig").surrogate_options == {"relu_scale": "relative", "steps": 8}
    assert preset("paper", "ig").surrogate_options == {}
    stored = json.loads(json.dumps(preset("quick", "ig").surrogate_options))
    assert stored["steps"] == 8


def test_rows_and_the_report_say_what_the_attack_differentiated(tmp_path: Path) -> None:
    """A quick ADV² run on IG: each row's stored attack config names the 8-node surrogate, the
    judged options stay empty, and the HTML report lists the surrogate next to the settings."""
    from underfire.report import write_report

    images, _, _ = ShapesDataset("test").tensors([0])
    path = tmp_path / "one.png"
    Image.fromarray(to_uint8(images[0])).save(path)
    config = ExperimentConfig.from_mapping(
        {
            "experiment": {
                "files": [str(path)],
                "models": ["shapes-resnet"],
                "interpreters": ["ig"],
                "attacks": ["adv2"],
                "transfer": False,
            },
            "overrides": {"pgd_steps": 1, "adv_steps": 1},
        }
    )
    run_experiment(config, tmp_path / "run")
    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as connection:
        ((stored, options),) = connection.execute("SELECT config, interpreter_options FROM results")
    assert json.loads(stored)["surrogate_options"] == {"relu_scale": "relative", "steps": 8}
    assert json.loads(options) == {}
    page = write_report(tmp_path / "run").read_text()
    assert "attacked surrogates" in page and "steps=8" in page


def test_attack_set_takes_any_attack_setting_typed_and_validated(tmp_path: Path) -> None:
    result = runner.invoke(app, ["attacks", "--options"])
    assert result.exit_code == 0
    assert "adv_steps: int = 1000" in result.stdout and "surrogate_options" in result.stdout
    images, _, _ = ShapesDataset("test").tensors([0])
    path = tmp_path / "one.png"
    Image.fromarray(to_uint8(images[0])).save(path)
    base = [str(path), "-m", "shapes-resnet", "-i", "cam", "--json"]
    result = runner.invoke(app, ["attack", *base, "--set", "adv_steps=two", "-o", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "adv_steps" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(
        app, ["attack", *base, "--set", "adv_steps=2", "--adv-steps", "3", "-o", str(tmp_path / "two")]
    )
    assert result.exit_code != 0 and "both set adv_steps" in result.stderr
    result = runner.invoke(
        app,
        [
            "attack",
            *base,
            "--set",
            "pgd_steps=2",
            "--set",
            "adv_steps=3",
            "--set",
            "lam=1,2",
            "-o",
            str(tmp_path / "ok"),
        ],
    )
    assert result.exit_code == 0, result.output
    with sqlite3.connect(tmp_path / "ok" / "results.sqlite") as connection:
        ((stored,),) = connection.execute("SELECT config FROM results")
    config = json.loads(stored)
    assert (config["pgd_steps"], config["adv_steps"], config["lam"]["values"]) == (2, 3, [1.0, 2.0])


def test_every_reference_config_is_a_valid_run() -> None:
    from underfire.runs import load_experiment_config

    folder = Path(__file__).resolve().parents[1] / "docs" / "reference"
    configs = sorted(folder.glob("*.toml"))
    assert len(configs) >= 8
    for path in configs:
        config = load_experiment_config(path)
        assert config.plans and config.name == f"reference-{path.stem}", path.name


def test_the_reference_table_script_reads_rows_from_a_run(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "reference_table.py"
    spec = importlib.util.spec_from_file_location("reference_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = ExperimentConfig.from_mapping(
        {
            "experiment": {
                "name": "tiny-table",
                "images": 2,
                "batch_size": 2,
                "models": ["shapes-resnet"],
                "interpreters": ["ig"],
                "transfer": False,
            },
            "interpreters": {"ig": {"steps": 4}},
            "overrides": {"pgd_steps": 1, "adv_steps": 1},
        }
    )
    run_experiment(config, tmp_path / "run")
    rows = {row["attack"]: row for row in module.rows_of(tmp_path / "run")}
    assert set(rows) == {"pgd", "adv2"}
    adv2, pgd = rows["adv2"], rows["pgd"]
    assert adv2["surrogate"] == {"relu_scale": "relative", "steps": 8} and adv2["options"] == {"steps": 4}
    assert adv2["map_power"] == 0.5 and "map_power" not in pgd and "surrogate" not in pgd
    assert adv2["images"] == pgd["images"] == 2 and (adv2["steps"], pgd["steps"]) == (2, 2)
    assert adv2["run"] == "tiny-table" and 0 <= adv2["iou"] <= 1
    from underfire.versions import source_commit

    assert adv2["commit"] == source_commit()
