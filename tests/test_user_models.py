"""A user's own model: metadata (flags, config tables, model cards), TorchScript and exported
graphs through every interpreter, Grad-CAM without a GAP head, and the zero-gradient guard."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from underfire.attacks.config import AttackConfig, LambdaSchedule
from underfire.attacks.core import ADV2
from underfire.cli import app
from underfire.data import open_dataset, read_image
from underfire.errors import AttackError, InputError, ModelStructureError, SpecError
from underfire.interpreters import INTERPRETERS, build_interpreter
from underfire.interpreters.cam_layers import FeatureCapture
from underfire.models import Classifier, ModelOptions, load_model
from underfire.models.metadata import CARD_KEYS
from underfire.runs.config import ExperimentConfig

SIZE = 28
CLASSES = ("zero", "one", "two")

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class FlatNet(nn.Module):
        '''conv → ReLU → max-pool → Flatten → dense: no GAP head (VGG-style).'''

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)
            self.pool = nn.MaxPool2d(2)
            self.hidden = nn.Linear(4 * 14 * 14, 8)
            self.act = nn.ReLU()
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            x = self.pool(self.relu(self.conv(x)))
            return self.out(self.act(self.hidden(x.flatten(1))))


    def flat_net():
        torch.manual_seed(0)
        return FlatNet().eval()
    """
)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny grey 28×28 network as a factory file, a TorchScript archive and an exported
    program, with no metadata anywhere."""
    folder = tmp_path_factory.mktemp("user-model")
    source = folder / "flatnet.py"
    source.write_text(FACTORY_SOURCE)
    namespace: dict[str, object] = {}
    exec(compile(FACTORY_SOURCE, str(source), "exec"), namespace)
    network = namespace["flat_net"]()  # type: ignore[operator]
    example = torch.rand(2, 1, SIZE, SIZE)
    torch.jit.trace(network, example).save(str(folder / "flatnet-traced.pt"))
    program = torch.export.export(network, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(folder / "flatnet.pt2"))
    return {"factory": source, "torchscript": folder / "flatnet-traced.pt", "export": folder / "flatnet.pt2"}


def _spec(files: dict[str, Path], kind: str) -> str:
    return f"{files[kind]}:flat_net" if kind == "factory" else f"{kind}:{files[kind]}"


def _load(files: dict[str, Path], kind: str, **options: object) -> Classifier:
    return load_model(_spec(files, kind), ModelOptions(input_size=SIZE, channels=1, class_names=CLASSES, **options))


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ metadata
@pytest.mark.parametrize("kind", ["factory", "torchscript", "export"])
def test_every_format_loads_with_metadata_and_gives_the_same_logits(model_files: dict[str, Path], kind: str) -> None:
    reference = _load(model_files, "factory")
    classifier = _load(model_files, kind)
    assert classifier.num_classes == 3 and classifier.in_channels == 1 and classifier.input_size == SIZE
    assert classifier.metadata["format"] == kind
    images = _images()
    torch.testing.assert_close(classifier.predict(images), reference.predict(images))


def test_a_model_that_rejects_its_probe_names_the_options_to_set(model_files: dict[str, Path]) -> None:
    with pytest.raises(SpecError) as caught:
        load_model(_spec(model_files, "torchscript"))
    message = str(caught.value)
    assert "\n" not in message
    assert "rejects a 1×3×224×224 input" in message
    assert "--channels 1 --input-size 28" in message


def test_class_names_must_match_the_outputs(model_files: dict[str, Path]) -> None:
    with pytest.raises(SpecError, match="3 outputs but 2 class names"):
        load_model(_spec(model_files, "export"), ModelOptions(input_size=SIZE, channels=1, class_names=("a", "b")))


def test_a_model_card_beside_the_file_is_read_and_flags_win(model_files: dict[str, Path], tmp_path: Path) -> None:
    graph = tmp_path / "net.pt2"
    graph.write_bytes(model_files["export"].read_bytes())
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    (tmp_path / "net.toml").write_text('input_size = 28\nchannels = 1\nclasses = "names.txt"\nmean = [0.5]\n')
    classifier = load_model(f"export:{graph}")
    assert classifier.class_names == list(CLASSES)
    assert classifier.metadata["card"] == str(tmp_path / "net.toml")
    assert classifier.mean.flatten().tolist() == [0.5]
    flagged = load_model(f"export:{graph}", ModelOptions(mean=(0.25,), class_names=("a", "b", "c")))
    assert flagged.mean.flatten().tolist() == [0.25] and flagged.class_names == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"channels": 2}, "channels must be 1"),
        ({"input_size": 0}, "input size must be"),
        ({"std": "1,-1,1"}, "std must be positive"),
        ({"mean": "a,b"}, "mean must be numbers"),
        ({"class_names": ("a", "a")}, "given twice"),
    ],
)
def test_bad_metadata_is_one_clear_error(options: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        ModelOptions(**options)  # type: ignore[arg-type]


def test_bad_model_cards_are_one_clear_error(model_files: dict[str, Path], tmp_path: Path) -> None:
    graph = tmp_path / "net.pt2"
    graph.write_bytes(model_files["export"].read_bytes())
    card = tmp_path / "net.toml"
    card.write_text("input_size = [\n")
    with pytest.raises(InputError, match="is not valid TOML"):
        load_model(f"export:{graph}")
    card.write_text("input_sise = 12\n")
    with pytest.raises(InputError, match="unknown key 'input_sise'") as caught:
        load_model(f"export:{graph}")
    assert all(key in str(caught.value) for key in CARD_KEYS)


def test_run_config_models_table(model_files: dict[str, Path]) -> None:
    spec = _spec(model_files, "export")
    document = {
        "experiment": {"models": [spec], "interpreters": ["grad"], "files": ["a.png"]},
        "models": {spec: {"input_size": SIZE, "channels": 1, "classes": list(CLASSES)}},
    }
    config = ExperimentConfig.from_mapping(document)
    assert config.model_options_for(spec).class_names == CLASSES
    assert config.as_dict()["models"][spec]["channels"] == 1
    with pytest.raises(InputError, match="models.other.*not one of the configured models"):
        ExperimentConfig.from_mapping({**document, "models": {"other": {}}})
    with pytest.raises(InputError, match="channels must be 1"):
        ExperimentConfig.from_mapping({**document, "models": {spec: {"channels": 5}}})


# ------------------------------------------------------------------------------------ images and folders
def test_grey_images_read_back_exactly_and_rgb_becomes_luma(tmp_path: Path) -> None:
    grey = ((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 7) % 256).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    image = read_image(tmp_path / "grey.png", channels=1)
    assert image.shape == (1, SIZE, SIZE)
    assert torch.equal(image[0], torch.from_numpy(grey.astype(np.float32) / 255))
    rgb = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    assert torch.allclose(read_image(tmp_path / "red.png", channels=1), torch.full((1, SIZE, SIZE), 0.299))


def _folder(root: Path, classes: tuple[str, ...]) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((SIZE, SIZE), 128, dtype=np.uint8), mode="L").save(root / name / "a.png")
    return root


def test_a_folder_with_fewer_classes_than_outputs_is_matched_by_name_or_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", ("one", "two"))
    with pytest.raises(InputError, match="2 class folders and the model 3 outputs"):
        open_dataset(str(root), size=SIZE, channels=1, outputs=3)
    dataset = open_dataset(str(root), size=SIZE, class_names=CLASSES, channels=1, outputs=3)
    assert [label for _, label in dataset.samples] == [1, 2]
    with pytest.raises(InputError, match="names 2 classes, the model has 3 outputs"):
        open_dataset(str(root), size=SIZE, class_names=("one", "two"), channels=1, outputs=3)


# ------------------------------------------------------------------------------------ interpreters
@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_every_interpreter_on_a_graph_file_works_or_refuses_in_one_line(
    model_files: dict[str, Path], kind: str
) -> None:
    classifier = _load(model_files, kind)
    images = _images()
    outcome = {}
    for name in INTERPRETERS:
        try:
            interpreter = build_interpreter(name, classifier)
        except (ModelStructureError, InputError) as error:
            assert "\n" not in str(error)
            outcome[name] = "refused"
            continue
        try:
            maps = interpreter(images, torch.tensor([0, 1, 2]))
        except ModelStructureError as error:  # what it reads is not there (rollout: no attention)
            assert "\n" not in str(error)
            outcome[name] = "refused"
            continue
        assert maps.shape[:2] == (3, 1) and torch.isfinite(maps).all()
        assert float(maps.min()) >= 0 and float(maps.max()) <= 1
        outcome[name] = "explained"
    # no GAP head: CAM is refused everywhere; no RTS network was trained for this model
    assert outcome["cam"] == "refused" and outcome["rts"] == "refused"
    assert outcome["grad"] == outcome["smoothgrad"] == outcome["mask"] == "explained"
    # Python hooks cannot reach inside TorchScript; an exported program keeps its modules
    assert outcome["gradcam"] == ("refused" if kind == "torchscript" else "explained")
    # the rule tracer follows Python torch calls: neither a C++ graph nor aten operators
    assert outcome["deeplift"] == outcome["lrp"] == "refused"
    assert outcome["inputxgrad"] == outcome["ig"] == "explained"


def _attack(classifier: Classifier, interpreter_name: str, **options: object) -> ADV2:
    interpreter = build_interpreter(interpreter_name, classifier, **options)
    config = AttackConfig(eps=0.1, alpha=0.02, pgd_steps=2, adv_steps=3, lam=LambdaSchedule((1.0,)))
    return ADV2(classifier, config, interpreter=interpreter)


@pytest.mark.parametrize(("kind", "interpreter"), [("export", "grad"), ("export", "gradcam"), ("factory", "gradcam")])
def test_adv2_runs_on_exported_programs_and_flatten_heads(
    model_files: dict[str, Path], kind: str, interpreter: str
) -> None:
    classifier = _load(model_files, kind)
    result = _attack(classifier, interpreter)(_images(), torch.tensor([1, 2, 0]))
    assert result.adversarial.shape == (3, 1, SIZE, SIZE)
    assert torch.isfinite(result.map_distance[~torch.isnan(result.map_distance)]).all()


def test_grad_adv2_on_torchscript_is_refused_before_any_step(model_files: dict[str, Path]) -> None:
    classifier = _load(model_files, "torchscript")
    with pytest.raises(ModelStructureError, match="cannot reach inside the TorchScript graph.*export:PATH.pt2"):
        _attack(classifier, "grad")(_images(), torch.tensor([1, 2, 0]))


def test_zero_gradient_guard_stops_an_adv2_that_would_be_pgd(model_files: dict[str, Path]) -> None:
    # the exact ReLU: ∂map/∂x is zero everywhere in a piecewise-linear network
    classifier = _load(model_files, "factory")
    with pytest.raises(AttackError, match="no input gradient.*plain PGD"):
        _attack(classifier, "grad", relu="none")(_images(), torch.tensor([1, 2, 0]))


def test_general_grad_cam_equals_the_gap_shortcut_on_a_gap_head() -> None:
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    ).eval()
    classifier = Classifier(network, input_size=8)
    interpreter = build_interpreter("gradcam", classifier)
    assert interpreter.layers.head is not None  # read as CAM is
    images, classes = torch.rand(3, 3, 8, 8), torch.tensor([0, 3, 1])
    shortcut = interpreter.raw(images, classes)
    general = FeatureCapture(classifier, feature_layer=interpreter.layers.feature_name, gap_head=False)
    general.layers = type(general.layers)(general.layers.feature_name, general.layers.feature_module, None, None, False)
    from underfire.interpreters.cam import _weighted_map

    with classifier.frozen():
        features, logits = general.features_in_graph(images, detach=True)
        direct = _weighted_map(features, logits, classes, create_graph=False)
    torch.testing.assert_close(direct, shortcut, rtol=1e-5, atol=1e-6)


def test_cam_reads_an_exported_program_with_a_gap_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()
    example = torch.rand(2, 3, 8, 8)
    program = torch.export.export(network, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "gap.pt2"))
    exported = load_model(f"export:{tmp_path / 'gap.pt2'}", ModelOptions(input_size=8))
    module = Classifier(network, input_size=8)
    images, classes = torch.rand(3, 3, 8, 8), torch.tensor([0, 3, 1])
    for name in ("cam", "gradcam"):
        ours, reference = build_interpreter(name, exported), build_interpreter(name, module)
        assert ours.layers.head_name == "4" and ours.layers.feature_name == reference.layers.feature_name
        torch.testing.assert_close(ours(images, classes), reference(images, classes), rtol=1e-5, atol=1e-6)
    result = ADV2(
        exported,
        AttackConfig(eps=0.1, alpha=0.02, pgd_steps=2, adv_steps=3),
        interpreter=build_interpreter("cam", exported),
    )(images, torch.tensor([1, 2, 0]))
    assert result.adversarial.shape == images.shape


def test_general_grad_cam_matches_captum_on_a_flatten_head(model_files: dict[str, Path]) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    classifier = _load(model_files, "factory")
    interpreter = build_interpreter("gradcam", classifier)
    assert interpreter.layers.head is None and interpreter.layers.feature_name == "pool"
    images, classes = _images(), torch.tensor([0, 1, 2])
    ours = interpreter.raw(images, classes)
    network = classifier.network
    theirs = captum_attr.LayerGradCam(network, network.pool).attribute(images, target=classes, relu_attributions=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_general_grad_cam_surrogate_has_an_input_gradient(model_files: dict[str, Path]) -> None:
    classifier = _load(model_files, "factory")
    interpreter = build_interpreter("gradcam", classifier)
    images = _images().requires_grad_(True)
    with classifier.frozen():
        maps, _ = interpreter.surrogate(images, torch.tensor([0, 1, 2]))
        (gradient,) = torch.autograd.grad(maps.pow(2).sum(), images)
    assert gradient.abs().sum() > 0


# ------------------------------------------------------------------------------------ adaptive λ
def test_adaptive_lambda_keeps_samples_independent(model_files: dict[str, Path]) -> None:
    classifier = _load(model_files, "factory")
    interpreter = build_interpreter("grad", classifier)
    config = AttackConfig(eps=0.1, alpha=0.02, pgd_steps=2, adv_steps=6, lam=LambdaSchedule((1.0,)), lam_adaptation=2.0)
    attack = ADV2(classifier, config, interpreter=interpreter)
    images, targets = _images(4), torch.tensor([1, 2, 0, 1])
    batched = attack(images, targets)
    for i in range(4):
        single = attack(images[i : i + 1], targets[i : i + 1], interpreter(images[i : i + 1], seed=0))
        torch.testing.assert_close(single.adversarial, batched.adversarial[i : i + 1], atol=1 / 255 + 1e-6, rtol=0)


@pytest.mark.parametrize(("field", "value"), [("lam_adaptation", 0.5), ("lam_range", (2.0, 3.0)), ("lam_range", "x")])
def test_adaptive_lambda_settings_are_validated(field: str, value: object) -> None:
    with pytest.raises(InputError, match=field):
        AttackConfig(**{field: value})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ CLI
def test_cli_describes_explains_and_evaluates_a_user_model(model_files: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    spec = _spec(model_files, "export")
    flags = ["--input-size", "28", "--channels", "1", "--classes", "zero,one,two"]
    described = runner.invoke(app, ["models", "--describe", spec, *flags, "--json"])
    assert described.exit_code == 0, described.output
    facts = json.loads(described.output)
    assert facts["input"].startswith("1×28×28") and facts["classes"] == 3
    assert facts["interpreters"]["gradcam"].startswith("explain and attack (feature map pool")
    assert facts["interpreters"]["cam"].startswith("unavailable")

    refused = runner.invoke(
        app, ["models", "--describe", f"torchscript:{model_files['torchscript']}", *flags, "--json"]
    )
    assert "ADV² refused" in json.loads(refused.output)["interpreters"]["grad"]

    bare = runner.invoke(app, ["models", "--describe", spec])
    assert bare.exit_code == 2 and "--channels 1 --input-size 28" in bare.output

    data = _folder(tmp_path / "data", ("one", "two"))
    for name in ("one", "two"):
        Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE)) * 255).astype(np.uint8), mode="L").save(
            data / name / "b.png"
        )
    evaluated = runner.invoke(app, ["evaluate", "-m", spec, "-d", str(data), *flags, "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["images"] == 4
    shifted = runner.invoke(app, ["evaluate", "-m", spec, "-d", str(data), "--input-size", "28", "--channels", "1"])
    assert shifted.exit_code == 2 and "cannot be matched to classes by position" in shifted.output

    explained = runner.invoke(
        app,
        [
            "explain",
            *[str(p) for p in sorted(data.rglob("*.png"))[:2]],
            "-o",
            str(tmp_path / "maps"),
            "-m",
            spec,
            *flags,
            "-i",
            "gradcam",
            "--json",
        ],
    )
    assert explained.exit_code == 0, explained.output
    rows = json.loads(explained.output)["images"]
    assert len(rows) == 2 and rows[0]["map_shape"] == [14, 14]


# ------------------------------------------------------------------------------------ RTS for a user's model
def _noise_folder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            picture = (rng.random((SIZE, SIZE)) * 80 + 60 * k).astype(np.uint8)
            Image.fromarray(picture, mode="L").save(root / name / f"{i}.png")
    return root


def test_train_rts_on_a_user_folder_resumes_and_serves_rts(
    model_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from underfire.training import rts as rts_training

    data = _noise_folder(tmp_path / "data")
    table = {"input_size": SIZE, "channels": 1, "classes": list(CLASSES)}
    config = rts_training.RtsTrainConfig(
        model=_spec(model_files, "export"),
        dataset=str(data),
        epochs=2,
        batch_size=4,
        encoder_epochs=1,
        decoder_width=8,
        model_options=table,
    )
    # an uninterrupted run
    whole = rts_training.train_rts(config, tmp_path / "whole.safetensors", progress=False)
    assert set(whole.metrics) == {"true_mask_area", "fake_mask_area"}  # no object masks: no pointing game
    # a run killed in its second epoch, then started again
    real = rts_training.fake_selectors
    calls = {"n": 0}

    def dies_in_epoch_two(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] > 3 + 1:  # 12 images: 10 train, in 3 batches per epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rts_training, "fake_selectors", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        rts_training.train_rts(config, tmp_path / "resumed.safetensors", progress=False)
    assert rts_training.progress_path(tmp_path / "resumed.safetensors").is_file()
    monkeypatch.setattr(rts_training, "fake_selectors", real)
    resumed = rts_training.train_rts(config, tmp_path / "resumed.safetensors", progress=False)
    assert not rts_training.progress_path(tmp_path / "resumed.safetensors").exists()
    assert resumed.final_losses == whole.final_losses
    from underfire.interpreters.rts import load_saliency_network

    a, _ = load_saliency_network(tmp_path / "whole.safetensors")
    b, _ = load_saliency_network(tmp_path / "resumed.safetensors")
    for (name, left), (_, right) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(left, right), name  # bit for bit: the resumed run is the same run
    # the model's metadata serves it to the RTS interpreter (the CLI's --rts)
    classifier = _load(model_files, "export", rts=str(tmp_path / "whole.safetensors"))
    maps = build_interpreter("rts", classifier)(_images(), torch.tensor([0, 1, 2]))
    assert maps.shape == (3, 1, SIZE // 4, SIZE // 4)
