"""Against peers: the same operation in underfire and in another library, same model and inputs.

Each comparison checks that both sides computed the same thing (the table's "agreement" column)
before it reports a ratio ours / theirs (≤ 1 = underfire is as fast or faster):

* GRAD map vs captum ``Saliency`` (abs=True, then max over channels and min-max, underfire's map);
* CAM vs torch-cam ``CAM`` (normalised; hooks made once, as its docs show);
* Grad-CAM vs pytorch-grad-cam ``GradCAM`` (its documented ``with GradCAM(...) as cam`` use; it
  also resizes the maps to the input, which underfire does not: compared after resizing ours) and
  captum ``LayerGradCam`` (relu_attributions=True, then min-max);
* one PGD step vs torchattacks ``PGD`` (targeted, random_start=False, same ε and α): the marginal
  cost of one more step, so set-up and underfire's final scoring of the result cancel;
* MASK on a batch vs the same MASK image by image (our own loop; the batched maps must equal the
  per-image ones), reported as a speed-up per image;
* MASK per optimisation iteration vs torchray ``extremal_perturbation`` (batch 1, one area, mask
  step and σ scaled to the input size; a different objective, so no map agreement: only the cost
  of an iteration is compared, marginally);
* Gradient × Input, Integrated Gradients (32 Gauss–Legendre nodes, 8 path points per pass on
  both sides) and DeepLIFT (black baseline) vs captum's ``InputXGradient``,
  ``IntegratedGradients`` and ``DeepLift``; LRP vs zennit's ``EpsilonPlusFlat`` (BatchNorm merged,
  residual sums as modules) and LRP-ε vs captum's ``LRP``. captum's DeepLift and LRP and zennit
  need a copy of the model with one ReLU module per use and the residual sum as a module
  (``benchmarks.peer_models``); underfire runs on the model itself. Their maps are compared the
  same way (|·|, max over channels, min-max). captum's LRP applies ε to each BatchNorm instead of
  merging it, so that row agrees only roughly; its timing is still the same amount of work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from underfire import Classifier
from underfire.attacks import PGD, AttackConfig
from underfire.interpreters import CAM, Grad, GradCAM, Mask, MaskConfig, build_interpreter

from .common import (
    Row,
    agreement,
    import_torchvision_quietly,
    interleaved,
    make_row,
    marginal,
    max_abs_diff,
    minmax,
    paired_ratio,
)

SECTION = "peers"
#: keys of the comparisons, for ``benchmarks.run --peers``
PEERS = (
    "grad",
    "cam",
    "gradcam-pgc",
    "gradcam-captum",
    "pgd",
    "mask-batch",
    "mask-torchray",
    "inputxgrad",
    "ig",
    "deeplift",
    "lrp-zennit",
    "lrp-captum",
)


def run_peers(
    clf: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    *,
    repeats: int,
    warmup: int,
    quick: bool,
    only: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Every peer comparison (or those named in ``only``, keys of ``PEERS``) that its library
    allows; a missing library gives a skipped row."""
    setting = {"model": clf.name, "batch": images.shape[0], "size": images.shape[-1]}
    rows: list[Row] = []
    benches: list[tuple[str, str, Callable[[], list[Row]]]] = [
        ("grad", "captum Saliency", lambda: [grad_vs_captum(clf, images, labels, repeats, warmup, setting)]),
        ("cam", "torch-cam CAM", lambda: [cam_vs_torchcam(clf, images, labels, repeats, warmup, setting)]),
        (
            "gradcam-pgc",
            "pytorch-grad-cam GradCAM",
            lambda: [gradcam_vs_pytorch_grad_cam(clf, images, labels, repeats, warmup, setting)],
        ),
        (
            "gradcam-captum",
            "captum LayerGradCam",
            lambda: [gradcam_vs_captum(clf, images, labels, repeats, warmup, setting)],
        ),
        (
            "pgd",
            "torchattacks PGD",
            lambda: [pgd_vs_torchattacks(clf, images, labels, targets, repeats, warmup, quick, setting)],
        ),
        (
            "mask-batch",
            "MASK per-image loop",
            lambda: [mask_batched_vs_loop(clf, images, labels, repeats, warmup, quick, setting)],
        ),
        (
            "mask-torchray",
            "torchray extremal_perturbation",
            lambda: [mask_vs_torchray(clf, images, labels, repeats, warmup, quick, setting)],
        ),
        (
            "inputxgrad",
            "captum InputXGradient",
            lambda: [attribution_vs_captum("inputxgrad", clf, images, labels, repeats, warmup, setting)],
        ),
        (
            "ig",
            "captum IntegratedGradients",
            lambda: [attribution_vs_captum("ig", clf, images, labels, repeats, warmup, setting)],
        ),
        (
            "deeplift",
            "captum DeepLift",
            lambda: [attribution_vs_captum("deeplift", clf, images, labels, repeats, warmup, setting)],
        ),
        (
            "lrp-zennit",
            "zennit EpsilonPlusFlat",
            lambda: [lrp_vs_zennit(clf, images, labels, repeats, warmup, setting)],
        ),
        (
            "lrp-captum",
            "captum LRP",
            lambda: [attribution_vs_captum("lrp", clf, images, labels, repeats, warmup, setting)],
        ),
    ]
    for key, label, bench in benches:
        if only is not None and key not in only:
            continue
        log(f"  peers: {label} ...")
        try:
            new = bench()
        except ModuleNotFoundError as error:
            log(f"    skipped: {error}")
            rows.append(_skipped(label, f"not installed ({error.name}); pip install -e '.[bench]'", setting))
            continue
        for row in new:
            log(f"    {row.name}: {row.ratio:.2f}x ({row.agreement})")
        rows.extend(new)
    return rows


