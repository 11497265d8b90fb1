"""RTS (Dabkowski & Gal 2017): the saliency network, its objective, checkpoints and shipped networks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from underfire.data import ShapesDataset
from underfire.errors import CheckpointError, InputError
from underfire.interpreters.rts import (
    Rts,
    SaliencyNetwork,
    load_saliency_network,
    save_saliency_network,
)
from underfire.metrics import object_iou as topk_iou
from underfire.metrics import pointing_game
from underfire.models import IMAGENET_MEAN, IMAGENET_STD, Classifier, ShapesResNet, load_model
from underfire.training.rts import (
    RtsObjective,
    RtsTrainConfig,
    apply_mask,
    area_loss,
    fake_selectors,
    gaussian_blur,
    rts_loss,
    smoothness_loss,
    train_steps,
)

TINY = (4, 4, 8, 8, 16)


def tiny_network(seed: int = 0, num_classes: int = 10) -> SaliencyNetwork:
    torch.manual_seed(seed)
    return SaliencyNetwork(num_classes, ShapesResNet(widths=TINY), decoder_width=8).eval()


def tiny_classifier(seed: int = 1) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(ShapesResNet(widths=TINY).eval(), IMAGENET_MEAN, IMAGENET_STD, input_size=64)


def images(n: int = 3, size: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def module_state(module: torch.nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in module.modules()], [p.requires_grad for p in module.parameters()]


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


# ------------------------------------------------------------------------------ network mechanics


def test_mask_shape_range_and_quarter_resolution() -> None:
    rts = Rts(tiny_classifier(), tiny_network())
    x = images(3)
    maps = rts(x, [0, 4, 9])
    assert maps.shape == (3, 1, 16, 16)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert torch.allclose(maps.flatten(1).max(1).values, torch.ones(3))  # normalised per image
    raw = rts.masks(x, torch.tensor([0, 4, 9]))
    assert raw.shape == (3, 1, 16, 16) and float(raw.min()) > 0.0 and float(raw.max()) < 1.0
    assert rts.masks(images(1, 32), torch.tensor([1])).shape == (1, 1, 8, 8)


def test_mask_is_a_over_a_plus_b() -> None:
    network = tiny_network()
    x, c = images(2), torch.tensor([3, 5])
    with torch.no_grad():
        features = network.encode(x)
        masks = network.decode(features, c)
        # Recompute the two output channels and the ratio a / (a + b) by hand.
        s4 = features[3]
        gate = torch.sigmoid((s4 * network.selector.weight[c][:, :, None, None]).sum(1, keepdim=True))
        h = network.up2(network.up3(torch.cat([s4 * gate, gate], 1), features[2]), features[1])
        a, b = (4 * torch.tanh(network.to_saliency(h) / 4)).exp().unbind(1)
    ratio = (a / (a + b))[:, None]
    # The network ends with a fixed 3x3 box filter (borders: mean over the pixels inside).
    padded = F.pad(ratio, (1, 1, 1, 1))
    counts = F.pad(torch.ones_like(ratio), (1, 1, 1, 1))
    box = lambda t: sum(t[..., i : i + 16, j : j + 16] for i in range(3) for j in range(3))  # noqa: E731
    assert torch.allclose(masks, box(padded) / box(counts), atol=1e-6)
    network.mask_smoothing = 1
    with torch.no_grad():
        assert torch.allclose(network.decode(features, c), ratio, atol=1e-6)
    assert float(ratio.min()) >= torch.sigmoid(torch.tensor(-8.0)) - 1e-7
    assert float(ratio.max()) <= torch.sigmoid(torch.tensor(8.0)) + 1e-7


def test_batched_equals_per_sample() -> None:
    rts = Rts(tiny_classifier(), tiny_network())
    x, classes = images(4), torch.tensor([1, 2, 3, 7])
    batched = rts(x, classes)
    single = torch.cat([rts(x[i : i + 1], classes[i : i + 1]) for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_class_selector_changes_the_mask() -> None:
    rts = Rts(tiny_classifier(), tiny_network())
    x = images(1).expand(2, -1, -1, -1)
    masks = rts.masks(x, torch.tensor([0, 6]))
    assert float((masks[0] - masks[1]).abs().max()) > 1e-4


def test_surrogate_interpretation_loss_has_input_gradient() -> None:
    clf = tiny_classifier()
    rts = Rts(clf, tiny_network())
    x = images(2).requires_grad_(True)
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    with clf.frozen():
        maps, state = rts.surrogate(x, torch.tensor([2, 3]))
        (grad,) = torch.autograd.grad(F.mse_loss(maps, target), x)
        # the state carries the encoder's logits of the same pass (the attack's encoder term)
        assert torch.equal(state.encoder_logits, rts.encoder_logits(x))
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    # Only the input receives a gradient: the RTS network is frozen during the call.
    assert all(p.grad is None for p in rts.network.parameters())


def test_encoder_logits_are_differentiable_and_match_one_pass() -> None:
    rts = Rts(tiny_classifier(), tiny_network())
    x = images(2).requires_grad_(True)
    logits = rts.encoder_logits(x)
    assert logits.shape == (2, 10)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([4, 5])), x)
    assert float(grad.abs().sum()) > 0
    with torch.no_grad():
        masks, logits_once = rts.network.masks_and_logits(x, torch.tensor([4, 5]))
        assert torch.allclose(logits_once, logits, atol=1e-6)
        assert torch.allclose(masks, rts.masks(x, torch.tensor([4, 5])), atol=1e-6)


# ------------------------------------------------------------------------------ state hygiene


def test_state_restored_and_no_hooks_after_success_and_exception() -> None:
    clf = tiny_classifier()
    network = tiny_network()
    rts = Rts(clf, network)
    network.train()  # a user's network left in training mode, partially frozen
    network.up2.bn1.eval()
    network.selector.weight.requires_grad_(False)
    clf.model.layer1.train()
    clf.model.fc.weight.requires_grad_(False)
    before_clf, before_net = module_state(clf), module_state(network)
    x = images(2)
    with pytest.warns(UserWarning, match="training mode"):  # the classifier's own warning
        rts(x, [1, 2])
    rts.encoder_logits(x).sum()
    with pytest.raises(IndexError):  # fails inside the network's frozen context
        rts.surrogate(x, torch.tensor([1, 99]))
    with pytest.raises(InputError), pytest.warns(UserWarning, match="training mode"):
        rts(x, [1, 99])
    assert module_state(clf) == before_clf
    assert module_state(network) == before_net
    assert hook_count(clf) == 0 and hook_count(network) == 0
    # Running stats of the network's BatchNorms are not updated by explaining.
    stats = network.up3.bn1.running_mean.clone()
    with pytest.warns(UserWarning, match="training mode"):
        rts(x, [3, 4])
    assert torch.equal(stats, network.up3.bn1.running_mean)


def test_constructor_errors() -> None:
    clf = tiny_classifier()
    with pytest.raises(InputError, match="underfire train rts --model"):
        Rts(clf)
    with pytest.raises(InputError, match="classes"):
        Rts(clf, tiny_network(num_classes=5))
    with pytest.raises(InputError, match="not both"):
        Rts(clf, tiny_network(), checkpoint="x.safetensors")


# ------------------------------------------------------------------------------ objective


def test_area_loss_analytic() -> None:
    zeros, ones = torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)
    half = torch.zeros(1, 1, 16, 16)
    half[..., :4] = 1  # a quarter of the pixels
    assert area_loss(zeros).item() == pytest.approx(5e-4**0.3, rel=1e-5)
    assert area_loss(ones).item() == pytest.approx((1 + 5e-4) ** 0.3, rel=1e-5)
    expected = 0.25 * (1 + 5e-4) ** 0.3 + 0.75 * (5e-4) ** 0.3
    assert area_loss(half).item() == pytest.approx(expected, rel=1e-5)
    assert area_loss(half, power=1.0).item() == pytest.approx(0.25 + 5e-4, rel=1e-5)


def test_smoothness_loss_analytic() -> None:
    n = 16
    edge = torch.zeros(1, 1, n, n)
    edge[..., : n // 2] = 1  # one vertical edge: n of the 2n(n-1) neighbour pairs differ by 1
    assert smoothness_loss(edge).item() == pytest.approx(1 / (2 * (n - 1)), rel=1e-6)
    checker = ((torch.arange(n)[:, None] + torch.arange(n)[None]) % 2).float()[None, None]
    assert smoothness_loss(checker).item() == pytest.approx(1.0)  # every pair differs by 1
    assert smoothness_loss(torch.full((2, 1, n, n), 0.7)).tolist() == [0.0, 0.0]
    ramp = torch.linspace(0, 1, n).expand(n, n)[None, None]  # horizontal steps of 1/(n-1)
    assert smoothness_loss(ramp).item() == pytest.approx(0.5 / (n - 1) ** 2, rel=1e-5)


def test_apply_mask_and_blur() -> None:
    x = images(2, 32)
    alt = torch.zeros_like(x)
    assert torch.equal(apply_mask(x, torch.ones(2, 1, 8, 8), alt), x)
    assert torch.equal(apply_mask(x, torch.zeros(2, 1, 8, 8), alt), alt)
    constant = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(gaussian_blur(constant, 3.0), constant, atol=1e-6)
    blurred = gaussian_blur(x, 2.0)
    assert blurred.shape == x.shape and float(blurred.std()) < 0.5 * float(x.std())


def test_fake_selectors_only_pay_the_regularisers() -> None:
    clf = tiny_classifier()
    x = images(4)
    masks = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([0, 1, 2, 3])
    weights = RtsObjective()
    with clf.frozen():
        fake_loss, _ = rts_loss(clf, x, masks, classes, torch.zeros(4, dtype=torch.bool), weights)
        real_loss, parts = rts_loss(clf, x, masks, classes, torch.ones(4, dtype=torch.bool), weights)
    expected = (weights.area * area_loss(masks) + weights.smoothness * smoothness_loss(masks)).mean()
    assert fake_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    extra = weights.destroyer * parts["destroyer"] + weights.preserver * parts["preserver"]
    assert real_loss.item() == pytest.approx(expected.item() + extra, rel=1e-5)
    assert parts["destroyer"] >= 0 and parts["preserver"] >= 0


def test_fake_selectors_are_other_classes() -> None:
    labels = torch.arange(1000) % 10
    selectors, real = fake_selectors(labels, 10, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(selectors[real], labels[real])
    assert bool((selectors[~real] != labels[~real]).all())
    assert 0.3 < float((~real).float().mean()) < 0.5


def test_a_few_training_steps_reduce_the_loss_and_empty_fake_masks() -> None:
    clf = tiny_classifier()
    network = tiny_network()
    generator = torch.Generator().manual_seed(4)
    data = (torch.rand(32, 3, 32, 32, generator=generator) * 255).to(torch.uint8)
    labels = torch.arange(32) % 10
    x = data.float() / 255
    fake = (labels + 3) % 10
    with torch.no_grad():
        fake_area_before = float(network(x, fake).mean())
    before_clf = [p.clone() for p in clf.parameters()]
    before_encoder = [p.clone() for p in network.encoder.parameters()]
    config = RtsTrainConfig(epochs=6, batch_size=16, learning_rate=3e-2, fake_fraction=0.5, seed=0)
    records = train_steps(network, clf, data, labels, config)
    assert len(records) == 12
    first = sum(r["loss"] for r in records[:2]) / 2
    last = sum(r["loss"] for r in records[-2:]) / 2
    assert last < first
    with torch.no_grad():
        fake_area_after = float(network(x, fake).mean())
    assert fake_area_after < 0.5 * fake_area_before
    # The black box and the frozen encoder are untouched.
    assert all(torch.equal(a, b) for a, b in zip(before_clf, clf.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_encoder, network.encoder.parameters()))


# ------------------------------------------------------------------------------ measures


def test_pointing_game_and_topk_iou() -> None:
    objects = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    objects[:, :, 8:40, 8:40] = True
    perfect = F.avg_pool2d(objects.float(), 4)  # the object at 1/4 resolution
    wrong = 1 - perfect
    assert pointing_game(perfect, objects, tolerance=0).tolist() == [True, True]
    assert pointing_game(wrong, objects, tolerance=0).tolist() == [False, False]
    assert torch.allclose(topk_iou(perfect, objects), torch.ones(2))
    assert float(topk_iou(wrong, objects).max()) == 0.0
    # A quarter of the image as top-k with an object of 1/4 area: the object exactly.
    assert torch.allclose(topk_iou(perfect, objects, 0.25), torch.ones(2))


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path) -> None:
    network = tiny_network()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        network.up3.bn1.running_mean.uniform_(-1, 1)
        network.up3.bn1.running_var.uniform_(0.5, 2)
    path = save_saliency_network(network, tmp_path / "rts.safetensors", {"model": "tiny"})
    loaded, meta = load_saliency_network(path)
    assert meta["model"] == "tiny" and meta["network"]["decoder_width"] == 8
    clf = tiny_classifier()
    x, c = images(2), torch.tensor([1, 8])
    assert torch.equal(Rts(clf, network)(x, c), Rts(clf, checkpoint=path)(x, c))
    assert torch.equal(Rts(clf, network).encoder_logits(x), Rts(clf, loaded).encoder_logits(x))


def test_classifier_checkpoint_is_not_an_rts_network(tmp_path) -> None:
    from underfire.models import save_checkpoint

    path = save_checkpoint(
        ShapesResNet(widths=TINY).state_dict(), tmp_path / "clf.safetensors", {"architecture": "resnet"}
    )
    with pytest.raises(CheckpointError, match="not an RTS network"):
        load_saliency_network(path)


# ------------------------------------------------------------------------------ shipped networks


@pytest.fixture(scope="module")
def shapes_test() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ShapesDataset("test").tensors(range(100))


@pytest.mark.parametrize("name", ["shapes-resnet", "shapes-densenet"])
def test_shipped_networks_localise_objects(name: str, shapes_test) -> None:
    x, labels, objects = shapes_test
    clf = load_model(name).eval()
    rts = Rts(clf)
    assert rts.metadata["model"] == name and rts.metadata["input_size"] == 64
    maps = rts(x, labels)
    hits = pointing_game(maps, objects, tolerance=0)
    assert float(hits.float().mean()) >= 0.9
    true_area = float(rts.masks(x, labels).mean())
    fake_area = float(rts.masks(x, (labels + 1 + torch.arange(100) % 9) % 10).mean())
    assert fake_area < 0.25 * true_area
    assert math.isfinite(true_area) and true_area > 0.05
