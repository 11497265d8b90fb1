"""Against the limit: one ADV² step in underfire vs the same mathematics written inline in torch.

Ours is ``ADV2(clf, interpreter, config)(x, t, target_maps)``: the marginal cost of one more
stage-2 step (see ``common``), so validation, target-map checks and the final 8-bit scoring
cancel. The reference is a plain loop over the same steps, written as one would without a
framework, from the same start, with the same selection rule (qualifying iterates by map
distance, then the rest by cross-entropy), constant λ and projection; its final iterate must
equal ours (the "agreement" column). What the ratio exposes is underfire's overhead per step:
interpreter objects, contexts, hooks, validation.

The inline mathematics per interpreter:

* GRAD (default, ``share_forward=False``): forward through a copy of the model whose ``nn.ReLU``
  modules are the smoothed ReLU (ReLU's value, the paper's ``h`` derivative), create-graph
  backward of the class logit to the input, |·| max over channels, min-max; a second, exact
  forward for the prediction loss; one backward of the whole loss.
* GRAD with ``share_forward=True``: the same with the smoothed forward's logits reused (forward +
  create-graph backward + backward).
* CAM: forward with a forward hook on the feature layer (registered once), Σ_k w_kc a_k, min-max,
  backward. Grad-CAM: the same plus the create-graph gradient of the class logit w.r.t. the
  hooked features.
* RTS: forward of the classifier, one pass of the saliency network's encoder feeding both its
  decoder (the mask) and its head (the encoder-logit term), backward.
* MASK: the inner Adam step(s) on the detached image and the unrolled, preconditioned virtual
  step (create_graph, on the jittered perturbed image) of ``Mask.surrogate``, inline;
  ``gaussian_blur``, ``upsample_blurred``, ``translate`` (``underfire.imaging``) and
  ``total_variation`` (pure tensor functions) are reused.
* Gradient × Input: GRAD's inline step with the map of x ⊙ ∇.
* IG (8 Gauss–Legendre nodes, black baseline, the ``quick`` preset's): all path points in one
  batch through the smoothed copy, one create-graph backward, (x − 0) ⊙ the weighted sum; the
  inline loop keeps that graph until the loss backward, ours recomputes it (bounded memory).
* DeepLIFT and LRP: the built-in ResNet's forward written out layer by layer, each layer giving
  its value (through ``SmoothReLU``) and its rule's twin by hand (DeepLIFT: secant multipliers
  against the black baseline's ReLUs, recorded in a pass without a graph; LRP: BatchNorm folded into each convolution, flat first layer,
  z⁺ convolutions, ε for ``fc``, proportional residual sum and pooling), then one create-graph
  backward of the twin score to the seed.
* LRP under its ``quick`` preset (``lrp (quick)``): the same with ReLU's own derivative, and ℓ_int
  on the maps' floored square roots plus 0.2 × (1 − the soft top-k IoU), written k by k (a
  top-k per k, as the definition reads; ``metrics.soft_iou_top_k`` sorts each map once).

These run on the built-in ResNet (its ReLUs are all ``nn.ReLU`` modules, so the inline smoothed
copy is exact); the GRAD and CAM targets are ratio ≤ 1.2.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from underfire import Classifier
from underfire.attacks import ADV2, AttackConfig, LambdaSchedule
from underfire.imaging import gaussian_blur, translate, upsample_blurred
from underfire.interpreters import CAM, Grad, GradCAM, Mask, MaskConfig, Rts, build_interpreter
from underfire.interpreters.mask import REFERENCE_MASK_PIXELS, total_variation
from underfire.metrics import DEFAULT_K
from underfire.presets import preset, surrogate_options

from .common import Row, interleaved, make_row, marginal, max_abs_diff, minmax, untrained_rts

SECTION = "limit"
LAMBDA = 5.0
EPS, ALPHA, CONFIDENCE = 8 / 255, 1 / 255, 0.8
ENCODER_WEIGHT = 0.1
UNQUALIFIED = 1000.0  # ADV²'s rank offset of iterates that do not qualify
TAU = 1e-4  # the paper's h surrogate (underfire's default)
IG_STEPS = 8  # the quick preset's IG
#: LRP's quick ℓ_int: the maps raised to map_power (floor 1e-4) plus w × (1 − soft top-k IoU)
QUICK_LRP_DISTANCE = {key: getattr(preset("quick", "lrp"), key) for key in ("map_power", "soft_iou_weight")}
POWER_FLOOR, SOFT_TEMPERATURE = 1e-4, 0.05
#: interpreter rows: (label, target ratio or None)
CASES: tuple[tuple[str, float | None], ...] = (
    ("grad", 1.2),
    ("grad (share_forward)", 1.2),
    ("cam", 1.2),
    ("gradcam", None),
    ("rts", None),
    ("mask", None),
    ("inputxgrad", 1.2),
    ("ig", 1.2),
    ("deeplift", 1.2),
    ("lrp", 1.2),
    ("lrp (quick)", 1.2),
)


def run_limit(
    clf: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    *,
    repeats: int,
    warmup: int,
    quick: bool,
    cases: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    rows = []
    # the inline reference gets the same memory layout underfire hands the model (channels-last on
    # CPU, Classifier.prepare_images): the ratio is framework overhead, not layout
    images = clf.prepare_images(images)
    short, extra = 1, (2 if quick else 4)
    setting = {"model": clf.name, "batch": images.shape[0], "size": images.shape[-1], "lambda": LAMBDA}
    for name, bound in CASES:
        if cases is not None and name not in cases:
            continue
        log(f"  limit: {name} ...")
        interpreter = _interpreter(name, clf)
        generator = torch.Generator().manual_seed(1)
        maps_shape = (images.shape[0], 1, *interpreter.map_shape(images))
        target_maps = torch.rand(maps_shape, generator=generator).to(images.device)
        config = AttackConfig(
            eps=EPS,
            alpha=ALPHA,
            pgd_steps=0,
            adv_steps=1,
            lam=LambdaSchedule((LAMBDA,)),
            confidence=CONFIDENCE,
            **(QUICK_LRP_DISTANCE if name == "lrp (quick)" else {}),
        )

        def ours(
            steps: int, interpreter: Any = interpreter, maps: torch.Tensor = target_maps
        ) -> Callable[[], torch.Tensor]:
            attack = ADV2(clf, config.with_overrides(adv_steps=steps), interpreter=interpreter)
            return lambda: attack(images, targets, maps).last

        def raw(
            steps: int, name: str = name, interpreter: Any = interpreter, maps: torch.Tensor = target_maps
        ) -> Callable[[], torch.Tensor]:
            return lambda: _raw_attack(clf, _inline(name, clf, interpreter, targets, maps), images, targets, steps)

        contenders = {
            "ours_short": ours(short),
            "raw_short": raw(short),
            "ours_long": ours(short + extra),
            "raw_long": raw(short + extra),
        }
        ours_last, raw_last = contenders["ours_long"](), contenders["raw_long"]()
        diff = max_abs_diff(ours_last, raw_last)
        moved = float((ours_last != raw_last).float().mean())
        text = f"final iterates: max abs diff {diff:.1e}" + (f", {100 * moved:.2f} % of pixels differ" if moved else "")
        samples = interleaved(contenders, repeats, warmup, images.device)
        row = make_row(
            SECTION,
            f"ADV² step, {name}",
            f"ADV2(clf, {_label(name)})",
            "inline torch, same math",
            marginal(samples["ours_long"], samples["ours_short"], extra),
            marginal(samples["raw_long"], samples["raw_short"], extra),
            target=f"ratio <= {bound}" if bound else "",
            agreement=text,
            note=f"cost of one more step: (T({short + extra}) - T({short})) / {extra}",
            setting=setting,
        )
        log(f"    {row.name}: {row.ratio:.2f}x ({row.agreement})")
        rows.append(row)
    return rows


def _label(name: str) -> str:
    return {
        "grad": "Grad(clf)",
        "grad (share_forward)": "Grad(clf, share_forward=True)",
        "cam": "CAM(clf)",
        "gradcam": "GradCAM(clf)",
        "rts": "Rts(clf)",
        "mask": "Mask(clf, MaskConfig(init_steps=5))",
        "inputxgrad": "InputXGrad(clf)",
        "ig": "IntegratedGradients(clf, steps=8)",
        "deeplift": "DeepLift(clf)",
        "lrp": "Lrp(clf)",
        "lrp (quick)": "Lrp(clf, relu='none'), root maps + soft top-k",
    }[name]


# ------------------------------------------------------------------------------------------ the loop
#: step(x) → (loss per sample, map distance per sample, logits); built fresh for every attack
Step = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _raw_attack(
    clf: Classifier, inline: Inline, images: torch.Tensor, targets: torch.Tensor, steps: int
) -> torch.Tensor:
    """``steps`` projected sign-gradient steps keeping the best eligible iterate (ADV²'s rule)."""
    try:
        with _frozen(clf):
            x = images.clone()
            best = images.clone()
            best_score = torch.full((images.shape[0],), math.inf, device=images.device)
            for index in range(steps + 1):
                x.requires_grad_(True)
                loss, score, logits = inline.step(x)
                if index < steps:
                    (gradient,) = torch.autograd.grad(loss.sum(), x)
                with torch.no_grad():
                    # ADV²'s selection: qualifying iterates (c_t with p ≥ confidence) by map
                    # distance, before any other, which rank by cross-entropy
                    probability = logits.softmax(1).gather(1, targets[:, None]).squeeze(1)
                    eligible = (logits.argmax(1) == targets) & (probability >= CONFIDENCE)
                    fallback = UNQUALIFIED + F.cross_entropy(logits, targets, reduction="none")
                    score = torch.where(eligible, score.detach(), fallback)
                    improved = score < best_score
                    best[improved] = x.detach()[improved]
                    best_score[improved] = score[improved]
                    if index < steps:
                        x = x.detach() - ALPHA * gradient.sign()
                        x = torch.minimum(torch.maximum(x, images - EPS), images + EPS).clamp(0.0, 1.0)
            return x.detach()
    finally:
        inline.close()


class _frozen:
    """Parameters without gradients (what anyone attacking a fixed model does)."""

    def __init__(self, clf: Classifier) -> None:
        self.params = list(clf.parameters())

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------ inline maths
class SmoothReLU(nn.Module):
    """ReLU's value, the derivative of h(z) = √(z²+τ) (+ z for z < 0) (Zhang et al. 2020)."""

    def __init__(self, tau: float = TAU) -> None:
        super().__init__()
        self.root_tau = math.sqrt(tau)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            value = torch.relu(z)
        g = torch.hypot(z, z.new_tensor(self.root_tau)) + torch.where(z < 0, z, 0.0)
        return value + (g - g.detach())


def smoothed_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` module replaced by ``SmoothReLU``, frozen."""
    smooth = copy.deepcopy(model).eval()
    for module in list(smooth.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, SmoothReLU())
    for p in smooth.parameters():
        p.requires_grad_(False)
    return smooth


def _interpreter(name: str, clf: Classifier) -> Any:
    if name == "grad":
        return Grad(clf)
    if name == "grad (share_forward)":
        return Grad(clf, share_forward=True)
    if name == "cam":
        return CAM(clf)
    if name == "gradcam":
        return GradCAM(clf)
    if name == "rts":  # the paper's step: the encoder term in stage 2 only
        options = {"encoder_weight": ENCODER_WEIGHT, "warm_start_encoder_weight": 0.0}
        try:
            return Rts(clf, **options)
        except Exception:  # noqa: BLE001 - no shipped network: an untrained one costs the same
            return untrained_rts(clf, **options)
    if name == "mask":  # the paper's surrogate alone (the quick preset's evidence term: step_cost.py)
        return Mask(clf, MaskConfig(init_steps=5), evidence_weight=0.0)
    if name in ("inputxgrad", "ig", "deeplift", "lrp"):
        return build_interpreter(name, clf, **({"steps": IG_STEPS} if name == "ig" else {}))
    if name == "lrp (quick)":
        return build_interpreter("lrp", clf, **surrogate_options("quick", "lrp"))
    raise ValueError(f"unknown case {name!r}")


class Inline:
    """One attack run's inline step; ``close`` removes what it attached to the model."""

    def __init__(self, step: Step, close: Callable[[], None] = lambda: None) -> None:
        self.step = step
        self.close = close


#: smoothed copies of a model, made once per model (a deep copy is set-up, not a step)
_SMOOTHED: dict[int, nn.Module] = {}


def _inline(name: str, clf: Classifier, interpreter: Any, targets: torch.Tensor, target_maps: torch.Tensor) -> Inline:
    mean, std = clf.mean, clf.std
    model = clf.network

    def normalized(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    if name.startswith("grad ") or name == "grad":
        share = "share_forward" in name
        smooth = _SMOOTHED.setdefault(id(clf), smoothed_copy(clf.model))

        def grad_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            xn = normalized(x)
            smooth_logits = smooth(xn)
            (g,) = torch.autograd.grad(smooth_logits.gather(1, targets[:, None]).sum(), x, create_graph=True)
            maps = minmax(g.abs().amax(1, keepdim=True))
            logits = smooth_logits if share else model(xn)
            return _adv2_loss(logits, maps, targets, target_maps)

        return Inline(grad_step)

    if name in ("cam", "gradcam"):
        layers = interpreter.layers  # the CAM / Grad-CAM interpreter's own discovery
        captured: dict[str, torch.Tensor] = {}
        handle = layers.feature_module.register_forward_hook(lambda _m, _i, out: captured.__setitem__("a", out))
        weight = layers.head.weight

        def cam_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logits = model(normalized(x))
            a = torch.relu(captured["a"]) if layers.post_relu else captured["a"]
            if name == "cam":
                raw = torch.einsum("nkhw,nk->nhw", a, weight[targets]).unsqueeze(1)
            else:
                (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), a, create_graph=True)
                raw = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
            return _adv2_loss(logits, minmax(raw), targets, target_maps)

        return Inline(cam_step, handle.remove)

    if name == "rts":
        network = interpreter.network.eval()
        for p in network.parameters():
            p.requires_grad_(False)

        def rts_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logits = model(normalized(x))
            features = network.encode(x)
            masks = network.decode(features, targets)
            encoder_logits = network.encoder.fc(torch.flatten(network.encoder.avgpool(features[-1]), 1))
            loss, distance, logits = _adv2_loss(logits, minmax(masks), targets, target_maps)
            return loss + ENCODER_WEIGHT * F.cross_entropy(encoder_logits, targets, reduction="none"), distance, logits

        return Inline(rts_step)

    if name == "mask":
        return Inline(_mask_step(clf, interpreter.config, targets, target_maps))

    if name in ("inputxgrad", "ig"):
        smooth = _SMOOTHED.setdefault(id(clf), smoothed_copy(clf.model))
        nodes, weights = np.polynomial.legendre.leggauss(IG_STEPS)
        alphas, weights = (nodes + 1) / 2, weights / 2

        def path_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if name == "inputxgrad":
                (g,) = torch.autograd.grad(
                    smooth(normalized(x)).gather(1, targets[:, None]).sum(), x, create_graph=True
                )
            else:
                points = torch.cat([float(alpha) * x for alpha in alphas])
                score = smooth(normalized(points)).gather(1, targets.repeat(IG_STEPS)[:, None]).sum()
                (grads,) = torch.autograd.grad(score, points, create_graph=True)
                g = sum(float(w) * part for w, part in zip(weights, grads.chunk(IG_STEPS)))
            maps = minmax((x * g).abs().amax(1, keepdim=True))
            return _adv2_loss(model(normalized(x)), maps, targets, target_maps)

        return Inline(path_step)

    if name in ("deeplift", "lrp", "lrp (quick)"):
        net = clf.model
        quick = name == "lrp (quick)"

        def rule_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            seed = torch.zeros_like(x).requires_grad_(True)
            if name == "deeplift":  # the black baseline's ReLUs, recorded without a graph
                record = _ReluRecord()
                with torch.no_grad():
                    _resnet_with_twins(net, normalized(torch.zeros_like(x)), None, record)
                values, twins = _resnet_with_twins(net, normalized(x), seed / std, _DeepLiftInline(record))
            else:
                values, twins = _resnet_with_twins(net, normalized(x), seed, _LrpInline(exact_relu=quick))
            chosen = values.gather(1, targets[:, None])
            score = (twins.gather(1, targets[:, None]) * (1 if name == "deeplift" else chosen)).sum()
            (g,) = torch.autograd.grad(score, seed, create_graph=True)
            attribution = x * g if name == "deeplift" else g
            maps = minmax(attribution.abs().amax(1, keepdim=True))
            if quick:
                return _quick_lrp_loss(model(normalized(x)), maps, targets, target_maps)
            return _adv2_loss(model(normalized(x)), maps, targets, target_maps)

        return Inline(rule_step)
    raise ValueError(f"unknown case {name!r}")


def _stabilized(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return torch.where(z >= 0, z + eps, z - eps)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


class _ReluRecord:
    """The built-in ResNet's values only, recording each ReLU's (pre-activation, activation)."""

    def __init__(self) -> None:
        self.activations: list[tuple[torch.Tensor, torch.Tensor]] = []

    def conv_bn(
        self, conv: nn.Conv2d, bn: nn.BatchNorm2d, v: torch.Tensor, t: None, first: bool
    ) -> tuple[torch.Tensor, None]:
        return bn(conv(v)), None

    def relu(self, z: torch.Tensor, t: None) -> tuple[torch.Tensor, None]:
        a = torch.relu(z)
        self.activations.append((z, a))
        return a, None

    def add(self, o: torch.Tensor, ot: None, i: torch.Tensor, it: None) -> tuple[torch.Tensor, None]:
        return o + i, None

    def pool(self, v: torch.Tensor, t: None) -> tuple[torch.Tensor, None]:
        return v.mean((2, 3)), None

    def linear(self, fc: nn.Linear, v: torch.Tensor, t: None) -> tuple[torch.Tensor, None]:
        return fc(v), None


class _DeepLiftInline:
    """DeepLIFT-Rescale by hand: twins carry multipliers against a recorded baseline pass."""

    smooth = SmoothReLU()

    def __init__(self, reference: _ReluRecord) -> None:
        self.reference = iter(reference.activations)

    def conv_bn(
        self, conv: nn.Conv2d, bn: nn.BatchNorm2d, v: torch.Tensor, t: torch.Tensor, first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale, _ = _bn_affine(bn)
        return bn(conv(v)), F.conv2d(t, conv.weight, None, conv.stride, conv.padding) * scale.view(1, -1, 1, 1)

    def relu(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.smooth(z)
        zr, ar = next(self.reference)
        delta = z - zr
        close = delta.abs() < 1e-7
        multiplier = torch.where(
            close, (z > 0).to(z.dtype), (a - ar) / torch.where(close, torch.ones_like(delta), delta)
        )
        return a, t * multiplier

    def add(
        self, o: torch.Tensor, ot: torch.Tensor, i: torch.Tensor, it: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return o + i, ot + it

    def pool(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return v.mean((2, 3)), t.mean((2, 3))

    def linear(self, fc: nn.Linear, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fc(v), t @ fc.weight.t()


class _LrpInline:
    """LRP EpsilonPlusFlat by hand: twins carry relevance; ``exact_relu``: ReLU's own derivative
    (``relu='none'``) instead of the smoothed one."""

    def __init__(self, exact_relu: bool = False) -> None:
        self.smooth = torch.relu if exact_relu else SmoothReLU()

    def conv_bn(
        self, conv: nn.Conv2d, bn: nn.BatchNorm2d, v: torch.Tensor, t: torch.Tensor, first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = _bn_affine(bn)
        out = bn(conv(v))
        if first:  # flat: relevance spread uniformly over each receptive field
            ones = torch.ones_like(conv.weight)
            count = F.conv2d(torch.ones_like(v), ones, None, conv.stride, conv.padding)
            return out, F.conv2d(t, ones, None, conv.stride, conv.padding) / _stabilized(count)
        weight = (conv.weight * scale.view(-1, 1, 1, 1)).clamp(min=0)
        z = F.conv2d(v, weight, shift.clamp(min=0), conv.stride, conv.padding)
        return out, F.conv2d(t * v, weight, None, conv.stride, conv.padding) / _stabilized(z)

    def relu(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.smooth(z), t

    def add(
        self, o: torch.Tensor, ot: torch.Tensor, i: torch.Tensor, it: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return o + i, (ot * o + it * i) / _stabilized(o + i)

    def pool(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return v.mean((2, 3)), (t * v).mean((2, 3)) / _stabilized(v.mean((2, 3)))

    def linear(self, fc: nn.Linear, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = fc(v)
        return out, (t * v) @ fc.weight.t() / _stabilized(out)


def _resnet_with_twins(
    net: nn.Module, v: torch.Tensor, t: torch.Tensor | None, rules: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in ResNet's forward, written out, carrying (value, twin) through ``rules``."""
    v, t = rules.relu(*rules.conv_bn(net.conv1, net.bn1, v, t, True))
    for block in (net.layer1, net.layer2, net.layer3, net.layer4):
        if block.downsample is None:
            identity, identity_twin = v, t
        else:
            identity, identity_twin = rules.conv_bn(block.downsample[0], block.downsample[1], v, t, False)
        h, ht = rules.relu(*rules.conv_bn(block.conv1, block.bn1, v, t, False))
        o, ot = rules.conv_bn(block.conv2, block.bn2, h, ht, False)
        v, t = rules.relu(*rules.add(o, ot, identity, identity_twin))
    return rules.linear(net.fc, *rules.pool(v, t))


def _adv2_loss(
    logits: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, target_maps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    distance = (maps - target_maps).pow(2).flatten(1).mean(1)
    loss = F.cross_entropy(logits, targets, reduction="none") + LAMBDA * distance
    return loss, distance, logits


def _quick_lrp_loss(
    logits: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, target_maps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ℓ_int of LRP's quick preset by hand: the squared difference of the floored, powered maps,
    plus w × (1 − the mean over k of Σ min / Σ max of sigmoid-softened top-k sets)."""
    power = QUICK_LRP_DISTANCE["map_power"]
    a, b = ((POWER_FLOOR + (1 - POWER_FLOOR) * m.clamp(0, 1)).pow(power).flatten(1) for m in (maps, target_maps))
    distance = (a - b).pow(2).mean(1)
    overlaps = []
    for fraction in DEFAULT_K:
        k = max(1, round(fraction * a.shape[1]))
        soft = []
        for m in (a, b):
            top = m.detach().topk(k + 1, dim=1).values
            threshold = (top[:, k - 1 : k] + top[:, k : k + 1]) / 2
            soft.append(torch.sigmoid((m - threshold) / (SOFT_TEMPERATURE * m.detach().std(1, keepdim=True))))
        overlaps.append(torch.minimum(*soft).sum(1) / torch.maximum(*soft).sum(1))
    distance = distance + QUICK_LRP_DISTANCE["soft_iou_weight"] * (1 - torch.stack(overlaps, 1).mean(1))
    loss = F.cross_entropy(logits, targets, reduction="none") + LAMBDA * distance
    return loss, distance, logits


def _mask_step(clf: Classifier, cfg: MaskConfig, targets: torch.Tensor, target_maps: torch.Tensor) -> Step:
    """Mask.surrogate's bilevel step, inline: state kept in this closure (one attack run)."""
    mean, std, model = clf.mean, clf.std, clf.network
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    state: dict[str, Any] = {}

    generator = torch.Generator(targets.device).manual_seed(cfg.seed)

    def objective(
        mask: torch.Tensor, images: torch.Tensor, blurred: torch.Tensor, shift: tuple[int, int] = (0, 0)
    ) -> torch.Tensor:
        height, width = images.shape[-2:]
        up = upsample_blurred(mask, (height, width), cfg.mask_sigma(height, width))
        # mixed in NCHW (the one-channel mask broadcasts fast there), handed to the model in the
        # layout its input batch has, as Mask.objective does
        layout = (
            torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        )
        perturbed = images.contiguous() * up + blurred.contiguous() * (1.0 - up)
        if shift != (0, 0):  # the surrogate's jitter
            perturbed = translate(perturbed, *shift)
        perturbed = perturbed.contiguous(memory_format=layout)
        probs = torch.softmax(model((perturbed - mean) / std), dim=1)
        class_term = probs.gather(1, targets.view(-1, 1)).squeeze(1)
        scale = REFERENCE_MASK_PIXELS / (mask.shape[-2] * mask.shape[-1])
        l1 = (1.0 - mask).abs().flatten(1).sum(1)
        return class_term + scale * (cfg.l1_weight * l1 + cfg.tv_weight * total_variation(mask, cfg.tv_beta))

    def adam(images: torch.Tensor, blurred: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            variable = state["mask"].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(variable, images, blurred).sum(), variable)
            state["count"] += 1
            t = state["count"]
            state["m"] = beta1 * state["m"] + (1 - beta1) * grad
            state["v"] = beta2 * state["v"] + (1 - beta2) * grad.square()
            corrected_avg = state["m"] / (1 - beta1**t)
            corrected_sq = state["v"] / (1 - beta2**t)
            update = cfg.learning_rate * corrected_avg / (corrected_sq.sqrt() + adam_eps)
            state["mask"] = (variable.detach() - update).clamp(0.0, 1.0)

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        detached = x.detach()
        height, width = x.shape[-2:]
        sigma = cfg.image_sigma(height, width)
        with torch.enable_grad():
            blurred_live = gaussian_blur(x, sigma)
            blurred = blurred_live.detach()
            if not state:
                rows, cols = cfg.mask_shape(height, width)
                state["mask"] = torch.full((x.shape[0], 1, rows, cols), cfg.init_value, device=x.device)
                state["m"], state["v"], state["count"] = (
                    torch.zeros_like(state["mask"]),
                    torch.zeros_like(state["mask"]),
                    0,
                )
                adam(detached, blurred, cfg.iterations if cfg.init_steps is None else cfg.init_steps)
            adam(detached, blurred, cfg.inner_steps)
            shift = (0, 0)
            jitter = cfg.jitter_pixels(height, width)
            if cfg.surrogate_jitter and jitter > 0:
                drawn = torch.randint(-jitter, jitter + 1, (2,), generator=generator, device=generator.device)
                shift = (int(drawn[0]), int(drawn[1]))
            unrolled = state["mask"].clone().requires_grad_(True)
            for _ in range(cfg.unrolled_steps):
                loss = objective(unrolled, x, blurred_live, shift).sum()
                (grad,) = torch.autograd.grad(loss, unrolled, create_graph=True)
                scale = (state["v"] / (1 - beta2 ** state["count"])).sqrt() + adam_eps
                unrolled = unrolled - cfg.xi * (grad / scale)
            maps = minmax(1.0 - unrolled)
        logits = model((x - mean) / std)
        return _adv2_loss(logits, maps, targets, target_maps)

    return step
