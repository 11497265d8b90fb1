"""PGD and ADV²: the budget is never left, targets are reached, selection and λ behave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from underfire import Classifier, InputError
from underfire.attacks import ADV2, PGD, AttackConfig, LambdaSchedule, parse_fraction, project, quantize
from underfire.attacks.core import _descend, map_distance
from underfire.attacks.targets import check_targets, load_user_map, random_targets, shape_maps
from underfire.data import read_image
from underfire.interpreters import build_interpreter
from underfire.metrics import soft_iou_top_k
from underfire.presets import preset
from underfire.visualize import save_png, to_uint8

SIZE = 32


def tiny_classifier(seed: int = 0) -> Classifier:
    """A small conv net with a GAP→linear head, so every interpreter applies."""
    torch.manual_seed(seed)
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
        net[-1].weight.mul_(30)  # make the logits depend strongly on the input
    return Classifier(net, input_size=SIZE, num_classes=4)


def batch(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Off-grid float images (not multiples of 1/255), the hard case for 8-bit projection."""
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def in_budget(adversarial: torch.Tensor, origin: torch.Tensor, eps: float) -> bool:
    return bool(
        ((adversarial - origin).abs().max() <= eps + 1e-6) and adversarial.min() >= 0 and adversarial.max() <= 1
    )


def on_grid(x: torch.Tensor) -> bool:
    return bool(torch.allclose(x * 255, torch.round(x * 255), atol=1e-4))


def test_parse_fraction() -> None:
    assert parse_fraction("8/255") == pytest.approx(8 / 255)
    assert parse_fraction("0.031") == pytest.approx(0.031)
    assert parse_fraction(0.5) == 0.5
    with pytest.raises(InputError, match="8/255"):
        parse_fraction("eight")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eps": 0.0}, "eps must be in"),
        ({"eps": -0.1}, "eps must be in"),
        ({"eps": 1.5}, "eps must be in"),
        ({"alpha": 0.0}, "alpha must be in"),
        ({"adv_alpha": 2.0}, "adv_alpha must be in"),
        ({"adv_alpha_final": -1e-3}, "adv_alpha_final must be in"),
        ({"pgd_steps": -1}, "pgd_steps"),
        ({"pgd_steps": 0, "adv_steps": 0}, "at least one step"),
        ({"confidence": 1.0}, "confidence"),
        ({"map_power": 0.0}, "map_power must be a number in"),
        ({"map_power": 1.5}, "map_power must be a number in"),
        ({"map_power": float("nan")}, "map_power must be a number in"),
        ({"map_power": True}, "map_power must be a number in"),
        ({"soft_iou_weight": -0.1}, "soft_iou_weight must be a finite number"),
        ({"soft_iou_weight": float("inf")}, "soft_iou_weight must be a finite number"),
        ({"soft_iou_weight": True}, "soft_iou_weight must be a finite number"),
        ({"restarts": 0}, "restarts must be an integer >= 1"),
        ({"restarts": True}, "restarts must be an integer >= 1"),
        ({"restarts": 1.5}, "restarts must be an integer >= 1"),
        ({"bogus": 1}, "unknown attack option"),
        ({"evidence_weight": 1.0}, "unknown attack option"),  # an option of MASK, not of every attack
    ],
)
def test_bad_configurations_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        AttackConfig().with_overrides(**overrides)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mask", {"evidence_weight": -1.0}, "evidence_weight must be >= 0"),
        ("rts", {"encoder_weight": float("nan")}, "encoder_weight must be finite"),
        ("rts", {"warm_start_encoder_weight": -0.5}, "warm_start_encoder_weight must be finite"),
        ("cam", {"warm_start_encoder_weight": 0.3}, "unknown option 'warm_start_encoder_weight'"),
    ],
)
def test_interpreter_attack_weights_are_validated_options(name: str, options: dict, message: str) -> None:
    """RTS's encoder weights and MASK's evidence weight are options of those interpreters, checked
    when they are built; an interpreter without such a term has no such option."""
    from underfire.interpreters import SaliencyNetwork

    clf = tiny_classifier()
    extra = {"network": SaliencyNetwork(4).eval()} if name == "rts" else {}
    with pytest.raises(InputError, match=message):
        build_interpreter(name, clf, **extra, **options)


