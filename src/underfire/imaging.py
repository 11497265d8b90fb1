"""Linear image operators written as small matrix products: Gaussian blur and mask upsampling.

A separable operator on an (N, C, H, W) batch is ``rows @ x @ cols.T`` with an (H', H) and a
(W', W) matrix. On the CPU this is far faster than the usual depthwise convolutions, above all in
the backward pass that MASK runs every iteration (``python -m benchmarks.hotspots`` times both;
``benchmarks/README.md`` has the numbers). The matrices are built once
per size and σ and cached; values equal the convolution's up to float rounding
(``tests/test_imaging.py``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["blur_radius", "gaussian_blur", "translate", "upsample_blurred"]


def blur_radius(sigma: float, height: int, width: int, truncate: float = 3.0) -> int:
    """Kernel radius ⌈truncate·σ⌉, no larger than reflection padding allows (size − 1)."""
    return min(math.ceil(truncate * sigma), height - 1, width - 1)


@lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size) matrix of a 1-D Gaussian of ``radius`` with reflection at the borders
    (PyTorch's "reflect": the edge sample is not repeated)."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    rows = torch.arange(size).repeat_interleave(2 * radius + 1)
    source = torch.arange(size)[:, None] + torch.arange(-radius, radius + 1)[None, :]
    source = source.abs()  # reflect below 0
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source).flatten()
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((rows, source), kernel.repeat(size), accumulate=True)
    return matrix.to(dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _upsample_matrix(size_in: int, size_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size_out, size_in) matrix of 1-D bilinear interpolation (align_corners=False), taken from
    ``F.interpolate`` itself so the weights are PyTorch's."""
    eye = torch.eye(size_in, dtype=torch.float64)[:, None, :, None]  # (size_in, 1, size_in, 1)
    columns = F.interpolate(eye, size=(size_out, 1), mode="bilinear", align_corners=False)
    return columns[:, 0, :, 0].t().contiguous().to(dtype=dtype, device=device)


def gaussian_blur(images: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur (radius ⌈truncate·σ⌉, reflection padding), differentiable; σ = 0
    (or a radius below one pixel) returns ``images`` itself, otherwise a contiguous NCHW tensor."""
    if sigma <= 0:
        return images
    height, width = images.shape[-2:]
    radius = blur_radius(sigma, height, width, truncate)
    if radius < 1:
        return images
    rows = _blur_matrix(height, float(sigma), radius, images.dtype, images.device)
    cols = rows if width == height else _blur_matrix(width, float(sigma), radius, images.dtype, images.device)
    return rows @ images @ cols.t()


@lru_cache(maxsize=64)
def _upsample_blur_matrix(
    size_in: int, size_out: int, sigma: float, radius: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    upsample = _upsample_matrix(size_in, size_out, torch.float64, torch.device("cpu"))
    if radius >= 1:
        upsample = _blur_matrix(size_out, sigma, radius, torch.float64, torch.device("cpu")) @ upsample
    return upsample.to(dtype=dtype, device=device)


def upsample_blurred(masks: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """``gaussian_blur(F.interpolate(masks, size, "bilinear"), sigma)`` as one product per axis:
    two (size × cells) matrices instead of a full-resolution interpolation and blur."""
    height, width = size
    radius = blur_radius(sigma, height, width) if sigma > 0 else 0
    rows = _upsample_blur_matrix(masks.shape[-2], height, float(sigma), radius, masks.dtype, masks.device)
    cols = _upsample_blur_matrix(masks.shape[-1], width, float(sigma), radius, masks.dtype, masks.device)
    return rows @ masks @ cols.t()


def translate(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift by (dy, dx) px, filling the border by reflection (the jitter of Fong & Vedaldi)."""
    pad = max(abs(dy), abs(dx))
    height, width = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    top, left = pad - dy, pad - dx
    return padded[..., top : top + height, left : left + width]
