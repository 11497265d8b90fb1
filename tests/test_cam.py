"""CAM (Zhou et al. 2016) and Grad-CAM (Selvaraju et al. 2017): analytic values on a hand-built
net, the GAP→linear identity Grad-CAM = ReLU(CAM)/(h·w), batching, differentiability, model state
and hooks, layer discovery and its overrides, and agreement with torch-cam, captum and
pytorch-grad-cam on torchvision models."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, snapshot
from test_classifier import mixed_state_model
from torch import nn

from underfire.errors import InputError, ModelStructureError
from underfire.interpreters.base import Interpreter, normalize_maps
from underfire.interpreters.cam import CAM, GradCAM
from underfire.interpreters.cam_layers import FeatureCapture
from underfire.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    ShapesDenseNet,
    ShapesResNet,
    load_model,
)
from underfire.models.specs import builtin_weights_path
from underfire.models.torchvision_compat import import_torchvision

INTERPRETERS: list[type[Interpreter]] = [CAM, GradCAM]


# --------------------------------------------------------------------------- tiny hand-built net
class HandNet(nn.Module):
    """1×1 conv (3 → 2 channels) → ReLU → GAP → linear (2 → 3 classes), fixed weights.

    The conv copies the red channel to feature 0 and the green channel to feature 1, so with
    images in [0, 1] the ReLU is the identity and CAM can be written down by hand.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.7, -3.0, 5.0]))  # CAM ignores the bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


RED = [[0.1, 0.2], [0.3, 0.4]]
GREEN = [[0.4, 0.1], [0.0, 0.2]]


def hand_classifier() -> Classifier:
    return Classifier(HandNet().eval(), input_size=2, name="hand")


def hand_image() -> torch.Tensor:
    return torch.tensor([RED, GREEN, [[0.9, 0.9], [0.9, 0.9]]]).unsqueeze(0)


def test_cam_equals_hand_computation_raw_and_normalised() -> None:
    clf, x = hand_classifier(), hand_image()
    cam = CAM(clf)
    red, green = np.array(RED), np.array(GREEN)
    expected_raw = {0: red - green, 1: 2 * red + 0.5 * green, 2: np.zeros((2, 2))}
    for c, raw in expected_raw.items():
        np.testing.assert_allclose(cam.raw(x, c)[0, 0].numpy(), raw, atol=1e-7)
    # by hand: class 0 raw = [[-0.3, 0.1], [0.3, 0.2]] → min-max → [[0, 2/3], [1, 5/6]]
    np.testing.assert_allclose(cam(x, 0)[0, 0].numpy(), [[0, 2 / 3], [1, 5 / 6]], atol=1e-6)
    np.testing.assert_allclose(cam(x, 1)[0, 0].numpy(), [[0, 0.1], [0.4, 1]], atol=1e-6)
    # class 2's weights are zero: its map is constant, which says nothing: refused in one line
    # (normalised, it would be zeros, not NaN)
    assert torch.equal(normalize_maps(cam.raw(x, 2)), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ModelStructureError, match="map of class 2 is constant") as error:
        cam(x, 2)
    assert "\n" not in str(error.value)
    # default class = the prediction: logits = W·mean(a) + b = [0.775, -2.4125, 5] → class 2
    torch.testing.assert_close(clf(x), torch.tensor([[0.775, -2.4125, 5.0]]))
    with pytest.raises(ModelStructureError, match="map of class 2 is constant"):
        cam(x)


def test_gradcam_equals_hand_computation() -> None:
    clf, x = hand_classifier(), hand_image()
    gradcam = GradCAM(clf)
    # α_k = w_{k,c}/(h·w) = w_{k,c}/4, map = ReLU(Σ α_k a_k)
    np.testing.assert_allclose(gradcam.raw(x, 0)[0, 0].numpy(), [[0, 0.025], [0.075, 0.05]], atol=1e-7)
    np.testing.assert_allclose(gradcam(x, 0)[0, 0].numpy(), [[0, 1 / 3], [1, 2 / 3]], atol=1e-6)


