"""Lay out the inputs of this example next to this file, offline, from two installed packages:

* ``cifar/``: the 20 CIFAR-10 test images foolbox ships (``foolbox/data/cifar10_NN_LABEL.png``),
  one subfolder per class (8 of the 10 classes occur);
* ``kerascnn.pt2``: the model as a ``torch.export`` program (``torch.export.save``);
* ``kerascnn.pt``: the model as a traced TorchScript archive.

    pip install --no-deps cifar-10-model==7.4.0 foolbox==3.3.4 && pip install h5py
    python examples/third-party-cifar/prepare.py
"""

import importlib.util
import shutil
from pathlib import Path

import torch
from kerascnn import keras_cnn

HERE = Path(__file__).resolve().parent
NAMES = (HERE / "classes.txt").read_text().split()


def main() -> None:
    data = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    for picture in sorted(data.glob("cifar10_*.png")):
        folder = HERE / "cifar" / NAMES[int(picture.stem.split("_")[-1])]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(picture, folder / picture.name)
    model = keras_cnn()
    example = torch.rand(2, 3, 32, 32) * 255
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(HERE / "kerascnn.pt2"))
    torch.jit.trace(model, example).save(str(HERE / "kerascnn.pt"))
    print(f"wrote {HERE / 'cifar'}, {HERE / 'kerascnn.pt2'} and {HERE / 'kerascnn.pt'}")


if __name__ == "__main__":
    main()