def test_stage_two_step_size_decays_from_adv_alpha_to_adv_alpha_final() -> None:
    constant = AttackConfig(alpha=2 / 255, adv_steps=11)
    assert [constant.stage_two_alpha(i) for i in (0, 5, 10)] == [2 / 255] * 3
    decaying = constant.with_overrides(adv_alpha=1 / 255, adv_alpha_final=0.1 / 255)
    sizes = [decaying.stage_two_alpha(i) for i in range(11)]
    assert sizes[0] == pytest.approx(1 / 255) and sizes[-1] == pytest.approx(0.1 / 255)
    assert sizes[5] == pytest.approx(0.55 / 255)  # cosine: half way at the middle step
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))
    assert decaying.stage_two_alpha(50) == pytest.approx(0.1 / 255)  # past the end: the final size


def test_presets_and_their_errors() -> None:
    quick, paper = preset("quick", "cam"), preset("paper", "cam")
    assert quick.pgd_steps + quick.adv_steps < paper.pgd_steps + paper.adv_steps
    assert quick.eps == paper.eps == pytest.approx(8 / 255)
    assert preset("quick", "grad", eps=4 / 255).eps == pytest.approx(4 / 255)
    with pytest.raises(InputError, match="unknown preset"):
        preset("fast", "cam")
    with pytest.raises(InputError, match="unknown interpreter 'lime'"):
        preset("quick", "lime")


def test_family_quick_presets_compare_root_maps_and_the_rest_keep_the_paper_distance() -> None:
    """Gradient × Input, IG, DeepLIFT and LRP attack the maps' square roots under ``quick``, LRP
    with the soft top-k IoU term and the exact ReLU derivative; GRAD and every ``paper`` preset
    keep the squared difference of the maps (docs/tuning.md). Only LRP's ``quick`` runs twice."""
    for name in ("inputxgrad", "ig", "deeplift", "lrp"):
        assert preset("quick", name).map_power == 0.5
        assert preset("paper", name).map_power == 1.0
        assert preset("paper", name).soft_iou_weight == 0.0
    for name in ("grad", "cam", "rts", "mask"):
        assert preset("quick", name).map_power == 1.0
    assert [preset("quick", name).soft_iou_weight for name in ("inputxgrad", "ig", "deeplift", "grad", "lrp")] == [
        0,
        0,
        0,
        0,
        0.2,
    ]
    assert [preset("quick", name).restarts for name in ("inputxgrad", "ig", "deeplift", "grad", "lrp")] == [
        1,
        1,
        1,
        1,
        2,
    ]
    assert preset("paper", "lrp").restarts == 1
    assert preset("quick", "lrp").surrogate_options == {"relu": "none"}
    lrp = build_interpreter("lrp", tiny_classifier())
    assert ADV2(lrp.classifier, preset("quick", "lrp"), interpreter=lrp).surrogate.relu.kind == "none"
    assert ADV2(lrp.classifier, preset("paper", "lrp"), interpreter=lrp).surrogate is lrp


def test_map_distance_by_hand_and_why_a_power_below_one() -> None:
    maps = torch.tensor([0.0, 0.25, 1.0, 0.01, 0.5]).view(1, 1, 1, 5)
    target = torch.tensor([1.0, 0.25, 0.0, 0.02, 0.51]).view(1, 1, 1, 5)
    plain = (1 + 0 + 1 + 0.01**2 + 0.01**2) / 5
    torch.testing.assert_close(map_distance(maps, target), torch.tensor([plain]))
    floor = 1e-4
    root = lambda v: (floor + (1 - floor) * v) ** 0.5  # noqa: E731
    by_hand = sum((root(a) - root(b)) ** 2 for a, b in zip(maps.flatten().tolist(), target.flatten().tolist())) / 5
    torch.testing.assert_close(map_distance(maps, target, 0.5), torch.tensor([by_hand]))
    assert map_distance(target, target, 0.5).item() == 0.0
    # the faint pixel (0.01 vs 0.02) and the bright one (0.5 vs 0.51) differ by the same 0.01:
    # the plain distance pulls them equally, the root pulls the faint one several times harder
    x = maps.clone().requires_grad_(True)
    (flat,) = torch.autograd.grad(map_distance(x, target).sum(), x)
    x = maps.clone().requires_grad_(True)
    (rooted,) = torch.autograd.grad(map_distance(x, target, 0.5).sum(), x)
    assert flat[0, 0, 0, 3] == pytest.approx(flat[0, 0, 0, 4].item())
    assert rooted[0, 0, 0, 3].abs() > 3 * rooted[0, 0, 0, 4].abs()
    assert torch.isfinite(rooted).all() and rooted[0, 0, 0, 0] != 0  # finite where the map is 0


