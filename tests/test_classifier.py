"""The classifier wrapper: normalisation inside, state restored, inputs validated (CAM layer
discovery: ``test_cam.py``)."""

from __future__ import annotations

import pytest
import torch
from model_state import assert_unchanged, snapshot
from torch import nn

from underfire import Classifier, InputError, ModelStructureError
from underfire.models import ShapesResNet


class Recorder(nn.Module):
    """Records exactly what the wrapped network receives."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: torch.Tensor | None = None
        self.linear = nn.Linear(3, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return self.linear(x.mean((2, 3)))


def mixed_state_model() -> nn.Module:
    """A model whose modules and parameters start in a deliberately mixed state."""
    model = ShapesResNet()
    model.train()
    model.layer2.eval()
    model.conv1.weight.requires_grad_(False)
    return model


def test_normalisation_happens_inside_forward() -> None:
    net = Recorder()
    clf = Classifier(net, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    images = torch.rand(2, 3, 5, 5)
    clf(images)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(net.seen, (images - mean) / std)


def test_identity_normalisation_by_default() -> None:
    net = Recorder()
    clf = Classifier(net)
    images = torch.rand(1, 3, 4, 4)
    clf(images)
    assert torch.equal(net.seen, images)


def test_frozen_sets_eval_and_restores_after_success() -> None:
    model = mixed_state_model()
    before = snapshot(model)
    clf = Classifier(model, name="mixed")
    with pytest.warns(UserWarning, match="training mode"), clf.frozen():
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        clf(torch.rand(4, 3, 64, 64))  # BatchNorm statistics must not move
    assert_unchanged(model, before)


def test_frozen_restores_after_exception() -> None:
    model = mixed_state_model()
    before = snapshot(model)
    clf = Classifier(model)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="boom"):
        with clf.frozen():
            clf(torch.rand(2, 3, 64, 64))
            raise RuntimeError("boom")
    assert_unchanged(model, before)


def test_predict_leaves_a_training_model_unchanged() -> None:
    model = mixed_state_model()
    before = snapshot(model)
    clf = Classifier(model)
    with pytest.warns(UserWarning, match="training mode"):
        first = clf.predict(torch.rand(3, 3, 64, 64))
    assert first.shape == (3, 10)
    assert_unchanged(model, before)


def test_eval_model_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    clf = Classifier(ShapesResNet().eval())
    clf.predict(torch.rand(1, 3, 64, 64))
    assert not [w for w in recwarn if "training mode" in str(w.message)]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([[0.0]], "must be a torch.Tensor"),
        (torch.rand(3, 8, 8), "add a batch dimension"),
        (torch.rand(2, 8, 8), "must be a batch"),
        (torch.rand(1, 1, 3, 8, 8), "shape"),
        (torch.rand(0, 3, 8, 8), "empty batch"),
        (torch.rand(1, 4, 8, 8), "4 channels, the model expects 3"),
        ((torch.rand(1, 3, 8, 8) * 255).to(torch.uint8), "floating point"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN or Inf"),
        (torch.full((1, 3, 8, 8), float("inf")), "NaN or Inf"),
        (torch.rand(1, 3, 8, 8) * 2 - 1, r"must be in \[0, 1\]"),
        (torch.rand(1, 3, 8, 8) + 1.5, r"must be in \[0, 1\]"),
    ],
)
def test_bad_images_get_one_line_errors(images: object, message: str) -> None:
    clf = Classifier(Recorder())
    with pytest.raises(InputError, match=message) as info:
        clf.check_images(images)
    assert "\n" not in str(info.value)


def test_nan_error_names_the_bad_images() -> None:
    images = torch.rand(4, 3, 8, 8)
    images[2, 0, 1, 1] = float("nan")
    with pytest.raises(InputError, match=r"batch indices \[2\]"):
        Classifier(Recorder()).check_images(images)


def test_valid_images_pass_unchanged() -> None:
    images = torch.rand(2, 3, 8, 8)
    assert Classifier(Recorder()).check_images(images) is images


class ViewNet(nn.Module):
    """A conv net that flattens its feature map with ``.view``: it cannot take NHWC tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.linear = nn.Linear(2 * 8 * 8, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        return self.linear(features.view(features.shape[0], -1))


def test_prepare_images_picks_channels_last_for_conv_models_on_cpu() -> None:
    images = torch.rand(2, 3, 8, 8)
    clf = Classifier(mixed_state_model())
    before = snapshot(clf)
    prepared = clf.prepare_images(images)
    assert prepared.is_contiguous(memory_format=torch.channels_last) and not prepared.is_contiguous()
    assert torch.equal(prepared, images)  # same values, other strides
    assert_unchanged(clf, before)  # the probe forward left mode and parameters alone
    # no convolution (Recorder) or told not to: the batch is handed on as it came
    assert Classifier(Recorder()).prepare_images(images).is_contiguous()
    assert Classifier(ShapesResNet().eval(), channels_last=False).prepare_images(images).is_contiguous()


def test_model_that_cannot_take_channels_last_falls_back_to_nchw() -> None:
    images = torch.rand(2, 3, 8, 8)
    clf = Classifier(ViewNet())
    with pytest.raises(RuntimeError, match="view"):  # the reason for the probe
        clf(images.contiguous(memory_format=torch.channels_last))
    prepared = clf.prepare_images(images)
    assert prepared.is_contiguous()
    torch.testing.assert_close(clf.predict(images), clf(images), rtol=0, atol=0)


def test_channels_last_changes_no_value_beyond_float_rounding() -> None:
    from underfire.interpreters import build_interpreter

    torch.manual_seed(0)
    network = ShapesResNet().eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fast, plain = Classifier(network), Classifier(network, channels_last=False)
    assert fast.prepare_images(images).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast.predict(images), plain.predict(images), rtol=1e-5, atol=1e-5)
    for name in ("grad", "cam"):
        classes = [1, 2, 3]
        torch.testing.assert_close(
            build_interpreter(name, fast)(images, classes),
            build_interpreter(name, plain)(images, classes),
            rtol=1e-4,
            atol=1e-5,
        )


