"""ImageNet-size models at 224 px (torchvision ResNet-50 and DenseNet-169, random weights: nothing
is downloaded) through every interpreter and both attacks, one image and one step each (about
70 s on one CPU thread)."""

from __future__ import annotations

import pytest
import torch

from underfire import load_model
from underfire.attacks import ADV2, PGD, AttackConfig
from underfire.interpreters import Rts, SaliencyNetwork, build_interpreter
from underfire.models import ShapesResNet

#: Cheap settings where an interpreter's default is expensive at 224 px on a CPU.
OPTIONS = {"smoothgrad": {"samples": 2}, "mask": {"iterations": 3}}


def interpreter(name: str, classifier):
    if name == "rts":  # no RTS network ships for torchvision models: an untrained one of the right size
        torch.manual_seed(0)
        return Rts(
            classifier, SaliencyNetwork(classifier.num_classes, ShapesResNet(num_classes=classifier.num_classes)).eval()
        )
    return build_interpreter(name, classifier, **OPTIONS.get(name, {}))


@pytest.mark.parametrize("spec", ["torchvision:resnet50@random", "torchvision:densenet169@random"])
@pytest.mark.parametrize("name", ["grad", "smoothgrad", "cam", "gradcam", "rts", "mask"])
def test_every_interpreter_and_attack_at_224(spec: str, name: str) -> None:
    classifier = load_model(spec)
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = classifier.predict(images).argmax(1)
    targets = (labels + 1) % classifier.num_classes
    explainer = interpreter(name, classifier)
    if name == "gradcam":
        # on random weights Grad-CAM's map of a class can be degenerate (one positive cell, the
        # rest zero after its ReLU: min-max then has no input gradient, and the attack rightly
        # refuses; so for labels + 1 on this CPU): attack the next class whose map has a gradient
        for shift in range(1, 50):
            candidate = (labels + shift) % classifier.num_classes
            x = images.clone().requires_grad_(True)
            with classifier.frozen():
                surrogate, _ = explainer.surrogate(x, candidate)
                (gradient,) = torch.autograd.grad(surrogate.pow(2).sum(), x)
            if gradient.abs().max() > 0:
                targets = candidate
                break
    maps = explainer(images, labels)
    assert maps.shape[:2] == (1, 1) and torch.isfinite(maps).all() and 0 <= maps.min() and maps.max() <= 1
    config = AttackConfig(pgd_steps=1, adv_steps=1)
    eps = config.eps + 1e-6
    for attack in (PGD(classifier, config), ADV2(classifier, config, interpreter=explainer)):
        result = attack(images, targets, labels=labels)
        assert (result.adversarial - images).abs().max() <= eps and torch.isfinite(result.adversarial).all()