def test_the_soft_iou_term_by_hand_and_its_pull_toward_the_target_top_k_set() -> None:
    floor = 1e-4
    maps = torch.tensor([0.9, 0.05, 0.3, 0.02, 1.0, 0.0, 0.1, 0.2, 0.04, 0.5]).view(1, 1, 2, 5)
    target = torch.tensor([1.0, 0.3, 0.05, 0.02, 0.8, 0.0, 0.1, 0.2, 0.04, 0.5]).view(1, 1, 2, 5)
    root = lambda m: (floor + (1 - floor) * m) ** 0.5  # noqa: E731
    by_hand = map_distance(maps, target, 0.5) + 0.2 * (1 - soft_iou_top_k(root(maps), root(target)).mean(1))
    torch.testing.assert_close(map_distance(maps, target, 0.5, 0.2), by_hand)
    assert map_distance(maps, target, 0.5, 0.2) > map_distance(maps, target, 0.5)
    assert map_distance(target, target, 0.5, 0.2).item() == pytest.approx(0.0, abs=1e-6)
    # pixel 1 is in the target's top 40 % and not in the map's, pixel 2 the other way round: the
    # term pulls the first up and the second down
    x = maps.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(map_distance(x, target, 1.0, 1.0).sum() - map_distance(x, target).sum(), x)
    assert gradient.flatten()[1] < 0 < gradient.flatten()[2]


def test_map_power_changes_the_trajectory_only_through_the_interpretation_loss() -> None:
    clf = tiny_classifier()
    explainer = build_interpreter("grad", clf)
    images = batch(4)
    targets = (clf.predict(images).argmax(1) + 2) % 4
    base = AttackConfig(eps=8 / 255, alpha=1 / 255, pgd_steps=3, adv_steps=6, lam=LambdaSchedule((50.0,)))
    square = ADV2(clf, base, interpreter=explainer)(images, targets)
    root = ADV2(clf, base.with_overrides(map_power=0.5), interpreter=explainer)(images, targets)
    assert not torch.equal(square.last, root.last)
    off = base.with_overrides(lam=LambdaSchedule((0.0,)))
    assert torch.equal(
        ADV2(clf, off, interpreter=explainer)(images, targets).last,
        ADV2(clf, off.with_overrides(map_power=0.5), interpreter=explainer)(images, targets).last,
    )
    soft = ADV2(clf, base.with_overrides(soft_iou_weight=0.5), interpreter=explainer)(images, targets)
    assert not torch.equal(square.last, soft.last)
    assert torch.equal(
        ADV2(clf, off, interpreter=explainer)(images, targets).last,
        ADV2(clf, off.with_overrides(soft_iou_weight=0.5), interpreter=explainer)(images, targets).last,
    )