def _skipped(peer: str, why: str, setting: dict[str, Any]) -> Row:
    return Row(SECTION, peer, "-", peer, math.nan, math.nan, math.nan, math.nan, math.nan, note=why, setting=setting)


def _map_race(
    operation: str,
    ours_text: str,
    theirs_text: str,
    ours: Callable[[], torch.Tensor],
    theirs: Callable[[torch.Tensor], torch.Tensor],
    tolerance: float,
    repeats: int,
    warmup: int,
    images: torch.Tensor,
    setting: dict,
    *,
    clf: Classifier,
    note: str = "",
    reference: torch.Tensor | None = None,
) -> Row:
    """Check that two map computations agree (``reference`` stands for ours when the outputs need
    aligning first), then time them interleaved: one peer row, target ratio ≤ 1.

    ``theirs`` gets the NCHW batch a user holds. Where underfire hands the model a channels-last
    copy (``Classifier.prepare_images``), the peer is also timed on that copy and the note gives
    that ratio too, so the layout's share of the difference is visible.
    """
    mine = ours() if reference is None else reference
    contenders = {"ours": ours, "theirs": lambda: theirs(images)}
    prepared = clf.prepare_images(images)
    same_layout = prepared.is_contiguous() == images.is_contiguous()
    text, _ = agreement(mine, theirs(prepared), tolerance)
    if not same_layout:
        # the same batch as ours for the check; the float rounding of the other layout beside it
        nchw, _ = agreement(mine, theirs(images), math.inf)
        text = f"{text}; peer on NCHW: {nchw}"
        contenders["theirs_prepared"] = lambda: theirs(prepared)
    samples = interleaved(contenders, repeats, warmup, images.device)
    if not same_layout:
        layout = paired_ratio(samples["ours"], samples["theirs_prepared"]).median
        layout_note = f"peer handed the channels-last batch too: ratio {layout:.2f}"
        note = f"{note}; {layout_note}" if note else layout_note
    return make_row(
        SECTION,
        operation,
        ours_text,
        theirs_text,
        samples["ours"],
        samples["theirs"],
        target="ratio <= 1.0",
        agreement=text,
        note=note,
        setting=setting,
    )


# ------------------------------------------------------------------------------------------ GRAD
def grad_vs_captum(
    clf: Classifier, images: torch.Tensor, classes: torch.Tensor, repeats: int, warmup: int, setting: dict
) -> Row:
    from captum.attr import Saliency

    ours_interpreter = Grad(clf)
    saliency = Saliency(clf)

    def ours() -> torch.Tensor:
        return ours_interpreter(images, classes)

    def theirs(x: torch.Tensor) -> torch.Tensor:
        attribution = saliency.attribute(x.clone(), target=classes, abs=True)
        return minmax(attribution.amax(1, keepdim=True))

    return _map_race(
        "GRAD map",
        "Grad(clf)(x, c)",
        "captum Saliency + max over channels + min-max",
        ours,
        theirs,
        1e-5,
        repeats,
        warmup,
        images,
        setting,
        clf=clf,
    )