class InPlaceReluNet(nn.Module):
    """1×1 conv whose features can be negative, then a *functional in-place* ReLU (as torchvision's
    DenseNet applies after ``features``), GAP and a linear head. ``inplace=False`` is the same net
    without the in-place write."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -1.0, 0], [0, 1.0, -0.5]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5], [-1.0, 3.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        features = torch.relu_(features) if self.inplace else torch.relu(features)
        return self.fc(features.mean((2, 3)))


def test_cam_reads_features_the_model_later_overwrites_in_place() -> None:
    """The hook keeps the feature tensor without copying it; a model that writes to it in place
    is detected (version counter), re-run with a copy (and copied from then on, by that
    interpreter), and gives the out-of-place model's maps and input gradients."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 4, 4)
    classes = torch.tensor([0, 1, 2])
    reference = Classifier(InPlaceReluNet(inplace=False).eval(), input_size=4, name="copy")
    in_place = Classifier(InPlaceReluNet(inplace=True).eval(), input_size=4, name="in-place")
    for interpreter in (CAM, GradCAM):
        ours, theirs = interpreter(in_place), interpreter(reference)
        assert ours.layers.post_relu and theirs.layers.post_relu
        torch.testing.assert_close(ours(x, classes), theirs(x, classes))
        grads = []
        for clf, explainer in ((in_place, ours), (reference, theirs)):
            image = x.clone().requires_grad_(True)
            with clf.frozen():
                maps, _ = explainer.surrogate(image, classes)
                (grad,) = torch.autograd.grad(maps.square().sum(), image)
            grads.append(grad)
        assert grads[1].abs().sum() > 0
        torch.testing.assert_close(grads[0], grads[1])
        assert ours.capture.copy_features and not theirs.capture.copy_features
    # inference tensors have no version counter: the hook copies them, the maps stay the same
    fresh = Classifier(InPlaceReluNet(inplace=True).eval(), input_size=4, name="inference")
    with torch.inference_mode():
        maps = CAM(fresh)(x, classes)
    torch.testing.assert_close(maps, CAM(reference)(x, classes))


@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_surrogate_gradient_matches_finite_differences(interpreter: type[Interpreter]) -> None:
    """The surrogate's input gradient is the true one (double precision gradcheck)."""
    torch.manual_seed(0)
    net = HandNet()
    with torch.no_grad():
        net.conv.weight.copy_(torch.randn(2, 3, 1, 1))
        net.fc.weight.copy_(torch.randn(3, 2))
    clf = Classifier(net.eval(), input_size=4).double()
    explainer = interpreter(clf)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    classes = torch.tensor([0, 1])
    with clf.frozen():
        assert torch.autograd.gradcheck(lambda t: explainer.surrogate(t, classes)[0], (x,))


# --------------------------------------------------------------------------- built-in models
def random_classifier(cls: type[nn.Module]) -> Classifier:
    torch.manual_seed(0)
    net = cls().eval()
    # random BatchNorm statistics, so the random-init maps are not degenerate
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return Classifier(net, IMAGENET_MEAN, IMAGENET_STD, input_size=64, name=cls.__name__)


def trained_classifier(name: str) -> Classifier:
    if not builtin_weights_path(name).exists():
        pytest.skip(f"the built-in weights of {name} are not there yet")
    return load_model(name)