def test_restarts_keep_each_samples_best_run() -> None:
    """With restarts = 2 each sample returns the better of the configured run and a run from the
    random start seeded seed + 1: successful first, then the smaller map distance (ADV²) or the
    higher p(c_t) (PGD)."""
    clf = tiny_classifier()
    explainer = build_interpreter("cam", clf)
    images = batch(8)
    targets = (clf.predict(images).argmax(1) + 2) % 4
    base = AttackConfig(eps=0.3, alpha=0.075, pgd_steps=3, adv_steps=6, lam=LambdaSchedule((50.0,)), confidence=0.6)
    first = ADV2(clf, base, interpreter=explainer)(images, targets)
    second = ADV2(clf, base.with_overrides(random_start=True, seed=1), interpreter=explainer)(images, targets)
    best = ADV2(clf, base.with_overrides(restarts=2), interpreter=explainer)(images, targets)
    from_second = [
        bool(torch.equal(best.adversarial[i], second.adversarial[i]))
        and not torch.equal(best.adversarial[i], first.adversarial[i])
        for i in range(8)
    ]
    from_first = [bool(torch.equal(best.adversarial[i], first.adversarial[i])) for i in range(8)]
    assert all(a or b for a, b in zip(from_first, from_second)) and any(from_first) and any(from_second)
    both = first.success & second.success & ~torch.isnan(first.map_distance) & ~torch.isnan(second.map_distance)
    assert both.any()
    torch.testing.assert_close(best.map_distance[both], torch.minimum(first.map_distance, second.map_distance)[both])
    assert torch.equal(best.success, first.success | second.success)

    pgd = base.with_overrides(adv_steps=0, pgd_steps=1, eps=8 / 255, alpha=1 / 255)
    plain, other = (
        PGD(clf, pgd)(images, targets),
        PGD(clf, pgd.with_overrides(random_start=True, seed=1))(images, targets),
    )
    kept = PGD(clf, pgd.with_overrides(restarts=2))(images, targets)
    assert torch.equal(kept.success, plain.success | other.success)
    same = plain.success == other.success
    assert (other.confidence > plain.confidence)[same].any() and (other.confidence < plain.confidence)[same].any()
    torch.testing.assert_close(kept.confidence[same], torch.maximum(plain.confidence, other.confidence)[same])
    assert torch.equal(
        PGD(clf, pgd)(images, targets).adversarial, plain.adversarial
    )  # restarts = 1 is one run, as before
    assert PGD.configure([base.with_overrides(restarts=3)], {}).restarts == 3  # PGD compared with an ADV² gets its runs
    # ... and the most runs of any it is compared with, not only the longest schedule's (DeepLIFT's
    # and LRP's quick presets tie on steps; LRP's runs twice)
    compared = PGD.configure([preset("quick", "deeplift"), preset("quick", "lrp")], {})
    assert (compared.pgd_steps, compared.adv_steps, compared.restarts) == (1060, 0, 2)


def test_lambda_schedules() -> None:
    linear = LambdaSchedule((5.0, 10.0))
    assert linear.at(0, 11) == 5.0 and linear.at(10, 11) == 10.0 and linear.at(5, 11) == 7.5
    staged = LambdaSchedule((1.0, 2.0, 3.0), "staged", (2, 1, 1))
    assert [staged.at(step, 8) for step in range(8)] == [1, 1, 1, 1, 2, 2, 3, 3]
    with pytest.raises(InputError):
        LambdaSchedule((1.0,), "staged", None)


def test_project_and_quantize_keep_the_budget() -> None:
    origin = batch()
    eps = 8 / 255
    wild = origin + torch.randn(origin.shape, generator=torch.Generator().manual_seed(1))
    projected = project(wild, origin, eps)
    assert in_budget(projected, origin, eps)
    quantized = quantize(projected, origin, eps)
    assert in_budget(quantized, origin, eps) and on_grid(quantized)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_reaches_targets_on_a_tiny_model_within_budget(random_start: bool) -> None:
    clf = tiny_classifier()
    images = batch()
    logits = clf.predict(images)
    labels = logits.argmax(1)
    targets = logits.topk(2, dim=1).indices[:, 1]  # the runner-up: reachable on a random net
    config = AttackConfig(eps=0.25, alpha=0.02, pgd_steps=40, adv_steps=0, random_start=random_start)
    result = PGD(clf, config)(images, targets, labels=labels)
    assert result.success.all()
    assert in_budget(result.adversarial, images, config.eps) and on_grid(result.adversarial)
    # success and confidence are those of the returned (8-bit) images
    probabilities = clf.predict(result.adversarial).softmax(1)
    torch.testing.assert_close(result.confidence, probabilities.gather(1, targets[:, None]).squeeze(1))


