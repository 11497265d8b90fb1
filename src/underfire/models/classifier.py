"""The classifier wrapper: one object that owns pixel space, normalisation and the model's state.

Everything in underfire works on images in [0, 1], NCHW, unnormalised (foolbox's lesson: the model
wrapper owns bounds and preprocessing, so attacks never round-trip through normalised space).
The wrapper normalises inside ``forward``, runs the model frozen (eval mode, no parameter
gradients) and restores every module's training flag and every parameter's ``requires_grad``
afterwards — also when an exception is raised — so a user's model is never changed by an
explanation or an attack (the BatchNorm-statistics pitfall of torchattacks and captum users).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import InputError, ModelStructureError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Tolerance for the [0, 1] range check: images that went through float arithmetic
#: (e.g. ``x + delta`` then clamping in another dtype) may overshoot by rounding error.
RANGE_TOLERANCE = 1e-5
#: Inputs larger than this (pixels per image) stay NCHW on the CPU: channels-last speeds up small
#: images' convolutions, not ImageNet-sized ones (``python -m benchmarks.layout``), and NCHW skips
#: the layout probe's forward pass.
CHANNELS_LAST_MAX_PIXELS = 128 * 128


class Classifier(nn.Module):
    """Wrap any model that maps normalised images to logits so callers work in [0, 1] pixels.

    Args:
        model: an ``nn.Module`` (or any callable) returning logits of shape (N, classes).
        mean, std: per-channel normalisation applied inside ``forward``; ``None`` = identity.
        class_names: optional names, index = class id.
        input_size: the side length the model was trained at (used for resizing user images and
            for probing the model); ``None`` if unknown.
        feature_layer, head: module names for CAM and Grad-CAM to read (the feature map and the
            linear head), kept as ``cam_layer_names``; ``None`` = found by the interpreter.
        name: a label for reports (e.g. the model spec).
        metadata: free-form facts about the model (training accuracy, seed, versions, ...).
        channels_last: hand validated images to the model in channels-last (NHWC) layout
            (``prepare_images``). ``None`` (default) decides once per device: on CPU, for a model
            with 2-D convolutions that accepts such a tensor (one one-image probe forward; a model
            that calls ``.view`` on its feature maps does not).
    """

    def __init__(
        self,
        model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        input_size: int | None = None,
        in_channels: int = 3,
        feature_layer: str | None = None,
        head: str | None = None,
        name: str = "model",
        metadata: dict[str, Any] | None = None,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if not callable(model):
            raise InputError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        if isinstance(model, nn.Module):
            self.model = model
        else:  # a plain callable: keep it out of the module tree
            object.__setattr__(self, "_callable", model)
        self.in_channels = in_channels
        mean_t = _channel_vector(mean, 0.0, in_channels, "mean")
        std_t = _channel_vector(std, 1.0, in_channels, "std")
        if (std_t <= 0).any():
            raise InputError(f"std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self.class_names = list(class_names) if class_names is not None else None
        if num_classes is None and self.class_names is not None:
            num_classes = len(self.class_names)
        if num_classes is not None and self.class_names is not None and len(self.class_names) != num_classes:
            raise InputError(f"{len(self.class_names)} class names given for a model with {num_classes} classes")
        self._num_classes = num_classes
        self.input_size = input_size
        self.name = name
        self.metadata = dict(metadata or {})
        self._cam_layer_names = (feature_layer, head)
        if channels_last is not None and not isinstance(channels_last, bool):
            raise InputError(f"channels_last must be True, False or None, got {channels_last!r}")
        self._channels_last = channels_last
        #: per device type: whether the auto probe found channels-last inputs usable
        self._channels_last_probed: dict[str, bool] = {}  # per device type
        #: mean and std laid out like a channels-last image of one size (``normalize``)
        self._channels_last_constants: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ forward
    @property
    def network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The wrapped model (module or callable)."""
        return self.model if "model" in self._modules else self._callable

    @property
    def is_scripted(self) -> bool:
        """Whether the model is (or holds) a TorchScript module: its graph runs in C++, where
        Python hooks and torch function modes do not reach."""
        return isinstance(self.network, nn.Module) and any(
            isinstance(m, torch.jit.ScriptModule) for m in self.network.modules()
        )

    @property
    def cam_layer_names(self) -> tuple[str | None, str | None]:
        """``(feature_layer, head)``: the module names given for CAM's layers (``None`` = unnamed).

        Model metadata only; the CAM interpreters find and hook the layers
        (``underfire.interpreters.cam_layers``).
        """
        return self._cam_layer_names

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels to the model's input space: ``(images − mean) / std``.

        On a channels-last batch the (1, C, 1, 1) constants broadcast along the innermost, 3-wide
        dimension, which the elementwise kernels do not vectorise. The same constants materialised
        in the image's own layout (cached per image size) make it a plain contiguous loop, with
        bit-identical values (``python -m benchmarks.hotspots`` times both).
        """
        mean, std = self.mean, self.std
        if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
            mean, std = self._laid_out_constants(images.shape[-2:])
        return (images - mean) / std

    def _laid_out_constants(self, size: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(size), self.mean.data_ptr(), self.std.data_ptr(), self.mean.device, self.mean.dtype)
        constants = self._channels_last_constants.get(key)
        if constants is None:
            if len(self._channels_last_constants) >= 8:  # sizes seen in one session are few
                self._channels_last_constants.clear()
            shape = (1, self.mean.shape[1], *size)
            constants = tuple(
                vector.expand(shape).contiguous(memory_format=torch.channels_last) for vector in (self.mean, self.std)
            )
            self._channels_last_constants[key] = constants
        return constants

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of [0, 1] images. Unvalidated and differentiable: the attacks' hot path."""
        logits = self.network(self.normalize(images))
        if not isinstance(logits, torch.Tensor):
            raise ModelStructureError(
                f"the model returned {type(logits).__name__}, not a logits tensor; wrap it in a "
                "module that returns the logits alone"
            )
        return logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Validated, frozen, batched logits of [0, 1] images (no gradient)."""
        images = self.prepare_images(images)
        with self.frozen():
            return torch.cat([self(chunk) for chunk in images.split(batch_size)])

    # ------------------------------------------------------------------ state
    @contextmanager
    def frozen(self) -> Iterator[Classifier]:
        """Run the model in eval mode with frozen parameters; restore every flag on exit.

        Each module's ``training`` flag and each parameter's ``requires_grad`` is recorded and put
        back individually, so partially-frozen or partially-training models come back exactly as
        they were, also after an exception.
        """
        modules = list(self.modules())
        if any(m.training for m in modules[1:]):
            warnings.warn(
                f"{self.name} is in training mode; underfire runs it in eval mode and restores "
                "training mode afterwards",
                stacklevel=3,
            )
        with frozen_module(self, modules):
            yield self

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def num_classes(self) -> int:
        """Number of output classes (probed with one forward pass if not known)."""
        if self._num_classes is None:
            size = self.input_size or 224
            probe = torch.full((1, self.in_channels, size, size), 0.5, device=self.device)
            self._num_classes = int(self.predict(probe).shape[1])
        return self._num_classes

    # ------------------------------------------------------------------ validation
    def check_images(self, images: Any) -> torch.Tensor:
        """Return ``images`` if they are a valid (N, C, H, W) float batch in [0, 1], else raise;
        another float dtype (float64, half) is converted to the model's.

        Every failure is an ``InputError`` with a one-line message saying what to do.
        """
        if not isinstance(images, torch.Tensor):
            raise InputError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() == 3:
            raise InputError(
                f"images must be a batch (N, C, H, W), got shape {tuple(images.shape)}; "
                "add a batch dimension with images.unsqueeze(0)"
            )
        if images.dim() != 4:
            raise InputError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise InputError("images is an empty batch")
        if images.shape[1] != self.in_channels:
            raise InputError(
                f"images have {images.shape[1]} channels, the model expects {self.in_channels} "
                "(NCHW layout; convert RGBA/grayscale to RGB)"
            )
        if not images.is_floating_point():
            raise InputError(
                f"images must be floating point in [0, 1], got {images.dtype}; "
                "convert 8-bit images with images.float() / 255"
            )
        if images.dtype != self.mean.dtype:  # float64 or half from the user: the model's dtype, as peers do
            images = images.to(self.mean.dtype)
        # one pass over the batch: NaN propagates into the min and max, ±Inf shows in one of them
        low, high = torch.aminmax(images.detach())
        low, high = torch.stack((low, high)).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
            raise InputError(f"images contain NaN or Inf values (batch indices {bad[:10]})")
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise InputError(
                f"images must be in [0, 1] pixel space, got values in [{low:.3g}, {high:.3g}]; "
                "pass unnormalised images (the Classifier normalises internally)"
            )
        return images

    def prepare_images(self, images: Any) -> torch.Tensor:
        """``check_images``, moved to the model's device, in the layout its convolutions run fastest in.

        Why: on CPU, oneDNN convolutions run faster on channels-last (NHWC) tensors than on NCHW
        ones — for small inputs only: above ``CHANNELS_LAST_MAX_PIXELS`` (ImageNet sizes) NCHW is
        as fast or faster (``benchmarks/README.md`` has the timings). Only the strides
        change; everything downstream (attack iterates, gradients) inherits the layout.
        """
        return self.to_model_layout(self.check_images(images).to(self.device))

    def to_model_layout(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in the memory layout ``prepare_images`` hands the model (no validation): for
        tensors an interpreter builds itself in NCHW (MASK's perturbed images), where elementwise
        work with (N, 1, H, W) masks is fast, before they enter the model."""
        if self._prefers_channels_last(images):
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _prefers_channels_last(self, images: torch.Tensor) -> bool:
        if self._channels_last is not None:
            return self._channels_last
        device = images.device.type
        if images.shape[-2] * images.shape[-1] > CHANNELS_LAST_MAX_PIXELS:
            return False
        if device not in self._channels_last_probed:
            usable = device == "cpu" and any(isinstance(m, nn.Conv2d) for m in self.modules())
            if usable:
                probe = images[:1].detach().contiguous(memory_format=torch.channels_last)
                try:
                    with frozen_module(self), torch.no_grad():
                        self(probe)
                except RuntimeError:  # e.g. ``.view`` on a non-contiguous feature map
                    usable = False
            self._channels_last_probed[device] = usable
        return self._channels_last_probed[device]

    def check_classes(self, classes: Any, batch_size: int) -> torch.Tensor:
        """Turn an int, a sequence of ints or names, or a tensor into a (N,) long tensor of valid ids."""
        if isinstance(classes, str) or (isinstance(classes, Sequence) and classes and isinstance(classes[0], str)):
            names = [classes] if isinstance(classes, str) else list(classes)
            classes = [self.class_index(name) for name in names]
        if isinstance(classes, int):
            classes = [classes] * batch_size
        tensor = torch.as_tensor(classes)
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise InputError(f"classes must be integers, got {tensor.dtype}")
        if tensor.dim() == 0:  # one class for every image; a list or tensor gives one per image
            tensor = tensor.expand(batch_size)
        tensor = tensor.long().flatten()
        if tensor.numel() != batch_size:
            raise InputError(
                f"got {tensor.numel()} classes for {batch_size} images; give one per image, or a single int for all"
            )
        n = self.num_classes
        low, high = tensor.aminmax()
        if int(low) < 0 or int(high) >= n:
            bad = tensor[(tensor < 0) | (tensor >= n)]
            raise InputError(f"unknown class {int(bad[0])}: the model has {n} classes (0..{n - 1})")
        return tensor.to(self.device)

    def class_index(self, name: str) -> int:
        """Class id of a class name (or of a decimal string)."""
        if self.class_names and name in self.class_names:
            return self.class_names.index(name)
        if name.isdigit():
            return int(name)
        known = ", ".join(self.class_names) if self.class_names else "none (use class ids)"
        raise InputError(f"unknown class {name!r}; known classes: {known}")


@contextmanager
def frozen_module(module: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters inside; each module's ``training`` flag and each
    parameter's ``requires_grad`` restored individually on exit, also after an exception.

    Only the flags that change are written, and only those are put back: a model that is already
    in eval mode with frozen parameters (the usual case inside an attack) costs one scan.
    """
    if modules is None:
        modules = list(module.modules())
    training = [m for m in modules if m.training]
    trainable = [p for p in module.parameters() if p.requires_grad]
    try:
        for child in training:
            child.training = False
        for param in trainable:
            param.requires_grad_(False)
        yield module
    finally:
        for child in training:
            child.training = True
        for param in trainable:
            param.requires_grad_(True)


def _channel_vector(values: Sequence[float] | None, default: float, channels: int, what: str) -> torch.Tensor:
    if values is None:
        values = [default] * channels
    vector = torch.as_tensor(list(values), dtype=torch.float32).flatten()
    if vector.numel() == 1:
        vector = vector.expand(channels)
    if vector.numel() != channels:
        raise InputError(f"{what} has {vector.numel()} values for {channels} channels")
    return vector.reshape(1, channels, 1, 1).clone()
