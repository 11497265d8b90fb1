"""The configuration of ``underfire demo``: both built-in models, four interpreters (one of each
class of the paper), PGD and ADV², benign target maps, transfer on."""

from __future__ import annotations

from .config import ExperimentConfig

#: Images per model by default: enough for every table and figure of the report to mean something,
#: few enough that the demo finishes in minutes on a laptop CPU (docs/tuning.md has its timings).
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