# ------------------------------------------------------------------------------------------ CAM
def cam_vs_torchcam(
    clf: Classifier, images: torch.Tensor, classes: torch.Tensor, repeats: int, warmup: int, setting: dict
) -> Row:
    from torchcam.methods import CAM as TorchCamCAM

    ours_interpreter = CAM(clf)
    layers = ours_interpreter.layers
    note = ""
    if layers.post_relu:
        note = "model applies a ReLU after the feature layer: torch-cam hooks the pre-ReLU map"
    extractor = TorchCamCAM(clf, layers.feature_module, layers.head, input_shape=tuple(images.shape[1:]))
    class_list = classes.tolist()
    extractor.disable_hooks()  # its hook only records while its own side runs

    def ours() -> torch.Tensor:
        return ours_interpreter(images, classes)

    def theirs(x: torch.Tensor) -> torch.Tensor:
        extractor.enable_hooks()
        try:
            with torch.no_grad():
                clf(x)
            return extractor(class_list, normalized=True)[0]
        finally:
            extractor.disable_hooks()

    try:
        return _map_race(
            "CAM map",
            "CAM(clf)(x, c)",
            "torch-cam CAM (forward + extractor)",
            ours,
            theirs,
            1e-4,
            repeats,
            warmup,
            images,
            setting,
            clf=clf,
            note=note,
        )
    finally:
        extractor.remove_hooks()


# ------------------------------------------------------------------------------------------ Grad-CAM
def gradcam_vs_pytorch_grad_cam(
    clf: Classifier, images: torch.Tensor, classes: torch.Tensor, repeats: int, warmup: int, setting: dict
) -> Row:
    import_torchvision_quietly()  # pytorch-grad-cam imports torchvision
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ours_interpreter = GradCAM(clf)
    layer = ours_interpreter.layers.feature_module
    cam_targets = [ClassifierOutputTarget(int(c)) for c in classes]

    def ours() -> torch.Tensor:
        return ours_interpreter(images, classes)

    def theirs(x: torch.Tensor) -> torch.Tensor:
        with PGCGradCAM(model=clf, target_layers=[layer]) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=cam_targets))

    # theirs: ReLU, min-max (ε 1e-7), bilinear resize to the input (cv2), min-max again; ours the same way
    resized = minmax(F.interpolate(ours(), size=images.shape[-2:], mode="bilinear", align_corners=False))
    return _map_race(
        "Grad-CAM map",
        "GradCAM(clf)(x, c)",
        "pytorch-grad-cam GradCAM (resizes to the input)",
        ours,
        theirs,
        1e-4,
        repeats,
        warmup,
        images,
        setting,
        clf=clf,
        reference=resized,
    )


def gradcam_vs_captum(
    clf: Classifier, images: torch.Tensor, classes: torch.Tensor, repeats: int, warmup: int, setting: dict
) -> Row:
    from captum.attr import LayerGradCam

    ours_interpreter = GradCAM(clf)
    layers = ours_interpreter.layers
    layer_gradcam = LayerGradCam(clf, layers.feature_module)
    note = "model applies a ReLU after the feature layer: captum sees the pre-ReLU map" if layers.post_relu else ""

    def ours() -> torch.Tensor:
        return ours_interpreter(images, classes)

    def theirs(x: torch.Tensor) -> torch.Tensor:
        attribution = layer_gradcam.attribute(x, target=classes, relu_attributions=True)
        return minmax(attribution.detach())

    return _map_race(
        "Grad-CAM map",
        "GradCAM(clf)(x, c)",
        "captum LayerGradCam + min-max",
        ours,
        theirs,
        1e-4,
        repeats,
        warmup,
        images,
        setting,
        clf=clf,
        note=note,
    )