@pytest.mark.parametrize("interpreter", ["grad", "cam", "gradcam", "smoothgrad", "rts", "mask"])
def test_adv2_stays_within_budget_after_png_round_trip(interpreter: str, tmp_path: Path) -> None:
    clf = tiny_classifier()
    options = {"samples": 2} if interpreter == "smoothgrad" else {}
    if interpreter == "rts":
        from underfire.interpreters import SaliencyNetwork

        options = {"network": SaliencyNetwork(4).eval()}
    if interpreter == "mask":
        from underfire.interpreters import MaskConfig

        options = {"config": MaskConfig(iterations=4, init_steps=2)}
    explainer = build_interpreter(interpreter, clf, **options)
    images = batch(3)
    targets = (clf.predict(images).argmax(1) + 1) % 4
    config = AttackConfig(eps=8 / 255, alpha=2 / 255, pgd_steps=3, adv_steps=3)
    result = ADV2(clf, config, interpreter=explainer)(images, targets)
    assert in_budget(result.adversarial, images, config.eps) and on_grid(result.adversarial)
    # what is saved is what is measured: PNG → reload gives the same tensor, still in budget
    for i in range(3):
        path = save_png(to_uint8(result.adversarial[i]), tmp_path / f"{i}.png")
        reloaded = read_image(path)
        assert torch.equal(reloaded, result.adversarial[i])
        assert in_budget(reloaded[None], images[i : i + 1], config.eps)


def test_best_iterate_selection() -> None:
    """The iterate with the lowest score among the eligible ones is kept, not the last."""
    origin = torch.full((2, 1, 2, 2), 0.5)
    config = AttackConfig(eps=0.5, alpha=0.05, pgd_steps=6, adv_steps=0)
    scores = {0: [5, 4, 1, 3, 3, 3, 2], 1: [5, 4, 3, 2, 9, 0.5, 7]}
    eligible = {0: [True] * 7, 1: [True, True, True, True, True, False, True]}

    seen: list[list[int]] = []

    def objective(x: torch.Tensor, step: int, index: torch.Tensor | None):
        rows = [0, 1] if index is None else index.tolist()
        seen.append(rows)
        loss = x.flatten(1).sum(1)  # descends: every step lowers x by alpha
        score = torch.tensor([scores[i][step] for i in rows], dtype=torch.float32)
        ok = torch.tensor([eligible[i][step] for i in rows])
        return loss, score, ok

    best = origin.clone()
    best_score = torch.full((2,), float("inf"))
    best_step = torch.full((2,), -1)
    last = _descend(origin, origin, config.pgd_steps, config, objective, best, best_score, best_step)
    assert best_step.tolist() == [2, 3]  # sample 1's step 5 scores lower but is not eligible
    torch.testing.assert_close(best[0], torch.full((1, 2, 2), 0.5 - 2 * 0.05))
    torch.testing.assert_close(best[1], torch.full((1, 2, 2), 0.5 - 3 * 0.05))
    torch.testing.assert_close(last, torch.full((2, 1, 2, 2), 0.5 - 6 * 0.05))
    assert seen == [[0, 1]] * 7

    # early stopping, traced by hand: sample 0 meets the goal (best 1 <= 3.5) at step 2 and has not
    # improved for 2 steps after step 4, so it leaves; sample 1 (best 2 at step 3) leaves after step 5
    seen.clear()
    best, best_score, best_step = origin.clone(), torch.full((2,), float("inf")), torch.full((2,), -1)
    stopping = config.with_overrides(stop_patience=2, stop_tolerance=0.0)
    last = _descend(origin, origin, 6, stopping, objective, best, best_score, best_step, done_below=3.5)
    assert best_step.tolist() == [2, 3]  # the same iterates are kept
    assert seen == [[0, 1]] * 5 + [[1]]  # sample 0 took no step after step 4, sample 1 none after 5
    torch.testing.assert_close(last[0], torch.full((1, 2, 2), 0.5 - 5 * 0.05))
    torch.testing.assert_close(last[1], torch.full((1, 2, 2), 0.5 - 6 * 0.05))


