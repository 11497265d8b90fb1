"""The matrix-product blur and mask upsampling equal the plain convolution / interpolation forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from underfire.imaging import blur_radius, gaussian_blur, translate, upsample_blurred


def reference_blur(images: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """The textbook form: reflect-pad, then a depthwise 1-D Gaussian convolution per axis."""
    height, width = images.shape[-2:]
    radius = min(math.ceil(truncate * sigma), height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    x = F.pad(images, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [((2, 3, 16, 16), 1.5, 3.0), ((1, 1, 20, 13), 2.0, 3.0), ((2, 3, 9, 9), 5.0, 3.0), ((1, 2, 12, 12), 1.2, 2.5)],
)
def test_blur_equals_the_convolution(shape: tuple[int, ...], sigma: float, truncate: float) -> None:
    """Non-square images and radii clipped by the image size (σ = 5 on 9 px) included."""
    x = rand(*shape)
    torch.testing.assert_close(
        gaussian_blur(x, sigma, truncate), reference_blur(x, sigma, truncate), rtol=0, atol=1e-12
    )


def test_blur_gradient_and_layouts() -> None:
    x = rand(2, 3, 16, 16).float()
    weights = rand(2, 3, 16, 16, seed=1).float()
    live = x.clone().requires_grad_(True)
    (mine,) = torch.autograd.grad((gaussian_blur(live, 1.7) * weights).sum(), live)
    live = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad((reference_blur(live, 1.7) * weights).sum(), live)
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gaussian_blur(channels_last, 1.7), gaussian_blur(x, 1.7), rtol=0, atol=1e-6)
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_upsample_blurred_equals_interpolation_then_blur() -> None:
    masks = rand(3, 1, 8, 6)
    for size, sigma in (((32, 24), 1.6), ((32, 24), 0.0), ((17, 40), 3.0)):
        expected = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        expected = reference_blur(expected, sigma) if sigma > 0 else expected
        torch.testing.assert_close(upsample_blurred(masks, size, sigma), expected, rtol=0, atol=1e-12)


def test_blur_radius() -> None:
    assert blur_radius(1.6, 64, 64) == 5
    assert blur_radius(10.0, 16, 40) == 15
    assert blur_radius(1.0, 64, 64, truncate=2.5) == 3


def test_translate_moves_pixels_and_reflects_at_the_border() -> None:
    x = torch.arange(25.0).view(1, 1, 5, 5)
    assert torch.equal(translate(x, 0, 0), x)
    moved = translate(x, 1, -2)  # down one row, left two columns
    assert torch.equal(moved[..., 1:, :3], x[..., :4, 2:])
    assert torch.equal(moved[..., 0, :3], x[..., 1, 2:])  # row −1 reflects to row 1
    assert torch.equal(moved[..., 1:, 3:], x[..., :4, [3, 2]])  # columns 5, 6 reflect to 3, 2
