"""Import torchvision even when its compiled operators do not match the installed torch.

A torchvision wheel built for another torch variant (e.g. a CUDA build next to the CPU torch)
fails on import with "operator torchvision::nms does not exist", because its Python code registers
fake kernels for operators its C++ library should have defined. Defining the two operator schemas
it needs (``torchvision::nms``, ``torchvision::qnms``) lets the models and transforms import; the
detection ops themselves stay unavailable, which underfire never uses.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

import torch

from ..errors import SpecError

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)


def import_torchvision() -> ModuleType:
    """Return the torchvision module, repairing a torch/torchvision build mismatch if needed."""
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError:
        raise SpecError("torchvision is not installed; install underfire[torchvision] for torchvision: specs") from None
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
    # The registry keeps the definitions only while the Library object lives; torch holds a
    # reference on the op handles it creates, and we keep one on the module for good measure.
    module = importlib.import_module("torchvision")
    module._underfire_schema_library = library  # type: ignore[attr-defined]
    warnings.warn(
        "torchvision's compiled operators do not match this torch build; underfire defined the "
        "missing nms/qnms schemas so models and transforms work (torchvision.ops will not)",
        stacklevel=2,
    )
    return module
