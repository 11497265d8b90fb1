"""The adaptive ensemble's ADV² step against the same step with every member computing logits.

``Ensemble.surrogate_and_logits`` takes the logits from its first member and asks the others for
their ``surrogate`` alone; the baseline here is the composition it replaced, every member's
``surrogate_and_logits`` with all but the first one's logits dropped (RTS and MASK each pay a
classifier forward for them). Both steps are ``benchmarks.scaling.make_step``'s (surrogate, the
members' attack terms, MSE to a target map, backward, projection), rounds alternate after
warm-up, and the ratio is the median of the per-round ratios. Both give the same iterates.

    python -m benchmarks.ensemble_step [--model shapes-resnet] [--batch 10] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks import scaling  # noqa: E402
from benchmarks.common import inputs, interleaved, load_classifier, paired_ratio  # noqa: E402
from underfire.interpreters.ensemble import Ensemble, EnsembleState  # noqa: E402


class EveryMemberLogits(Ensemble):
    """The former per-step call: every member's ``surrogate_and_logits``, the first one's logits kept."""

    def surrogate_and_logits(self, images: torch.Tensor, classes: torch.Tensor, state: Any = None) -> Any:
        states = self._states(state)
        self.grid(images)
        results = [m.surrogate_and_logits(images, classes, s) for m, s in zip(self.members, states)]
        maps = tuple(maps for maps, _, _ in results)
        return self.tile(maps), results[0][1], EnsembleState(tuple(s for _, _, s in results), maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-resnet")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    clf = load_classifier(args.model)
    images, _, targets = inputs(clf, args.batch)
    members = ("grad", "cam", "rts", "mask")
    built = {
        "ours": Ensemble(clf, members=members, weights=(8, 1, 1, 1), member_preset="quick"),
        "every": EveryMemberLogits(clf, members=members, weights=(8, 1, 1, 1), member_preset="quick"),
    }
    steps = {name: scaling.make_step("ensemble", clf, images, targets, ensemble) for name, ensemble in built.items()}
    first = {name: step() for name, step in steps.items()}
    assert torch.equal(first["ours"], first["every"]), "the two steps must give the same iterate"
    samples = interleaved(steps, args.repeats, warmup=1)
    ratio = paired_ratio(samples["ours"], samples["every"])
    median = {name: 1000 * sorted(times)[len(times) // 2] for name, times in samples.items()}
    print(
        f"{args.model}, batch {args.batch}, {torch.get_num_threads()} thread(s), ensemble grad+cam+rts+mask: "
        f"{median['ours']:.0f} ms per step against {median['every']:.0f} ms with every member's logits, "
        f"ratio {ratio.median:.3f} ({ratio.low:.3f}–{ratio.high:.3f}) over {len(samples['ours'])} rounds",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