def test_adv2_selection_prefers_qualifying_iterates_then_the_lowest_cross_entropy() -> None:
    """Qualified (c_t with p ≥ confidence) iterates win by map distance; a sample that never
    qualifies returns its lowest-cross-entropy iterate of either stage, not stage 1's by default."""
    clf = tiny_classifier()
    explainer = build_interpreter("cam", clf)
    images = batch(4)
    targets = (clf.predict(images).argmax(1) + 2) % 4
    config = AttackConfig(eps=0.3, alpha=0.075, pgd_steps=3, adv_steps=6, confidence=0.6)
    reachable = ADV2(clf, config, interpreter=explainer)(images, targets)
    hopeless = ADV2(clf, config.with_overrides(confidence=0.999999), interpreter=explainer)(images, targets)
    with clf.frozen(), torch.no_grad():
        probability = clf(hopeless.adversarial).softmax(1).gather(1, targets[:, None]).squeeze(1)
    assert (probability < 0.999999).all()  # nothing qualified at this threshold
    assert torch.isnan(hopeless.map_distance).all()
    qualified = ~torch.isnan(reachable.map_distance)
    assert qualified.any() and (reachable.confidence[qualified] >= 0.6 - 1e-3).all()
    # without a qualifier the answer is the lowest-CE iterate: at least as good as plain PGD's
    # stage 1 alone, and here stage 2 keeps lowering the loss so a stage-2 step is chosen
    stage_one = PGD(clf, config.with_overrides(adv_steps=0))(images, targets)
    ce = lambda x: torch.nn.functional.cross_entropy(clf.predict(x), targets, reduction="none")  # noqa: E731
    assert (ce(hopeless.adversarial) <= ce(stage_one.adversarial) + 1e-3).all()
    assert (hopeless.chosen_step >= config.pgd_steps).any()


def test_lambda_zero_is_exactly_pgd_and_lambda_positive_is_not() -> None:
    clf = tiny_classifier()
    explainer = build_interpreter("cam", clf)
    images = batch(4)
    targets = (clf.predict(images).argmax(1) + 2) % 4
    base = AttackConfig(eps=8 / 255, alpha=1 / 255, pgd_steps=4, adv_steps=8)
    pgd = PGD(clf, base.with_overrides(pgd_steps=12, adv_steps=0))(images, targets)
    zero = ADV2(clf, base.with_overrides(lam=LambdaSchedule((0.0,))), interpreter=explainer)(images, targets)
    positive = ADV2(clf, base.with_overrides(lam=LambdaSchedule((50.0,))), interpreter=explainer)(images, targets)
    assert torch.equal(zero.last, pgd.last)
    assert not torch.equal(positive.last, pgd.last)


def test_mask_evidence_term_is_part_of_the_interpretation_loss() -> None:
    """MASK's evidence term sits inside λ·ℓ_int: with λ = 0 ADV² is still exactly PGD; with λ > 0
    switching the term on changes the trajectory."""
    from underfire.interpreters import MaskConfig

    clf = tiny_classifier()
    explainer = build_interpreter("mask", clf, config=MaskConfig(iterations=4, init_steps=2), evidence_weight=1.0)
    plain = build_interpreter("mask", clf, config=MaskConfig(iterations=4, init_steps=2), evidence_weight=0.0)
    images = batch(3)
    targets = (clf.predict(images).argmax(1) + 2) % 4
    base = AttackConfig(eps=8 / 255, alpha=1 / 255, pgd_steps=2, adv_steps=4)
    pgd = PGD(clf, base.with_overrides(pgd_steps=6, adv_steps=0))(images, targets)
    zero = ADV2(clf, base.with_overrides(lam=LambdaSchedule((0.0,))), interpreter=explainer)(images, targets)
    assert torch.equal(zero.last, pgd.last)
    strong = base.with_overrides(lam=LambdaSchedule((50.0,)))
    with_term = ADV2(clf, strong, interpreter=explainer)(images, targets)
    without = ADV2(clf, strong, interpreter=plain)(images, targets)
    assert not torch.equal(with_term.last, without.last)


