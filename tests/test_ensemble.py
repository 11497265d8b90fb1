"""The ensemble interpreter (the adaptive attack on an ensemble defence): its ADV² distance
and its gradient are the weighted sum of its members', its map splits back into theirs exactly,
its attack terms are theirs, and it runs through the attack API and the CLI like any interpreter."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from underfire import Classifier
from underfire.attacks import ADV2, AttackConfig
from underfire.cli import app
from underfire.errors import InputError
from underfire.interpreters import Ensemble, Mask, MaskConfig, build_interpreter

SIZE = 32


def tiny_classifier() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()
    with torch.no_grad():
        net[-1].weight.mul_(30)
    return Classifier(net, input_size=SIZE, num_classes=4)


def batch(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def distance(maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (maps - target).pow(2).flatten(1).mean(1)


def test_the_distance_and_its_gradient_are_the_weighted_sum_of_the_members() -> None:
    clf = tiny_classifier()
    ensemble = Ensemble(clf, members=("grad", "cam"), weights=(1.0, 3.0))
    classes = torch.tensor([0, 1, 2])
    target = ensemble(batch(seed=1), classes)
    x = batch().requires_grad_(True)
    with clf.frozen():
        maps, _ = ensemble.surrogate(x, classes)
        assert maps.shape == (3, 1, SIZE, 2 * SIZE)
        (ours,) = torch.autograd.grad(distance(maps, target).sum(), x)
        shapes = ensemble.member_shapes(x)
        assert shapes == [(SIZE, SIZE), (SIZE // 2, SIZE // 2)]
        parts = []
        for member, share, member_target in zip(ensemble.members, ensemble.shares, ensemble.split(target, shapes)):
            member_maps, _ = member.surrogate(x, classes)
            parts.append(share * distance(member_maps, member_target))
        (expected,) = torch.autograd.grad(sum(parts).sum(), x)
    assert ensemble.shares == (1 / 6, 1 / 2)
    assert torch.allclose(distance(maps, target), sum(parts).detach(), atol=1e-6)
    assert ours.abs().sum() > 0
    assert torch.allclose(ours, expected, atol=1e-6, rtol=1e-4)


def test_only_the_first_member_pays_for_the_logits() -> None:
    """The ensemble's per-step call: the first member's surrogate_and_logits, the others' surrogate
    alone (MASK's own would add a classifier forward whose logits the attack drops); same values."""
    clf = tiny_classifier()
    ensemble = Ensemble(clf, members=("grad", "mask"))
    x, classes = batch(2), torch.tensor([0, 1])
    with clf.frozen():  # one-time forwards (map sizes, MASK's first call) before counting
        ensemble.surrogate_and_logits(x, classes, ensemble.initial_state(0, x.device))
    calls = []
    hook = clf.network.register_forward_hook(lambda *_: calls.append(1))
    try:
        with clf.frozen():
            state = ensemble.initial_state(0, x.device)
            maps, logits, after = ensemble.surrogate_and_logits(x, classes, state)
            ours = len(calls)
            calls.clear()
            grad_maps, grad_logits, _ = ensemble.members[0].surrogate_and_logits(x, classes, state.members[0])
            mask_maps, _ = ensemble.members[1].surrogate(x, classes, state.members[1])
            theirs = len(calls)
            calls.clear()
            ensemble.members[1].surrogate_and_logits(x, classes, state.members[1])
            mask_alone = len(calls)
            calls.clear()
            ensemble.members[1].surrogate(x, classes, state.members[1])
    finally:
        hook.remove()
    assert ours == theirs and mask_alone == len(calls) + 1
    assert torch.equal(logits, grad_logits) and torch.equal(maps, ensemble.tile([grad_maps, mask_maps]))
    assert torch.equal(logits, clf(x))


def test_split_inverts_tile_exactly_and_benign_tiles_are_the_members_maps() -> None:
    clf = tiny_classifier()
    ensemble = Ensemble(clf, members=("cam", "grad"), weights=(2.0, 1.0))
    x, classes = batch(), torch.tensor([3, 2, 1])
    maps = ensemble(x, classes)
    members = [build_interpreter(name, clf)(x, classes) for name in ("cam", "grad")]
    split = ensemble.split(maps, ensemble.member_shapes(x))
    for got, expected in zip(split, members):
        assert torch.allclose(got, expected, atol=1e-6)
    assert 0 <= maps.min() and maps.max() <= 1


def test_attack_terms_are_the_members_at_their_share() -> None:
    clf = tiny_classifier()
    ensemble = Ensemble(clf, members=("grad", "mask"))
    mask = ensemble.members[1]
    assert isinstance(mask, Mask) and mask.config.evidence_weight > 0
    x, classes = batch(2).requires_grad_(True), torch.tensor([0, 1])
    target = ensemble(batch(2, seed=3), classes)
    with clf.frozen():
        _, _, state = ensemble.surrogate_and_logits(x, classes, ensemble.initial_state(0, x.device))
        terms = ensemble.attack_terms("joint", x, classes, target, state)
        own = mask.attack_terms(
            "joint", x, classes, ensemble.split(target, ensemble.member_shapes(x))[1], state.members[1]
        )
    assert terms is not None and own is not None and terms.extra is None
    assert torch.allclose(terms.interpretation, ensemble.shares[1] * own.interpretation)


def test_the_detector_term_is_the_detectors_l1_score_of_the_members_surrogate_maps() -> None:
    """detector_weight adds w × the mean pairwise L1 of the members' maps on the coarsest grid
    (by hand here: GRAD's 32x32 map area-averaged to CAM's 16x16), with a non-zero input gradient."""
    clf = tiny_classifier()
    plain = Ensemble(clf, members=("grad", "cam"))
    watched = Ensemble(clf, members=("grad", "cam"), detector_weight=0.5)
    x, classes = batch(2).requires_grad_(True), torch.tensor([0, 1])
    target = plain(batch(2, seed=3), classes)
    with clf.frozen():
        _, _, state = watched.surrogate_and_logits(x, classes, watched.initial_state(0, x.device))
        terms = watched.attack_terms("joint", x, classes, target, state)
        assert plain.attack_terms("joint", x, classes, target, state) is None  # neither member adds a term
        grad_maps, _ = watched.members[0].surrogate(x, classes)
        cam_maps, _ = watched.members[1].surrogate(x, classes)
        pooled = grad_maps.reshape(2, 1, 16, 2, 16, 2).mean(dim=(3, 5))
        expected = 0.5 * (pooled - cam_maps).abs().flatten(1).mean(1)
        assert terms is not None and terms.extra is None
        assert torch.allclose(terms.interpretation, expected, atol=1e-6)
        (gradient,) = torch.autograd.grad(terms.interpretation.sum(), x)
    assert gradient.abs().sum() > 0
    assert watched.attack_terms("warm_start", x, classes, target) is None  # no maps before stage 2


def test_the_soft_iou_detector_term_is_the_detectors_soft_iou_score_with_an_input_gradient() -> None:
    from underfire.metrics import soft_iou_top_k

    clf = tiny_classifier()
    watched = Ensemble(clf, members=("grad", "cam"), detector_weight=0.5, detector_score="soft_iou")
    x, classes = batch(2).requires_grad_(True), torch.tensor([0, 1])
    target = watched(batch(2, seed=3), classes)
    with clf.frozen():
        _, _, state = watched.surrogate_and_logits(x, classes, watched.initial_state(0, x.device))
        terms = watched.attack_terms("joint", x, classes, target, state)
        grad_maps, _ = watched.members[0].surrogate(x, classes)
        cam_maps, _ = watched.members[1].surrogate(x, classes)
        pooled = grad_maps.reshape(2, 1, 16, 2, 16, 2).mean(dim=(3, 5))
        expected = 0.5 * (1.0 - soft_iou_top_k(pooled, cam_maps).mean(1))
        assert terms is not None and torch.allclose(terms.interpretation, expected, atol=1e-6)
        (gradient,) = torch.autograd.grad(terms.interpretation.sum(), x)
    assert gradient.abs().sum() > 0


def test_the_detector_term_makes_adv2_keep_the_members_in_agreement() -> None:
    """On the built-in ResNet, 4 images: with a heavy detector term the adversarial maps of GRAD
    and CAM disagree less (the detector's l1 score) than without it, every attack still succeeding."""
    import underfire as uf
    from underfire.detection import DetectorConfig, EnsembleDetector

    clf = uf.load_model("shapes-resnet")
    x, labels, _ = uf.ShapesDataset("test").tensors(range(4))
    targets = (labels + 1) % clf.num_classes
    config = AttackConfig(pgd_steps=20, adv_steps=40, lam=[5.0, 10.0], confidence=0.5)
    detector = EnsembleDetector(clf, DetectorConfig(members=("grad", "cam"), score="l1"))
    scores = {}
    for weight in (0.0, 20.0):
        ensemble = Ensemble(clf, members=("grad", "cam"), detector_weight=weight)
        adversarial = ADV2(clf, config, interpreter=ensemble)(x, targets).adversarial
        assert torch.equal(clf(adversarial).argmax(1), targets)
        scores[weight] = detector.scores(adversarial).mean().item()
    assert scores[20.0] < 0.9 * scores[0.0], scores


def test_adv2_against_the_ensemble_keeps_every_members_map_closer_than_pgd() -> None:
    """On the built-in ResNet (a real trained model), 4 images, a short schedule."""
    import underfire as uf
    from underfire.attacks import PGD

    clf = uf.load_model("shapes-resnet")
    x, labels, _ = uf.ShapesDataset("test").tensors(range(4))
    targets = (labels + 1) % clf.num_classes
    ensemble = Ensemble(clf, members=("grad", "cam"))
    benign = ensemble(x, labels)
    config = AttackConfig(pgd_steps=20, adv_steps=40, lam=[5.0, 10.0], confidence=0.5)
    adversarial = ADV2(clf, config, interpreter=ensemble)(x, targets).adversarial
    pgd = PGD(clf, config)(x, targets).adversarial
    assert (adversarial - x).abs().max() <= config.eps + 1e-6
    assert torch.equal(clf(adversarial).argmax(1), targets)
    shapes = ensemble.member_shapes(x)
    for name, ours, theirs, reference in zip(
        ensemble.names,
        ensemble.split(ensemble(adversarial, targets), shapes),
        ensemble.split(ensemble(pgd, targets), shapes),
        ensemble.split(benign, shapes),
    ):
        assert (distance(ours, reference) < distance(theirs, reference) / 2).all(), name


def test_bad_ensembles_are_one_line() -> None:
    clf = tiny_classifier()
    for options, message in (
        ({"members": ("grad",)}, "at least two"),
        ({"members": ("grad", "grad")}, "distinct"),
        ({"members": ("grad", "ensemble")}, "distinct"),
        ({"members": ("grad", "cam"), "weights": (1.0,)}, "one positive weight"),
        ({"members": ("grad", "cam"), "weights": (1.0, -2.0)}, "one positive weight"),
        ({"members": ("grad", "nope")}, "nope"),
        ({"members": ("grad", "cam"), "detector_weight": -1.0}, "detector_weight"),
        ({"members": ("grad", "cam"), "detector_weight": float("nan")}, "detector_weight"),
        ({"members": ("grad", "cam"), "detector_score": "iou"}, "detector_score must be one of l1, soft_iou"),
    ):
        with pytest.raises(InputError, match=message) as error:
            build_interpreter("ensemble", clf, **options)
        assert "\n" not in str(error.value)


def test_members_get_the_run_preset_and_the_cli_takes_the_options(tmp_path) -> None:
    from underfire.presets import surrogate_options

    clf = tiny_classifier()
    judged = build_interpreter("ensemble", clf, members="grad,mask")
    assert judged.names == ("grad", "mask") and judged.members[0].relu.relative is False
    # the attacked copy of a quick ensemble differentiates the members' quick surrogates
    quick = judged.with_options(**surrogate_options("quick", "ensemble"))
    assert quick.names == ("grad", "mask") and quick.members[0].relu.relative is True
    assert quick.members[1].config == build_interpreter("mask", clf).config
    assert isinstance(build_interpreter("mask", clf).config, MaskConfig)

    import numpy as np
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(image)
    result = CliRunner().invoke(
        app,
        [
            "explain",
            str(image),
            "-i",
            "ensemble",
            "-O",
            "members=grad,cam",
            "-O",
            "weights=1,2",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = np.load(next((tmp_path / "out").glob("*.npy")))
    assert saved.shape == (64, 128)


def test_a_run_config_attacks_the_ensemble_and_measures_transfer_to_its_members(tmp_path) -> None:
    import sqlite3

    config = tmp_path / "e.toml"
    config.write_text(
        '[experiment]\nname = "ens"\nimages = 2\nbatch_size = 2\ndata = "shapes:test"\nmodels = ["shapes-resnet"]\n'
        'interpreters = ["grad", "ensemble"]\nattacks = ["pgd", "adv2"]\ntransfer = true\n'
        '[interpreters.ensemble]\nmembers = ["grad", "cam"]\nweights = [2, 1]\n'
        "[overrides]\npgd_steps = 2\nadv_steps = 2\n"
    )
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as connection:
        options = {
            json
            for (json,) in connection.execute("SELECT interpreter_options FROM results WHERE interpreter = 'ensemble'")
        }
        pairs = set(connection.execute("SELECT source_interpreter, target_interpreter FROM transfer"))
    assert any('"weights": [2.0, 1.0]' in text or '"weights": [2, 1]' in text for text in options), options
    assert ("ensemble", "grad") in pairs and ("grad", "ensemble") in pairs


def test_drawn_target_maps_are_refused_for_the_ensemble_before_any_work(tmp_path) -> None:
    config = tmp_path / "e.toml"
    config.write_text(
        '[experiment]\nname = "ens"\nimages = 2\ndata = "shapes:test"\nmodels = ["shapes-resnet"]\n'
        'interpreters = ["ensemble"]\ntarget_maps = ["benign", "circle"]\n'
        '[interpreters.ensemble]\nmembers = ["grad", "cam"]\n'
    )
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "'circle'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_members_whose_maps_do_not_divide_the_grid_are_one_line() -> None:
    clf = tiny_classifier()
    ensemble = Ensemble(clf, members=("grad", "mask"))
    odd = torch.rand(1, 3, 30, 30)  # GRAD 30x30, MASK a quarter: 7x7 does not divide 30
    if 30 % ensemble.members[1].map_shape(odd)[0] == 0:
        pytest.skip("MASK's grid divides 30 here")
    with pytest.raises(InputError, match="do not divide"):
        ensemble(odd, torch.tensor([0]))
