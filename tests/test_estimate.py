"""``--estimate``'s pilots: MASK's solves are cut with the steps, so a pilot costs a few percent
of what it predicts."""

from __future__ import annotations

from pathlib import Path

from underfire.interpreters import Mask, build_interpreter
from underfire.models import load_model
from underfire.runs import ExperimentConfig
from underfire.runs.estimate import estimate_experiment, pilot_model
from underfire.runs.pilot import SCALES


def test_mask_pilots_cut_every_solve_in_proportion() -> None:
    clf = load_model("shapes-resnet")
    mask = build_interpreter("mask", clf, resolve_every=50, init_steps=100)
    assert mask.pilot_options(0.02) == {"iterations": 6, "init_steps": 2, "resolve_every": 1}
    assert build_interpreter("cam", clf).pilot_options(0.02) == {}


def test_the_estimate_never_runs_a_full_mask_solve(tmp_path: Path, monkeypatch) -> None:
    """Counted, not timed: with the solves cut, the pilots evaluate MASK's objective fewer times
    than one benign solve of 300 iterations would, for the three pilot passes together."""
    calls = []
    original = Mask.objective

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - counts MASK's iterations
        calls.append(self.config.iterations)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Mask, "objective", counting)
    config = ExperimentConfig.from_mapping(
        {
            "experiment": {
                "images": 2,
                "batch_size": 2,
                "models": ["shapes-resnet"],
                "interpreters": ["mask"],
                "attacks": ["pgd"],
                "transfer": False,
            }
        }
    )
    estimate = estimate_experiment(config, tmp_path / "run")
    assert estimate.units == 1 and estimate.seconds > 0
    assert 0 < len(calls) < 300
    assert set(calls) <= {max(1, round(300 * scale)) for scale in SCALES}
    assert not (tmp_path / "run").exists()  # an estimate writes nothing


def test_pilot_models_leave_the_run_models_as_they_are() -> None:
    from underfire.runs.plan import prepare_models

    config = ExperimentConfig(images=2, batch_size=2, models=("shapes-resnet",), interpreters=("mask", "cam"))
    (model,) = prepare_models(config)
    pilot = pilot_model(model, 0.05)
    assert pilot.interpreters["mask"].config.iterations == 15 and model.interpreters["mask"].config.iterations == 300
    assert pilot.interpreters["cam"] is model.interpreters["cam"]