def test_warm_start_encoder_term_steers_stage_one_only_for_interpreters_with_an_encoder() -> None:
    """RTS's ``warm_start_encoder_weight`` adds w·CE(RTS encoder, c_t) to stage 1's descent
    (through ``Interpreter.attack_terms``): stage 1 then differs from PGD, equals a hand-written
    descent on CE(f) + w·CE(enc), and still keeps the iterate the classifier scores best;
    interpreters without an encoder add nothing to stage 1."""
    import torch.nn.functional as F

    from underfire.interpreters import SaliencyNetwork

    clf = tiny_classifier()
    network = SaliencyNetwork(4).eval()
    rts = build_interpreter("rts", clf, network=network, warm_start_encoder_weight=2.0)
    unsteered = build_interpreter("rts", clf, network=network, warm_start_encoder_weight=0.0)
    images = batch(4)
    targets = (clf.predict(images).argmax(1) + 1) % 4
    base = AttackConfig(eps=8 / 255, alpha=1 / 255, pgd_steps=5, adv_steps=0)
    pgd = PGD(clf, base)(images, targets)
    plain = ADV2(clf, base, interpreter=unsteered)(images, targets)
    steered = ADV2(clf, base, interpreter=rts)(images, targets)
    assert torch.equal(plain.last, pgd.last)
    assert not torch.equal(steered.last, pgd.last)

    def objective(x: torch.Tensor, _step: int, _index: torch.Tensor | None):
        ce = F.cross_entropy(clf(x), targets, reduction="none")
        encoder = F.cross_entropy(rts.encoder_logits(x), targets, reduction="none")
        return ce + 2.0 * encoder, ce, torch.ones_like(ce, dtype=torch.bool)

    best = images.clone()
    score = torch.full((4,), float("inf"))
    step = torch.full((4,), -1, dtype=torch.long)
    with clf.frozen():
        last = _descend(images, images, 5, base, objective, best, score, step)
    torch.testing.assert_close(steered.last, last, rtol=0, atol=1e-6)
    assert torch.equal(steered.chosen_step, step)

    cam = build_interpreter("cam", clf)
    assert torch.equal(ADV2(clf, base, interpreter=cam)(images, targets).last, pgd.last)


def test_adv2_keeps_the_map_closer_than_pgd_on_the_shipped_model() -> None:
    """A small end-to-end check on the real model: same images, targets and budget."""
    from underfire import ShapesDataset, load_model
    from underfire.metrics import l1_distance

    clf = load_model("shapes-resnet")
    images, labels, _ = ShapesDataset("test").tensors(range(6))
    targets = random_targets(labels, 10, seed=0)
    explainer = build_interpreter("cam", clf)
    benign = explainer(images, labels)
    config = preset("quick", "cam", pgd_steps=20, adv_steps=40)
    adv2 = ADV2(clf, config, interpreter=explainer)(images, targets, benign, labels=labels)
    pgd = PGD(clf, config.with_overrides(pgd_steps=60, adv_steps=0))(images, targets)
    assert adv2.success.float().mean() >= 5 / 6 and pgd.success.float().mean() >= 5 / 6
    adv2_distance = l1_distance(explainer(adv2.adversarial, targets), benign).mean()
    pgd_distance = l1_distance(explainer(pgd.adversarial, targets), benign).mean()
    assert adv2_distance < 0.7 * pgd_distance


def test_argument_errors() -> None:
    clf = tiny_classifier()
    images = batch(2)
    labels = clf.predict(images).argmax(1)
    explainer = build_interpreter("cam", clf)
    attack = ADV2(clf, AttackConfig(pgd_steps=1, adv_steps=1), interpreter=explainer)
    with pytest.raises(InputError, match="equals the true class for image"):
        attack(images, labels, labels=labels)
    with pytest.raises(InputError, match="target maps have shape"):
        attack(images, (labels + 1) % 4, torch.zeros(2, 1, 5, 5))
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        attack(images, (labels + 1) % 4, torch.full((2, 1, 16, 16), 2.0))
    with pytest.raises(InputError, match="unknown class 9"):
        attack(images, [9, 9])
    with pytest.raises(InputError, match="different classifier"):
        ADV2(tiny_classifier(1), interpreter=explainer)
    with pytest.raises(InputError, match="unknown interpreter"):
        build_interpreter("occlusion", clf)


def test_random_targets_never_hit_the_label_and_are_seeded() -> None:
    labels = torch.arange(100) % 10
    first, second = random_targets(labels, 10, 3), random_targets(labels, 10, 3)
    assert torch.equal(first, second) and not (first == labels).any()
    assert not torch.equal(first, random_targets(labels, 10, 4))
    check_targets(labels, first)