# ------------------------------------------------------------------------------------------ PGD
def pgd_vs_torchattacks(
    clf: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    repeats: int,
    warmup: int,
    quick: bool,
    setting: dict,
) -> Row:
    import torchattacks

    eps, alpha, short, extra = 8 / 255, 1 / 255, 1, (3 if quick else 8)

    def ours(steps: int) -> Callable[[], torch.Tensor]:
        attack = PGD(clf, AttackConfig(eps=eps, alpha=alpha, pgd_steps=steps, adv_steps=0))
        return lambda: attack(images, targets).last

    def theirs(steps: int, x: torch.Tensor = images) -> Callable[[], torch.Tensor]:
        attack = torchattacks.PGD(clf, eps=eps, alpha=alpha, steps=steps, random_start=False)
        attack.set_mode_targeted_by_function(lambda _images, _labels: targets, quiet=True)
        return lambda: attack(x, labels)

    contenders = {
        "ours_short": ours(short),
        "theirs_short": theirs(short),
        "ours_long": ours(short + extra),
        "theirs_long": theirs(short + extra),
    }
    prepared = clf.prepare_images(images)  # the layout underfire hands the model (see _map_race)
    same_layout = prepared.is_contiguous() == images.is_contiguous()
    if not same_layout:
        contenders["prepared_short"] = theirs(short, prepared)
        contenders["prepared_long"] = theirs(short + extra, prepared)
    # the same iterates: underfire's last iterate (before 8-bit rounding) vs torchattacks' output
    diff = max_abs_diff(contenders["ours_long"](), contenders["theirs_long"]())
    text = f"iterates after {short + extra} steps: max abs diff {diff:.1e}"
    samples = interleaved(contenders, repeats, warmup, images.device)
    ours_step = marginal(samples["ours_long"], samples["ours_short"], extra)
    theirs_step = marginal(samples["theirs_long"], samples["theirs_short"], extra)
    note = f"cost of one more step: (T({short + extra} steps) - T({short})) / {extra}; ε 8/255, α 1/255"
    if not same_layout:
        prepared_step = marginal(samples["prepared_long"], samples["prepared_short"], extra)
        note += f"; peer handed the channels-last batch too: ratio {paired_ratio(ours_step, prepared_step).median:.2f}"
    return make_row(
        SECTION,
        "PGD step (marginal)",
        "PGD(clf, config)(x, t)",
        "torchattacks PGD, targeted",
        ours_step,
        theirs_step,
        target="ratio <= 1.0",
        agreement=text,
        note=note,
        setting=setting,
    )


