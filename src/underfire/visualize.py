"""Pictures of maps: jet overlays on the image, the look users know (alpha about 0.5).

Returns arrays (H, W, 3) uint8 so users can compose their own figures; ``save_overlay`` writes a
PNG with Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from .metrics import resize_maps


def colorize(saliency: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Map an (h, w) array in [0, 1] to RGB uint8 with a matplotlib colormap."""
    rgba = colormaps[cmap](np.clip(saliency, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: torch.Tensor, saliency: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a (3, H, W) or grey (1, H, W) image in [0, 1] with a (1, h, w) map resized to (H, W):
    uint8 (H, W, 3)."""
    height, width = image.shape[-2:]
    resized = resize_maps(saliency.detach().float().reshape(1, 1, *saliency.shape[-2:]), (height, width))[0, 0]
    heat = colorize(resized.cpu().numpy(), cmap).astype(np.float32)
    base = image.detach().float().cpu().expand(3, -1, -1).permute(1, 2, 0).numpy() * 255
    return ((1 - alpha) * base + alpha * heat).round().clip(0, 255).astype(np.uint8)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A (3, H, W) image in [0, 1] as (H, W, 3) uint8, a grey (1, H, W) one as (H, W), rounding
    to the nearest level (the arrays Pillow writes as RGB and grey PNGs)."""
    array = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return array[..., 0] if array.shape[-1] == 1 else array


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an (H, W, 3) uint8 array as PNG, optionally enlarged ``scale``× (nearest neighbour)."""
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    picture.save(path)
    return path
