"""The configuration of ``underfire demo``: both built-in models, four interpreters (one of each
class of the paper), PGD and ADV², benign target maps, transfer on."""

from __future__ import annotations

from .config import ExperimentConfig

#: Images per model by default, so the whole demo (quick preset) fits in about 10 minutes on a
#: 2-core CPU (measured 2026-12-02: 10 min 31 s wall, one torch thread, the other core busy with
#: the test suite); MASK dominates (its attack, and explaining every ADV² image for the transfer matrix).
DEMO_IMAGES = 12


def demo_config(images: int = DEMO_IMAGES, preset: str = "quick") -> ExperimentConfig:
    """The demo experiment; batches of 6 keep each resumable unit short (under a minute or two)."""
    return ExperimentConfig(
        name="demo",
        seed=0,
        preset=preset,
        eps=8 / 255,
        images=images,
        data="shapes:test",
        batch_size=6,
        target="random",
        target_maps=("benign",),
        models=("shapes-resnet", "shapes-densenet"),
        interpreters=("grad", "cam", "rts", "mask"),
        attacks=("pgd", "adv2"),
        transfer=True,
    )