# ------------------------------------------------------------------------------------------ MASK
def mask_batched_vs_loop(
    clf: Classifier, images: torch.Tensor, classes: torch.Tensor, repeats: int, warmup: int, quick: bool, setting: dict
) -> Row:
    iterations = 5 if quick else 20
    mask = Mask(clf, MaskConfig(iterations=iterations))
    n = images.shape[0]

    def batched() -> torch.Tensor:
        return mask(images, classes)

    def loop() -> torch.Tensor:
        return torch.cat([mask(images[i : i + 1], classes[i : i + 1]) for i in range(n)])

    # float differences between batch sizes (other conv algorithms) grow through Adam's
    # scale-free steps over the iterations: close, not bit-equal
    text, _ = agreement(batched(), loop(), 0.05)
    samples = interleaved({"batched": batched, "loop": loop}, repeats, warmup, images.device)
    device = images.device.type
    # the model's own share: forward + input gradient, batch n against n single images
    prepared = clf.prepare_images(images)

    def input_gradient(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(clf(x).logsumexp(1).sum(), x)[0]

    with clf.frozen():
        model = interleaved(
            {
                "batched": lambda: input_gradient(prepared),
                "loop": lambda: [input_gradient(prepared[i : i + 1]) for i in range(n)],
            },
            repeats,
            warmup,
            images.device,
        )
    model_speedup = paired_ratio(model["loop"], model["batched"]).median
    return make_row(
        SECTION,
        f"MASK, batch {n} vs one by one",
        f"Mask(clf)(x[:{n}], c)",
        "the same Mask, image by image",
        samples["batched"],
        samples["loop"],
        target="speedup >= 3.0" if device == "cpu" else "",
        agreement=text,
        speedup=True,
        note=(
            f"speed-up per image (loop time / batch time), {iterations} iterations each; the model's own "
            f"forward + input gradient, batch {n} vs one by one: {model_speedup:.2f}x"
        ),
        setting={**setting, "iterations": iterations},
    )


def mask_vs_torchray(
    clf: Classifier, images: torch.Tensor, classes: torch.Tensor, repeats: int, warmup: int, quick: bool, setting: dict
) -> Row:
    from torchray.attribution.extremal_perturbation import extremal_perturbation

    x, c = images[:1], classes[:1]
    short, extra = 2, (4 if quick else 10)
    size = x.shape[-1]
    step, sigma = max(1, round(7 * size / 224)), 21 * size / 224  # torchray's defaults are for 224 px

    def ours(iterations: int) -> Callable[[], torch.Tensor]:
        mask = Mask(clf, MaskConfig(iterations=iterations))
        return lambda: mask(x, c)

    def theirs(iterations: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            # extremal_perturbation turns requires_grad off for good on every parameter: undo it
            flags = [p.requires_grad for p in clf.parameters()]
            try:
                masks, _ = extremal_perturbation(
                    clf, x, int(c), areas=[0.1], max_iter=iterations, step=step, sigma=sigma
                )
            finally:
                for p, flag in zip(clf.parameters(), flags):
                    p.requires_grad_(flag)
            return masks

        return run

    contenders = {
        "ours_short": ours(short),
        "theirs_short": theirs(short),
        "ours_long": ours(short + extra),
        "theirs_long": theirs(short + extra),
    }
    samples = interleaved(contenders, repeats, warmup, images.device)
    return make_row(
        SECTION,
        "MASK iteration, batch 1 (marginal)",
        "Mask(clf)(x[:1], c)",
        "torchray extremal_perturbation",
        marginal(samples["ours_long"], samples["ours_short"], extra),
        marginal(samples["theirs_long"], samples["theirs_short"], extra),
        target="ratio <= 1.0",
        agreement="different objectives: cost only",
        note=f"cost of one more iteration at {size} px: (T({short + extra}) - T({short})) / {extra}",
        setting={**setting, "batch": 1},
    )


# ------------------------------------------------------------------------------------------ the back-propagation family
IG_STEPS, IG_CHUNK = 32, 8


def attribution_vs_captum(
    method: str, clf: Classifier, images: torch.Tensor, classes: torch.Tensor, repeats: int, warmup: int, setting: dict
) -> Row:
    """Gradient × Input, IG, DeepLIFT or LRP-ε (``method``) against captum's attribution."""
    import captum.attr as captum

    from .peer_models import captum_ready

    options = {"ig": {"steps": IG_STEPS, "chunk": IG_CHUNK}, "lrp": {"rule": "epsilon"}}.get(method, {})
    interpreter = build_interpreter(method, clf, **options)
    peer = Classifier(captum_ready(clf.model), mean=clf.mean.flatten().tolist(), std=clf.std.flatten().tolist()).eval()
    batch = images.shape[0]
    attributor, kwargs = {
        "inputxgrad": (captum.InputXGradient(clf), {}),
        "ig": (captum.IntegratedGradients(clf), {"n_steps": IG_STEPS, "internal_batch_size": batch * IG_CHUNK}),
        "deeplift": (captum.DeepLift(peer), {}),
        "lrp": (captum.LRP(peer), {}),
    }[method]

    def ours() -> torch.Tensor:
        return interpreter(images, classes)

    def theirs(x: torch.Tensor) -> torch.Tensor:
        attribution = attributor.attribute(x.clone().requires_grad_(True), target=classes, **kwargs)
        return minmax(attribution.detach().abs().amax(1, keepdim=True))

    label = {
        "inputxgrad": "InputXGrad",
        "ig": f"IntegratedGradients(steps={IG_STEPS})",
        "deeplift": "DeepLift",
        "lrp": "Lrp(rule='epsilon')",
    }[method]
    peer_name = {
        "inputxgrad": "InputXGradient",
        "ig": f"IntegratedGradients(n_steps={IG_STEPS})",
        "deeplift": "DeepLift",
        "lrp": "LRP",
    }[method]
    return _map_race(
        f"{method} map",
        f"{label}(clf)(x, c)",
        f"captum {peer_name} + max over channels + min-max",
        ours,
        theirs,
        1e-3 if method != "lrp" else math.inf,
        repeats,
        warmup,
        images,
        setting,
        clf=clf,
        note="captum's LRP: ε on every unmerged BatchNorm" if method == "lrp" else "",
    )


def lrp_vs_zennit(
    clf: Classifier, images: torch.Tensor, classes: torch.Tensor, repeats: int, warmup: int, setting: dict
) -> Row:
    """LRP (EpsilonPlusFlat) against zennit's, canonizers applied once outside the timing (a
    zennit user registers the composite once)."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.rules import Norm

    from .peer_models import captum_ready, zennit_canonizers

    interpreter = build_interpreter("lrp", clf)
    network = captum_ready(clf.model)
    composite = EpsilonPlusFlat(canonizers=zennit_canonizers(network), layer_map=[(torch.nn.AdaptiveAvgPool2d, Norm())])
    attributor = Gradient(model=network, composite=composite)
    attributor.__enter__()
    try:

        def ours() -> torch.Tensor:
            return interpreter(images, classes)

        def theirs(x: torch.Tensor) -> torch.Tensor:
            inputs = clf.normalize(x).clone().requires_grad_(True)
            logits = network(inputs)
            _, relevance = attributor(inputs, torch.eye(logits.shape[1])[classes] * logits.detach())
            return minmax(relevance.abs().amax(1, keepdim=True))

        return _map_race(
            "lrp map",
            "Lrp(clf)(x, c)",
            "zennit Gradient(EpsilonPlusFlat) + max over channels + min-max",
            ours,
            theirs,
            1e-3,
            repeats,
            warmup,
            images,
            setting,
            clf=clf,
        )
    finally:
        attributor.__exit__(None, None, None)
