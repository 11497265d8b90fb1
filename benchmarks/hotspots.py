"""The profiler's hot spots, before and after their fixes, measured side by side in one process.

    python -m benchmarks.hotspots [--batch 16] [--repeats 9] [--out FILE.md]

Each "before" restores the old behaviour for the duration of its call (the old code path is still
reachable through the base contract, or the removed work is put back), so both sides run on the
same model, inputs and machine state, alternating round by round:

1. ADV² on CAM / Grad-CAM ran the classifier twice per step (``clf(x)`` for the prediction loss,
   and again inside the surrogate). Fix: ``Interpreter.surrogate_and_logits``; CAM and Grad-CAM
   return the logits of the forward pass their features come from. Before = the base contract's
   default (surrogate, then ``clf(x)``), which is what the old objective did.
2. ADV² on RTS ran RTS's encoder twice per step (the masks, then ``encoder_logits``). Fix:
   ``Rts.surrogate_and_encoder_logits`` (``SaliencyNetwork.masks_and_logits``: one encoder pass).
3. ADV² on MASK: ``map_shape`` (checking the target maps' shape) solved a whole benign mask (300
   optimiser iterations) for one image on every attack call. Fix: ``Mask.map_shape`` (and
   ``Grad.map_shape``) is arithmetic. Measured: one ADV² call with one stage-2 step.
4. MASK's surrogate blurred the images twice per step (once detached for the inner steps, once
   with the graph for the unrolled step). Fix: one blur, detached for the inner steps. Before =
   the extra blur put back.
5. GRAD's benign map entered ``relu_surrogate("none")`` (a torch function mode that sees every
   torch call of the forward pass in Python) on every call. Fix: only where a surrogate context is
   active (inside an attack), where it is needed to keep benign maps exact.
6. (Not a default.) GRAD with ``share_forward=True``: the ADV² step reuses the smoothed forward's
   logits (one forward and one backward less; the prediction loss then back-propagates the
   smoothed ReLU derivative, so results change slightly).
7. CAM's class map Σ_k w_kc a_k was an ``einsum``, whose per-call planning cost more than the
   product at these sizes. Fix: the same product as one ``bmm`` (bit-identical results).
8. ``Classifier.normalize`` on a channels-last batch broadcast (1, C, 1, 1) constants along the
   innermost, 3-wide dimension (no vectorisation). Fix: the constants laid out like the image
   (cached per size; bit-identical). Measured alone (forward + backward) and on a CAM map.
9. MASK: the replacement blur and the mask's upsampling + blur ran as depthwise convolutions,
   whose backward is slow on the CPU, and the perturbation mixed a channels-last image with a
   one-channel mask. Fix: ``underfire.imaging`` (separable matrix products, equal up to float
   rounding) and the mixing done in NCHW, the result handed to the model in its layout. Before =
   the convolutions and the old mixing put back. Measured on a 20-iteration MASK solve and on
   each blur alone (forward + backward).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from underfire.attacks import ADV2, AttackConfig, LambdaSchedule  # noqa: E402
from underfire.imaging import blur_radius, gaussian_blur, upsample_blurred  # noqa: E402
from underfire.interpreters import CAM, Grad, GradCAM, Interpreter, Mask, MaskConfig, Rts  # noqa: E402
from underfire.interpreters import gradient as gradient_module  # noqa: E402
from underfire.interpreters import mask as mask_module  # noqa: E402
from underfire.models import Classifier  # noqa: E402
from underfire.smoothing import relu_surrogate  # noqa: E402

from .common import inputs, interleaved, load_classifier, marginal, paired_ratio  # noqa: E402


@contextmanager
def plain_logits(interpreter: Interpreter) -> Iterator[None]:
    """Old ADV² objective: ``surrogate`` then a separate ``clf(x)`` (and ``encoder_logits``)."""
    cls = type(interpreter)
    saved = cls.__dict__.get("surrogate_and_logits")
    joint = cls.__dict__.get("surrogate_and_encoder_logits")
    cls.surrogate_and_logits = Interpreter.surrogate_and_logits  # type: ignore[method-assign]
    if joint is not None:
        delattr(cls, "surrogate_and_encoder_logits")
    try:
        yield
    finally:
        if saved is not None:
            cls.surrogate_and_logits = saved  # type: ignore[method-assign]
        else:
            delattr(cls, "surrogate_and_logits")
        if joint is not None:
            cls.surrogate_and_encoder_logits = joint  # type: ignore[attr-defined]


def solving_map_shape() -> Any:
    """Old ``Mask.map_shape``: explain one image to read the map's size."""
    return mock.patch.object(Mask, "map_shape", Interpreter.map_shape)


