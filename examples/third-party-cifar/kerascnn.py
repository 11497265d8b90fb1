"""The CIFAR-10 CNN that the PyPI package cifar-10-model ships (cifar_10_model/trained_models/
cnn_model.h5, trained with Keras by its author), rebuilt in torch from its layer config and loaded
from the installed package's HDF5 file: conv→ReLU→BN twice per block, max-pooling, a dense head
(Flatten→1024→512→10, each with a ReLU, as the Keras model has). Input: 0..255 RGB pixels."""

import importlib.util
from pathlib import Path

import h5py
import torch
from torch import nn


def _block(cin, cout, pool):
    layers = []
    for a, b in ((cin, cout), (cout, cout)):
        layers += [nn.Conv2d(a, b, 3), nn.ReLU(), nn.BatchNorm2d(b, eps=1e-3)]
    layers.append(nn.MaxPool2d(2, 2) if pool else nn.Identity())
    return nn.Sequential(*layers)


class KerasCifarCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1, self.block2, self.block3 = _block(3, 64, True), _block(64, 128, True), _block(128, 64, False)
        self.dense = nn.Sequential(
            nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10), nn.ReLU()
        )

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        return self.dense(x.permute(0, 2, 3, 1).flatten(1))  # Keras flattens NHWC


def weights_file() -> Path:
    folder = importlib.util.find_spec("cifar_10_model").submodule_search_locations[0]
    return Path(folder) / "trained_models" / "cnn_model.h5"


def keras_cnn() -> nn.Module:
    model = KerasCifarCNN()
    with h5py.File(weights_file(), "r") as f:
        w = f["model_weights"]

        def get(layer: str, name: str) -> torch.Tensor:
            return torch.from_numpy(w[layer][layer][name + ":0"][()])

        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        denses = [m for m in model.modules() if isinstance(m, nn.Linear)]
        for i, conv in enumerate(convs):
            name = "conv2d" if i == 0 else f"conv2d_{i}"
            conv.weight.data = get(name, "kernel").permute(3, 2, 0, 1).contiguous()
            conv.bias.data = get(name, "bias")
        for i, norm in enumerate(norms):
            name = "batch_normalization" if i == 0 else f"batch_normalization_{i}"
            norm.weight.data, norm.bias.data = get(name, "gamma"), get(name, "beta")
            norm.running_mean.data, norm.running_var.data = get(name, "moving_mean"), get(name, "moving_variance")
        for i, dense in enumerate(denses):
            name = "dense" if i == 0 else f"dense_{i}"
            dense.weight.data = get(name, "kernel").t().contiguous()
            dense.bias.data = get(name, "bias")
    return model.eval()