def test_target_maps(tmp_path: Path) -> None:
    circles = shape_maps("circle", 3, (16, 16), seed=0)
    assert circles.shape == (3, 1, 16, 16) and set(circles.unique().tolist()) <= {0.0, 1.0}
    assert (circles.flatten(1).sum(1) > 0).all()
    assert torch.equal(circles, shape_maps("circle", 3, (16, 16), seed=0))
    with pytest.raises(InputError, match="circle"):
        shape_maps("star", 1, (8, 8), 0)
    path = tmp_path / "m.npy"
    np.save(path, np.arange(12, dtype=np.float64).reshape(3, 4))
    loaded = load_user_map(path)
    assert loaded.shape == (1, 1, 3, 4) and loaded.min() == 0 and loaded.max() == 1
    np.save(path, np.zeros((2, 2, 2)))
    with pytest.raises(InputError, match="2-D"):
        load_user_map(path)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError, match="cannot read target map"):
        load_user_map(bad)
    Image.new("RGB", (2, 2)).save(tmp_path / "x.png")  # not reachable as a map: wrong format
    with pytest.raises(InputError):
        load_user_map(tmp_path / "x.png")


@pytest.mark.parametrize("name", ["cam", "mask"])
def test_early_stopping_a_batch_equals_each_sample_stopping_alone(name: str) -> None:
    """Per-sample early stopping: in a batch, a sample leaves at the step it would leave at alone,
    so batched results equal per-sample ones, for a stateless interpreter (CAM) and one whose
    surrogate carries per-sample state between steps (MASK: the mask and its Adam moments)."""
    clf = tiny_classifier()
    options = {"iterations": 20, "inner_steps": 2, "init_steps": 3} if name == "mask" else {}
    interpreter = build_interpreter(name, clf, **options)
    images = batch(4)
    targets = (clf.predict(images).argmax(1) + 2) % 4
    config = AttackConfig(eps=0.3, alpha=0.075, pgd_steps=5, adv_steps=15, confidence=0.6, stop_patience=2)
    together = ADV2(clf, config, interpreter=interpreter)(images, targets)
    assert bool(together.success.all())
    for i in range(4):
        alone = ADV2(clf, config, interpreter=interpreter)(images[i : i + 1], targets[i : i + 1])
        assert together.chosen_step[i] == alone.chosen_step[0], i
        torch.testing.assert_close(together.adversarial[i], alone.adversarial[0], rtol=0, atol=1.5 / 255)
    # off (the default), nobody stops: every sample takes every step
    plain = ADV2(clf, config.with_overrides(stop_patience=0), interpreter=interpreter)(images, targets)
    stopped = ~torch.isclose(plain.last, together.last).flatten(1).all(1)
    assert bool(stopped.any())  # some sample's final iterate is where it stopped, not the last step's


def test_momentum_follows_the_accumulated_direction_not_the_last_gradient() -> None:
    """MI-FGSM by hand: ∇ = (1, 1) then (−0.1, 1). Plain sign steps move x₀ down then up again;
    with μ = 0.9 the direction (0.5, 0.5)·0.9 + (−0.1, 1)/1.1 keeps x₀ going down."""
    origin = torch.full((1, 1, 1, 2), 0.5)
    slopes = [torch.tensor([1.0, 1.0]), torch.tensor([-0.1, 1.0]), torch.tensor([0.0, 0.0])]

    def objective(x: torch.Tensor, step: int, index: torch.Tensor | None):
        loss = (x.flatten(1) * slopes[step]).sum(1)
        return loss, loss.detach(), torch.ones(1, dtype=torch.bool)

    def final(momentum: float) -> list[float]:
        config = AttackConfig(eps=0.5, alpha=0.1, pgd_steps=2, adv_steps=0, momentum=momentum)
        best, score, step = origin.clone(), torch.full((1,), float("inf")), torch.full((1,), -1)
        return _descend(origin, origin, 2, config, objective, best, score, step).flatten().tolist()

    assert final(0.0) == pytest.approx([0.5, 0.3])
    assert final(0.9) == pytest.approx([0.3, 0.3])
    with pytest.raises(InputError, match="momentum"):
        AttackConfig(momentum=1.0)