MODELS: dict[str, Callable[[], Classifier]] = {
    "resnet-random": lambda: random_classifier(ShapesResNet),
    "densenet-random": lambda: random_classifier(ShapesDenseNet),
    "shapes-resnet": lambda: trained_classifier("shapes-resnet"),
    "shapes-densenet": lambda: trained_classifier("shapes-densenet"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> Classifier:
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    from underfire.data import ShapesDataset

    return ShapesDataset("test").tensors(range(4))[0]


def test_gradcam_is_relu_cam_over_area(model: Classifier, images: torch.Tensor) -> None:
    classes = torch.tensor([0, 3, 7, 9])
    cam = CAM(model).raw(images, classes)
    gradcam = GradCAM(model).raw(images, classes)
    h, w = cam.shape[2:]
    expected = torch.relu(cam) / (h * w)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(gradcam, expected, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_batched_equals_per_sample_shape_range_determinism(
    model: Classifier, images: torch.Tensor, interpreter: type[Interpreter]
) -> None:
    explainer = interpreter(model)
    maps = explainer(images)
    assert maps.shape == (4, 1, 8, 8)
    assert not maps.requires_grad
    flat = maps.flatten(1)
    assert bool((flat.min(1).values == 0).all()) and bool(torch.allclose(flat.max(1).values, torch.ones(4)))
    single = torch.cat([explainer(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(maps, single, rtol=0, atol=1e-5)
    assert torch.equal(maps, explainer(images))  # deterministic
    # default classes are the predictions
    assert torch.equal(maps, explainer(images, model.predict(images).argmax(1)))


@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_surrogate_equals_explain_and_interpretation_loss_has_input_gradient(
    model: Classifier, images: torch.Tensor, interpreter: type[Interpreter]
) -> None:
    explainer = interpreter(model)
    # the predicted classes: Grad-CAM of a class with negative evidence everywhere is the zero
    # map, whose gradient is zero (as after the ADV² warm start, the class is the predicted one)
    classes = model.predict(images).argmax(1)
    target = torch.zeros(4, 1, 8, 8)
    target[..., 2:6, 2:6] = 1.0
    # the layout the attack hands to the surrogate (prepare_images), so the floats match exactly
    x = model.prepare_images(images).clone().requires_grad_(True)
    with model.frozen():
        maps, state = explainer.surrogate(x, classes)
        loss = F.mse_loss(maps, target)
        (grad,) = torch.autograd.grad(loss, x)
    assert state is None
    torch.testing.assert_close(maps.detach(), explainer(images, classes), rtol=0, atol=1e-6)
    assert bool(torch.isfinite(grad).all())
    assert bool((grad.flatten(1).abs().sum(1) > 0).all())  # every sample gets gradient
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- state and hooks
class Tripwire(nn.Module):
    """Identity on the pooled vector, or (when set) raise / shift it after layer discovery."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "raise":
            raise RuntimeError("forward failed on purpose")
        return x + 1.0 if self.mode == "shift" else x


class StatefulNet(nn.Module):
    """conv → BatchNorm → ReLU → conv → GAP → Tripwire → linear, for the state and hook tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.trip = Tripwire()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(self.trip(self.drop(features.mean((2, 3)))))


def hook_count(module: nn.Module) -> int:
    dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    return sum(len(getattr(m, name)) for m in module.modules() for name in dicts)


def model_state(clf: Classifier) -> tuple[list[bool], list[bool], dict[str, torch.Tensor]]:
    return (
        [m.training for m in clf.modules()],
        [p.requires_grad for p in clf.parameters()],
        {k: v.clone() for k, v in clf.state_dict().items()},
    )


def assert_same_state(clf: Classifier, before: tuple) -> None:
    training, requires_grad, state = model_state(clf)
    assert training == before[0]
    assert requires_grad == before[1]
    assert state.keys() == before[2].keys()
    assert all(torch.equal(state[k], before[2][k]) for k in state)
    assert hook_count(clf) == 0
    assert not nn.modules.module._global_forward_hooks
    assert not nn.modules.module._global_backward_hooks


@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_no_hook_and_state_restored_after_success_and_exceptions(
    interpreter: type[Interpreter],
) -> None:
    torch.manual_seed(0)
    net = StatefulNet()
    clf = Classifier(net, input_size=8, name="stateful")
    net.train()
    net.conv2.eval()  # mixed flags must come back individually
    net.conv1.weight.requires_grad_(False)
    x = torch.rand(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "in training mode" warnings
        explainer = interpreter(clf)
        before = model_state(clf)
        assert hook_count(clf) == 0

        calls: list[Callable[[], object]] = [
            lambda: explainer(x),
            lambda: explainer.raw(x, [0, 4]),
            lambda: _surrogate_backward(explainer, clf, x),
        ]
        for call in calls:
            call()
            assert_same_state(clf, before)

        with pytest.raises(InputError, match="unknown class 7"):
            explainer(x, [0, 7])
        assert_same_state(clf, before)
        with pytest.raises(InputError, match="unknown class"):
            explainer.raw(x, -1)
        assert_same_state(clf, before)

        net.trip.mode = "raise"
        for call in calls:
            with pytest.raises(RuntimeError, match="on purpose"):
                call()
            assert_same_state(clf, before)

        net.trip.mode = "shift"  # logits no longer head(mean(features))
        if interpreter is GradCAM:
            with pytest.raises(ModelStructureError, match="GAP→linear"):
                explainer(x, 0)
            assert_same_state(clf, before)
        net.trip.mode = None
        assert torch.equal(explainer(x, 0), explainer(x, 0))
        assert_same_state(clf, before)


def _surrogate_backward(explainer: Interpreter, clf: Classifier, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    with clf.frozen():
        maps, _ = explainer.surrogate(x, torch.tensor([1, 3]))
        torch.autograd.grad(maps.square().sum(), x)


def test_model_without_gap_linear_head_is_refused_by_cam_and_read_by_grad_cam() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    clf = Classifier(net.eval(), input_size=8)
    with pytest.raises(ModelStructureError, match="GAP→linear"):
        CAM(clf)
    grad_cam = GradCAM(clf)  # ∂z_c/∂a_k through the model's own Flatten→dense head
    assert (grad_cam.layers.feature_name, grad_cam.layers.head) == ("0", None)
    maps = grad_cam(torch.rand(2, 3, 8, 8), torch.tensor([0, 3]))
    assert maps.shape == (2, 1, 6, 6)
    with pytest.raises(ModelStructureError, match="GAP→linear"):
        GradCAM(clf, head="2")  # a named head asks for the GAP reading
    assert hook_count(clf) == 0


# --------------------------------------------------------------------------- layer discovery
def torchvision_models() -> object:
    return import_torchvision().models


@pytest.mark.parametrize(
    ("build", "size", "feature", "head", "post_relu", "side"),
    [
        (lambda: ShapesResNet(), 64, "layer4", "fc", False, 8),
        (lambda: ShapesDenseNet(), 64, "features", "classifier", True, 8),
        (lambda: torchvision_models().resnet18(num_classes=7), 64, "layer4", "fc", False, 2),
        (lambda: torchvision_models().densenet121(num_classes=5), 64, "features", "classifier", True, 2),
    ],
    ids=["shapes-resnet", "shapes-densenet", "tv-resnet18", "tv-densenet121"],
)
def test_cam_layers_are_found(build, size, feature, head, post_relu, side) -> None:
    model = build().eval()
    capture = FeatureCapture(Classifier(model, input_size=size))
    layers = capture.layers
    assert (layers.feature_name, layers.head_name, layers.post_relu) == (feature, head, post_relu)
    # The defining property of CAM's layers: GAP of the feature map through the head = logits.
    images = torch.rand(2, 3, size, size)
    features, logits = capture.features_and_logits(images)
    assert features.shape[2:] == (side, side)
    torch.testing.assert_close(layers.head(features.mean((2, 3))), logits, rtol=1e-4, atol=1e-4)
    assert not model._forward_hooks and not layers.feature_module._forward_hooks


def test_features_carry_gradient_to_the_input() -> None:
    clf = Classifier(ShapesDenseNet().eval(), input_size=64)
    capture = FeatureCapture(clf)
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    with clf.frozen():
        features, _ = capture.features_and_logits(images)
        (grad,) = torch.autograd.grad(features.sum(), images)
    assert grad.abs().sum() > 0


def test_layer_overrides_and_errors() -> None:
    clf = Classifier(ShapesResNet().eval(), input_size=64, feature_layer="layer4", head="fc")
    assert clf.cam_layer_names == ("layer4", "fc")
    assert FeatureCapture(clf).layers.feature_name == "layer4"
    with pytest.raises(ModelStructureError, match="'layer3' outputs a feature map"):
        FeatureCapture(Classifier(ShapesResNet().eval(), input_size=64, feature_layer="layer3"))
    with pytest.raises(ModelStructureError, match="'nope' is not a module"):
        FeatureCapture(Classifier(ShapesResNet().eval(), input_size=64, head="nope"))
    with pytest.raises(ModelStructureError, match="not nn.Linear"):
        FeatureCapture(Classifier(ShapesResNet().eval(), input_size=64, head="conv1"))


@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_interpreter_layer_options_override_the_classifiers_hints(interpreter: type[Interpreter]) -> None:
    hinted = Classifier(ShapesResNet().eval(), input_size=64, feature_layer="layer3")
    explainer = interpreter(hinted, feature_layer="layer4", head="fc")
    assert (explainer.layers.feature_name, explainer.layers.head_name) == ("layer4", "fc")
    assert hinted.cam_layer_names == ("layer3", None)  # the classifier's hints stay as given
    if interpreter.needs_gap_head:
        with pytest.raises(ModelStructureError, match="'layer3' outputs a feature map"):
            interpreter(hinted)
        with pytest.raises(ModelStructureError, match="'layer3' outputs a feature map"):
            interpreter(Classifier(ShapesResNet().eval(), input_size=64), feature_layer="layer3")
    else:  # Grad-CAM reads a layer that feeds no GAP head through the model's own forward
        for built in (
            interpreter(hinted),
            interpreter(Classifier(ShapesResNet().eval(), input_size=64), feature_layer="layer3"),
        ):
            assert (built.layers.feature_name, built.layers.head) == ("layer3", None)
    with pytest.raises(ModelStructureError, match="'nope' is not a module"):
        interpreter(Classifier(ShapesResNet().eval(), input_size=64), head="nope")


def test_plain_callables_are_refused() -> None:
    linear = nn.Linear(3, 2)
    clf = Classifier(lambda x: linear(x.mean((2, 3))))
    with pytest.raises(ModelStructureError, match="nn.Module"):
        FeatureCapture(clf)
    for interpreter in INTERPRETERS:
        with pytest.raises(ModelStructureError, match="nn.Module"):
            interpreter(clf)


def test_discovery_refuses_models_without_gap_linear_head() -> None:
    flatten_head = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    with pytest.raises(ModelStructureError, match="GAP→linear head"):
        FeatureCapture(Classifier(flatten_head, input_size=8))
    conv_only = nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(ModelStructureError, match="no nn.Linear layer produces the model's logits"):
        FeatureCapture(Classifier(conv_only, input_size=8))


def test_discovery_leaves_no_hooks_and_no_state_change() -> None:
    model = mixed_state_model()
    before = snapshot(model)
    with pytest.warns(UserWarning):
        FeatureCapture(Classifier(model, input_size=64))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- oracles
ORACLE_SIZE = 96  # 3×3 final feature maps for torchvision's ResNet-18 and DenseNet-121


class DenseNetReLUModule(nn.Module):
    """torchvision DenseNet with its functional final ReLU as an ``nn.ReLU`` module, sharing the
    weights, so hook-based oracles can read the post-ReLU feature map CAM uses."""

    def __init__(self, densenet: nn.Module) -> None:
        super().__init__()
        self.features = densenet.features
        self.relu = nn.ReLU()
        self.classifier = densenet.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.relu(self.features(x)).mean((2, 3)))


@pytest.fixture(scope="module", params=["resnet18", "densenet121"])
def torchvision_case(request: pytest.FixtureRequest) -> tuple[Classifier, nn.Module, str, str]:
    """(our classifier on the original torchvision net, oracle model, its layer, its head)."""
    from underfire.models.torchvision_compat import import_torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tv = import_torchvision()
    torch.manual_seed(0)
    net = getattr(tv.models, request.param)(weights=None).eval()
    clf = Classifier(net, IMAGENET_MEAN, IMAGENET_STD, input_size=ORACLE_SIZE, name=request.param)
    layers = CAM(clf).layers
    if request.param == "resnet18":
        assert layers.feature_name == "layer4" and not layers.post_relu
        return clf, net, "layer4", "fc"
    assert layers.feature_name == "features" and layers.post_relu
    return clf, DenseNetReLUModule(net).eval(), "relu", "classifier"


@pytest.fixture(scope="module")
def oracle_inputs(torchvision_case: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images and classes: an arbitrary class (3) for the first, whose Grad-CAM map is all
    zeros with these random weights, and the predicted class for the second (a non-trivial map)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, ORACLE_SIZE, ORACLE_SIZE, generator=generator)
    predicted = torchvision_case[0].predict(x[1:]).argmax(1)
    return x, torch.cat([torch.tensor([3]), predicted])


def _assert_maps_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    theirs = theirs.reshape(ours.shape).to(ours.dtype)
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * scale)


def test_cam_matches_torchcam(torchvision_case: tuple, oracle_inputs: tuple) -> None:
    methods = pytest.importorskip("torchcam.methods")
    clf, oracle_model, layer, head = torchvision_case
    x, classes = oracle_inputs
    with methods.CAM(oracle_model, layer, head, input_shape=(3, ORACLE_SIZE, ORACLE_SIZE)) as extractor:
        with torch.no_grad():
            oracle_model(clf.normalize(x))
        theirs_raw = extractor(classes.tolist(), normalized=False)[0]
        theirs = extractor(classes.tolist(), normalized=True)[0]
    cam = CAM(clf)
    _assert_maps_close(cam.raw(x, classes), theirs_raw)  # torch-cam's CAM has no ReLU either
    _assert_maps_close(cam(x, classes), theirs)
    assert hook_count(oracle_model) == 0 and hook_count(clf) == 0


def test_gradcam_matches_captum(torchvision_case: tuple, oracle_inputs: tuple) -> None:
    pytest.importorskip("captum")
    from captum.attr import LayerGradCam

    clf, oracle_model, layer, _ = torchvision_case
    x, classes = oracle_inputs
    oracle = LayerGradCam(oracle_model, oracle_model.get_submodule(layer))
    theirs = oracle.attribute(clf.normalize(x), target=classes, relu_attributions=True).detach()
    gradcam = GradCAM(clf)
    _assert_maps_close(gradcam.raw(x, classes), theirs)
    # min-max normalised, as compared by users of either library (an all-zero map stays zero)
    flat = theirs.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    _assert_maps_close(gradcam(x, classes), (flat - low) / (high - low).clamp_min(1e-12))


def test_gradcam_matches_pytorch_grad_cam(torchvision_case: tuple, oracle_inputs: tuple) -> None:
    pytest.importorskip("cv2")
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    clf, oracle_model, layer, _ = torchvision_case
    x, classes = oracle_inputs
    target_layer = oracle_model.get_submodule(layer)
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    xn = clf.normalize(x)
    with grad_cam.GradCAM(oracle_model, [target_layer]) as oracle:
        upsampled = oracle(input_tensor=xn, targets=targets)  # ReLU, normalise, resize to input
        activations = oracle.activations_and_grads.activations[0].numpy()
        gradients = oracle.activations_and_grads.gradients[0].numpy()
        # its own map before the resize: weights = spatial mean of the gradients, then ReLU
        raw = oracle.get_cam_image(xn, target_layer, targets, activations, gradients)
    assert upsampled.shape == (2, ORACLE_SIZE, ORACLE_SIZE)
    _assert_maps_close(GradCAM(clf).raw(x, classes), torch.from_numpy(np.maximum(raw, 0)))
    assert hook_count(oracle_model) == 0
