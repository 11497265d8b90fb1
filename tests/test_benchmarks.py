"""Smoke test of ``benchmarks/`` on a tiny model: the comparisons run and compare equal things.

The timings themselves are not checked (a test machine is no benchmark machine); what is checked
is that each side of a comparison computes the same result, which is what makes a ratio honest.
Skipped where the ``bench`` extra (captum, torchattacks, ...) is not installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from test_surrogate_logits import SIZE, tiny_classifier

from underfire import Classifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks/ package

common = pytest.importorskip("benchmarks.common")


@pytest.fixture(scope="module")
def tiny() -> tuple[Classifier, torch.Tensor, torch.Tensor, torch.Tensor]:
    clf = tiny_classifier()  # the in-place-ReLU net of test_surrogate_logits
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels = clf.predict(images).argmax(1)
    return clf, images, labels, (labels + 1) % 4


def test_timing_helpers() -> None:
    calls: list[str] = []
    samples = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then alternating order
    assert set(samples) == {"a", "b"} and all(len(v) == 3 for v in samples.values())
    assert common.marginal([5.0, 7.0], [1.0, 1.0], 2) == [2.0, 3.0]
    row = common.make_row("s", "n", "o", "t", [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], target="ratio <= 1.0")
    assert row.ratio == 2.0 and row.met is False
    row = common.make_row("s", "n", "o", "t", [1.0], [4.0], target="speedup >= 3.0", speedup=True)
    assert row.ratio == 4.0 and row.met is True


def test_inline_limit_math_equals_adv2(tiny) -> None:
    """The 'against the limit' reference computes exactly ADV²'s iterates."""
    from benchmarks.limit import run_limit

    clf, images, labels, targets = tiny
    rows = run_limit(
        clf,
        images,
        labels,
        targets,
        repeats=1,
        warmup=0,
        quick=True,
        cases=("grad", "cam", "mask"),
        log=lambda _: None,
    )
    assert len(rows) == 3
    for row in rows:
        assert row.agreement == "final iterates: max abs diff 0.0e+00", (row.name, row.agreement)


def test_step_cost_mask_with_evidence_is_the_quick_presets_step(tiny) -> None:
    """The step-cost row ``mask+evidence`` takes ADV²'s own first stage-2 step with the quick preset's
    evidence weight (the unrolled surrogate plus ``Mask.evidence_loss``), not a look-alike."""
    from benchmarks.scaling import ALPHA, EPS, LAMBDA, MASK_WITH_EVIDENCE, make_step
    from underfire.attacks import ADV2, AttackConfig, LambdaSchedule
    from underfire.interpreters import MaskConfig, build_interpreter

    clf, images, _, targets = tiny
    step = make_step(MASK_WITH_EVIDENCE, clf, images, targets)
    interpreter = build_interpreter("mask", clf, config=MaskConfig(init_steps=5))
    assert interpreter.config.evidence_weight == MaskConfig().evidence_weight > 0  # quick = MASK's defaults
    maps = torch.rand((images.shape[0], 1, *interpreter.map_shape(images)), generator=torch.Generator().manual_seed(1))
    weight = interpreter.config.evidence_weight
    config = AttackConfig(eps=EPS, alpha=ALPHA, pgd_steps=0, adv_steps=1, lam=LambdaSchedule((LAMBDA,)))
    expected = ADV2(clf, config, interpreter=interpreter)(images, targets, maps).last
    plain = make_step("mask", clf, images, targets)()
    torch.testing.assert_close(step(), expected, rtol=0, atol=0)
    assert weight > 0 and not torch.equal(plain, expected)


def test_peer_comparisons_agree(tiny) -> None:
    pytest.importorskip("captum")
    pytest.importorskip("torchattacks")
    from benchmarks.peers import grad_vs_captum, pgd_vs_torchattacks

    clf, images, labels, targets = tiny
    row = grad_vs_captum(clf, images, labels, 1, 0, {})
    # "max abs diff X; peer on NCHW: max abs diff Y (mean Z)": identical on the same channels-last
    # batch, equal up to float rounding on the NCHW one
    assert row.agreement.startswith("max abs diff 0.0e+00; peer on NCHW: "), row.agreement
    assert float(row.agreement.split("peer on NCHW: max abs diff ")[1].split()[0]) < 1e-6, row.agreement
    row = pgd_vs_torchattacks(clf, images, labels, targets, 1, 0, True, {})
    assert float(row.agreement.rsplit(" ", 1)[1]) < 1e-6


def test_markdown_report(tmp_path: Path) -> None:
    from benchmarks.run import render_markdown

    row = common.make_row(
        "peers",
        "GRAD map",
        "Grad",
        "captum",
        [1.0, 1.1],
        [1.2, 1.2],
        target="ratio <= 1.0",
        agreement="max abs diff 0",
        setting={"model": "m", "batch": 2, "size": 8},
    )
    payload = {
        "command": "python -m benchmarks.run --quick",
        "environment": {
            "date": "today",
            "cpu": "cpu",
            "cores": 2,
            "threads": 1,
            "device": "cpu",
            "torch": torch.__version__,
            "git_commit": None,
            "load_average": [0.1],
            "seconds": 1.0,
        },
        "rows": [row.to_json()],
        "scaling": [{"model": "m", "size": 8, "points": [{"method": "pgd", "batch": 1, "images_per_s": 10.0}]}],
        "memory_mib_per_image": {"m": {"pgd": {1: 0.5}}},
    }
    text = render_markdown(payload, argparse.Namespace(scaling_batches=(1, 2)))
    assert "| GRAD map vs captum | ratio ≤ 1.0 | 0.88× | yes |" in text
    assert "| PGD | 10 (0.5) | – |" in text