def test_channels_last_option_is_checked() -> None:
    with pytest.raises(InputError, match="channels_last"):
        Classifier(Recorder(), channels_last="yes")  # type: ignore[arg-type]


def test_classes_are_checked() -> None:
    clf = Classifier(Recorder(), class_names=["a", "b", "c", "d"])
    assert clf.check_classes(2, 3).tolist() == [2, 2, 2]
    assert clf.check_classes(["b", "d"], 2).tolist() == [1, 3]
    assert clf.check_classes(torch.tensor([0, 3]), 2).tolist() == [0, 3]
    with pytest.raises(InputError, match="unknown class 4: the model has 4 classes"):
        clf.check_classes([1, 4], 2)
    with pytest.raises(InputError, match="unknown class -1"):
        clf.check_classes(-1, 1)
    with pytest.raises(InputError, match="unknown class 'zebra'"):
        clf.check_classes("zebra", 1)
    with pytest.raises(InputError, match="3 classes for 2 images"):
        clf.check_classes([0, 1, 2], 2)
    with pytest.raises(InputError, match="integers"):
        clf.check_classes(torch.tensor([0.5]), 1)


def test_num_classes_is_probed_when_unknown() -> None:
    assert Classifier(Recorder()).num_classes == 4


def test_bad_normalisation_is_refused() -> None:
    with pytest.raises(InputError, match="std must be positive"):
        Classifier(Recorder(), std=(0.2, 0.0, 0.2))
    with pytest.raises(InputError, match="mean has 2 values for 3 channels"):
        Classifier(Recorder(), mean=(0.2, 0.2))


def test_plain_callables_are_accepted() -> None:
    linear = nn.Linear(3, 2)
    clf = Classifier(lambda x: linear(x.mean((2, 3))))
    assert clf.predict(torch.rand(2, 3, 4, 4)).shape == (2, 2)  # CAM refuses them: test_cam.py


def test_tuple_output_gets_a_clear_error() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.mean((2, 3)), x

    with pytest.raises(ModelStructureError, match="not a logits tensor"):
        Classifier(Pair().eval()).predict(torch.rand(1, 3, 4, 4))


def test_channels_last_only_for_small_inputs() -> None:
    """Measured: channels-last speeds up the 64-px models and gives ResNet-50 at 224 px nothing (benchmarks.layout)."""
    from underfire import load_model
    from underfire.models.classifier import CHANNELS_LAST_MAX_PIXELS

    small = load_model("shapes-resnet")
    assert small.prepare_images(torch.rand(2, 3, 64, 64)).is_contiguous(memory_format=torch.channels_last)
    large = load_model("torchvision:resnet18@random")
    side = int(CHANNELS_LAST_MAX_PIXELS**0.5) + 1
    prepared = large.prepare_images(torch.rand(1, 3, side, side))
    assert prepared.is_contiguous() and not prepared.is_contiguous(memory_format=torch.channels_last)