def extra_blur() -> Any:
    """Old ``Mask.surrogate``: one more blur of the (detached) images per call."""
    current = Mask.surrogate

    def surrogate(self: Mask, images: torch.Tensor, classes: Any, state: Any = None) -> Any:
        with torch.enable_grad():
            self._blur_images(images.detach())
        return current(self, images, classes, state)

    return mock.patch.object(Mask, "surrogate", surrogate)


def always_mode() -> Any:
    """Old ``Grad.explain``: always inside ``relu_surrogate("none")``."""
    return mock.patch.object(gradient_module, "_exact_relu", lambda: relu_surrogate("none"))


def broadcast_constants() -> Any:
    """Old ``Classifier.normalize``: the (1, C, 1, 1) constants whatever the image's layout."""
    return mock.patch.object(Classifier, "_laid_out_constants", lambda self, size: (self.mean, self.std))


def conv_blur(images: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """The old MASK blur: reflection padding and two depthwise 1-D convolutions."""
    height, width = images.shape[-2:]
    radius = blur_radius(sigma, height, width, truncate)
    if sigma <= 0 or radius < 1:
        return images
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


@contextmanager
def convolution_mask() -> Iterator[None]:
    """Old MASK: convolution blurs, interpolation, mixing in the image's (channels-last) layout."""

    def perturb(self: Mask, images: torch.Tensor, blurred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        upsampled = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        upsampled = conv_blur(upsampled, self.config.mask_sigma(height, width))
        return images * upsampled + blurred * (1.0 - upsampled)

    with (
        mock.patch.object(mask_module, "gaussian_blur", conv_blur),
        mock.patch.object(Mask, "perturb", perturb),
        mock.patch.object(Classifier, "to_model_layout", lambda self, images: images),
    ):
        yield


def within(context: Callable[[], Any], work: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with context():
            return work()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-resnet")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    clf = load_classifier(args.model)
    images, labels, targets = inputs(clf, args.batch)
    generator = torch.Generator().manual_seed(1)
    results = []

    def attack(interpreter: Interpreter, steps: int) -> Callable[[], Any]:
        maps = torch.rand((images.shape[0], 1, *interpreter.map_shape(images)), generator=generator)
        config = AttackConfig(pgd_steps=0, adv_steps=steps, lam=LambdaSchedule((5.0,)))
        run = ADV2(clf, config, interpreter=interpreter)
        return lambda: run(images, targets, maps)

    def step_pair(
        label: str, interpreter: Interpreter, before: Callable[[], Any], short: int = 1, extra: int = 3
    ) -> None:
        samples = interleaved(
            {
                "before_short": within(before, attack(interpreter, short)),
                "before_long": within(before, attack(interpreter, short + extra)),
                "after_short": attack(interpreter, short),
                "after_long": attack(interpreter, short + extra),
            },
            args.repeats,
            warmup=1,
        )
        b = marginal(samples["before_long"], samples["before_short"], extra)
        a = marginal(samples["after_long"], samples["after_short"], extra)
        record(label, "ms per ADV² step", b, a)

    def record(label: str, unit: str, before: list[float], after: list[float]) -> None:
        ratio = paired_ratio(after, before)
        b, a = sorted(before)[len(before) // 2], sorted(after)[len(after) // 2]
        results.append((label, unit, 1000 * b, 1000 * a, ratio.median))
        print(f"{label}: {1000 * b:.1f} -> {1000 * a:.1f} {unit} (after/before {ratio.median:.2f})", file=sys.stderr)

    cam, gradcam = CAM(clf), GradCAM(clf)  # layer discovery (one probe forward each) is set-up
    step_pair("1. ADV² on CAM: one forward per step", cam, lambda: plain_logits(cam))
    step_pair("1. ADV² on Grad-CAM: one forward per step", gradcam, lambda: plain_logits(gradcam))
    try:
        rts = Rts(clf)
        step_pair("2. ADV² on RTS: one encoder pass per step", rts, lambda: plain_logits(rts))
    except Exception as error:  # noqa: BLE001 - no shipped RTS network for this model
        print(f"RTS skipped: {error}", file=sys.stderr)
    mask = Mask(clf, MaskConfig(init_steps=5))
    samples = interleaved(
        {"before": within(solving_map_shape, attack(mask, 1)), "after": attack(mask, 1)},
        max(3, args.repeats // 3),
        warmup=1,
    )
    record("3. ADV² on MASK: arithmetic map_shape", "ms per attack call (1 step)", samples["before"], samples["after"])
    step_pair("4. ADV² on MASK: one image blur per step", mask, extra_blur)
    for batch in (1, args.batch):
        x, c = images[:batch], labels[:batch]
        grad = Grad(clf)
        samples = interleaved(
            {"before": within(always_mode, lambda: grad(x, c)), "after": lambda: grad(x, c)}, 3 * args.repeats, warmup=2
        )
        record(
            f"5. GRAD benign map, batch {batch}: no torch-function mode",
            "ms per call",
            samples["before"],
            samples["after"],
        )
    shared = Grad(clf, share_forward=True)
    exact = Grad(clf)
    samples = interleaved(
        {
            "before_short": attack(exact, 1),
            "before_long": attack(exact, 4),
            "after_short": attack(shared, 1),
            "after_long": attack(shared, 4),
        },
        args.repeats,
        warmup=1,
    )
    record(
        "6. ADV² on GRAD with share_forward=True (opt-in)",
        "ms per ADV² step",
        marginal(samples["before_long"], samples["before_short"], 3),
        marginal(samples["after_long"], samples["after_short"], 3),
    )

    from underfire.interpreters import cam as cam_module

    with torch.no_grad():
        features, _ = cam.capture.features_and_logits(images)
    weight = cam.layers.head.weight

    def einsum_map() -> torch.Tensor:
        return torch.einsum("nkhw,nk->nhw", features, weight.to(features.dtype)[labels]).unsqueeze(1)

    assert torch.equal(einsum_map(), cam_module._class_map(features, weight, labels))
    calls = 50
    samples = interleaved(
        {
            "before": lambda: [einsum_map() for _ in range(calls)],
            "after": lambda: [cam_module._class_map(features, weight, labels) for _ in range(calls)],
        },
        3 * args.repeats,
        warmup=2,
    )
    record(
        "7. CAM class map: bmm instead of einsum",
        "µs per class map",
        [1000 * t / calls for t in samples["before"]],
        [1000 * t / calls for t in samples["after"]],
    )

    cam = CAM(clf)
    samples = interleaved(
        {"before": within(broadcast_constants, lambda: cam(images, labels)), "after": lambda: cam(images, labels)},
        3 * args.repeats,
        warmup=2,
    )
    record(
        "8. CAM map: normalisation laid out like the channels-last batch",
        "ms per call",
        samples["before"],
        samples["after"],
    )
    prepared = clf.prepare_images(images)

    def normalize_fb() -> torch.Tensor:
        x = prepared.detach().requires_grad_(True)
        return torch.autograd.grad(clf.normalize(x).sum(), x)[0]

    calls = 50
    samples = interleaved(
        {
            "before": within(broadcast_constants, lambda: [normalize_fb() for _ in range(calls)]),
            "after": lambda: [normalize_fb() for _ in range(calls)],
        },
        3 * args.repeats,
        warmup=2,
    )
    record(
        "8. normalisation alone, forward + backward",
        "µs per call",
        [1000 * t / calls for t in samples["before"]],
        [1000 * t / calls for t in samples["after"]],
    )
    solver = Mask(clf, MaskConfig(iterations=20))
    samples = interleaved(
        {"before": within(convolution_mask, lambda: solver(images, labels)), "after": lambda: solver(images, labels)},
        args.repeats,
        warmup=1,
    )
    record(
        "9. MASK solve (20 iterations): matrix-product blurs, NCHW mixing",
        "ms per call",
        samples["before"],
        samples["after"],
    )
    height, width = images.shape[-2:]
    cells = torch.rand((images.shape[0], 1, *solver.map_shape(images)), generator=generator)
    mask_sigma, image_sigma = solver.config.mask_sigma(height, width), solver.config.image_sigma(height, width)

    def backward_of(function: Callable[[torch.Tensor], torch.Tensor], source: torch.Tensor) -> Callable[[], Any]:
        def run() -> torch.Tensor:
            x = source.detach().requires_grad_(True)
            return torch.autograd.grad(function(x).sum(), x)[0]

        return run

    def old_mask_upsampling(m: torch.Tensor) -> torch.Tensor:
        return conv_blur(F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False), mask_sigma)

    for label, before, after, source in (
        (
            "9. mask upsampling + blur, forward + backward",
            old_mask_upsampling,
            lambda m: upsample_blurred(m, (height, width), mask_sigma),
            cells,
        ),
        (
            "9. replacement-image blur, forward + backward",
            lambda x: conv_blur(x, image_sigma),
            lambda x: gaussian_blur(x, image_sigma),
            images.contiguous(),
        ),
    ):
        samples = interleaved(
            {"before": backward_of(before, source), "after": backward_of(after, source)}, 3 * args.repeats, warmup=2
        )
        record(label, "ms per call", samples["before"], samples["after"])

    lines = [
        f"Hot spots on {args.model}, batch {args.batch}, {torch.get_num_threads()} thread(s), medians of {args.repeats} rounds",
        "",
        "| fix | unit | before | after | after / before |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {label} | {unit} | {b:.1f} | {a:.1f} | {r:.2f} |" for label, unit, b, a, r in results]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
