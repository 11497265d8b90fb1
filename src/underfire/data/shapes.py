"""The built-in procedural benchmark "shapes": one geometric object on a cluttered background.

Why it exists: the attack and its measures need a classifier, images and ground-truth object
masks that anyone can regenerate offline, bit for bit, on any machine. Every image is a pure
function of ``(seed, split, index)``: its random choices come from
``np.random.default_rng([seed, split_id, index])``, so access order, worker count and dataset
instance never change a pixel, and the three splits never share an image.

Each image holds a smooth, striped colour background, 2-5 irregular distractors (noise blobs and
short thick bars, all smaller than the object and unlike every class) and, drawn last, one object
of the image's class with a random size (about 40-75 % of the image side), position (fully inside
the frame), rotation and colour (kept far from the local background and from the distractors).
Shapes are exact point-in-shape tests at pixel centres, with no anti-aliasing, so the object mask
is exact: a pixel is painted by the object if and only if the mask is True there.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "heart",
    "arrow",
    "ell",
)
"""Class names of the benchmark, in label order (``ell`` is an L shape)."""

SPLITS: Mapping[str, int] = MappingProxyType({"train": 20000, "val": 2000, "test": 2000})
"""Default number of images per split."""

_SPLIT_IDS: Mapping[str, int] = MappingProxyType({"train": 0, "val": 1, "test": 2})
MIN_SIZE = 32

# Object half-size ("scale": pixels per shape unit) as a fraction of the image side. Every shape
# fits in the unit disc, so the object spans about 2 * scale: 42-75 % of the side.
_SCALE_RANGE = (0.21, 0.375)
_MIN_BG_DISTANCE = 0.4  # RGB distance (in [0,1] units) from object colour to local background means
_MIN_DISTRACTOR_DISTANCE = 0.30  # ... and between object colour and every distractor colour
_COLOUR_CANDIDATES = 24


# --------------------------------------------------------------------------------------------
# Shapes: boolean point-in-shape tests in shape coordinates (u right, v down, unit disc).


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v < 0.81


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) < 0.72


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral, circumradius 1, apex up (-v); inside all three edge half-planes.
    inside = v < 0.5
    for angle in (np.deg2rad(210.0), np.deg2rad(330.0)):
        inside &= u * np.cos(angle) + v * np.sin(angle) < 0.5
    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Five-pointed star with straight edges: fold the polar angle into the sector between an
    # outer tip (angle 0, radius 1) and the next inner vertex (36 degrees, radius 0.45).
    r = np.hypot(u, v)
    theta = np.mod(np.arctan2(v, u) + np.pi / 2, 2 * np.pi / 5)  # a tip points up
    theta = np.minimum(theta, 2 * np.pi / 5 - theta)
    px, py = r * np.cos(theta), r * np.sin(theta)
    ox, oy = 1.0, 0.0
    ix, iy = 0.45 * np.cos(np.pi / 5), 0.45 * np.sin(np.pi / 5)
    # Origin side of the edge outer->inner: same sign of the cross product as the origin (< 0).
    cross = (ix - ox) * (py - oy) - (iy - oy) * (px - ox)
    return cross > 0


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au < 0.28) & (av < 0.92)) | ((av < 0.28) & (au < 0.92))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 > 0.52**2) & (r2 < 0.92**2)


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Disc minus a disc shifted to the right: a thick moon open to the right.
    return (u * u + v * v < 0.8464) & ((u - 0.55) ** 2 + v * v > 0.5625)


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 with y up, scaled and shifted into the unit disc.
    x = 1.32 * u
    y = -1.32 * v + 0.2
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 < 0


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    av = np.abs(v)
    shaft = (u > -0.95) & (u < 0.05) & (av < 0.22)
    head = (u >= 0.0) & (av < 0.62 * (0.95 - u) / 0.95)
    return shaft | head


def _ell(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    stem = (u > -0.62) & (u < -0.08) & (v > -0.8) & (v < 0.8)
    foot = (u > -0.62) & (u < 0.62) & (v > 0.26) & (v < 0.8)
    return stem | foot


_INSIDE: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    _circle,
    _square,
    _triangle,
    _star,
    _cross,
    _ring,
    _crescent,
    _heart,
    _arrow,
    _ell,
)


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ShapeSample:
    """One rendered benchmark image with its exact object mask and drawing parameters.

    ``centre`` is (x, y) in pixels from the top-left corner, ``scale`` the number of pixels per
    shape unit (the object fits in a disc of radius ``scale``), ``angle`` the rotation in degrees
    (counter-clockwise on screen), ``colour`` the object's base RGB colour in [0, 1]. Every call
    of ``render`` returns fresh arrays that the caller owns.
    """

    image: np.ndarray  # uint8, (H, W, 3)
    mask: np.ndarray  # bool, (H, W): True exactly where the object was painted
    label: int
    class_name: str
    index: int
    centre: tuple[float, float]
    scale: float
    angle: float
    colour: tuple[float, float, float]


def _interp_matrix(size: int, grid: int) -> np.ndarray:
    """Row-stochastic (size, grid) matrix: linear interpolation of a grid spread over the image."""
    t = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.minimum(np.floor(t).astype(int), grid - 2)
    frac = t - lo
    m = np.zeros((size, grid))
    rows = np.arange(size)
    m[rows, lo] = 1.0 - frac
    m[rows, lo + 1] = frac
    return m


def _lattice_sample(lattice: np.ndarray, tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    """Bilinear sample of a 2-D lattice at fractional indices (clipped to the lattice)."""
    n = lattice.shape[0]
    tx = np.clip(tx, 0.0, n - 1.000001)
    ty = np.clip(ty, 0.0, n - 1.000001)
    x0 = tx.astype(int)
    y0 = ty.astype(int)
    fx = tx - x0
    fy = ty - y0
    top = lattice[y0, x0] * (1 - fx) + lattice[y0, x0 + 1] * fx
    bottom = lattice[y0 + 1, x0] * (1 - fx) + lattice[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


class ShapesDataset(Dataset):
    """The procedural "shapes" benchmark as a map-style dataset of (image, label) pairs.

    Images are float32 tensors (3, size, size) in [0, 1], equal to the uint8 pixels of
    :meth:`render` divided by 255, so an exported PNG reads back to the very same tensor.
    Labels are balanced by construction: image ``i`` shows class ``i % 10``.
    """

    def __init__(self, split: str = "test", size: int = 64, seed: int = 0, length: int | None = None):
        if split not in _SPLIT_IDS:
            raise InputError(f"unknown shapes split {split!r}: expected one of {', '.join(SPLITS)}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
            raise InputError(f"shapes image size must be an integer >= {MIN_SIZE}, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"shapes seed must be a non-negative integer, got {seed!r}")
        if length is None:
            length = SPLITS[split]
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise InputError(f"shapes length must be a non-negative integer, got {length!r}")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.length = int(length)
        self.class_names: list[str] = list(SHAPE_CLASSES)
        centres = np.arange(self.size, dtype=np.float64) + 0.5
        self._ys, self._xs = np.meshgrid(centres, centres, indexing="ij")  # pixel centres
        self._interp: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"ShapesDataset(split={self.split!r}, size={self.size}, seed={self.seed}, length={self.length})"

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        i = operator.index(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"shapes index {i} out of range for a dataset of {self.length} images")
        return i

    def label(self, i: int) -> int:
        """Class of image ``i`` without rendering it (cheap: for selecting images by class)."""
        return self._index(i) % len(SHAPE_CLASSES)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.render(i)
        image = torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1)))
        image = image.float().div_(255.0)
        return image, sample.label

    def mask(self, i: int) -> torch.Tensor:
        """Exact object mask of image ``i`` as a bool tensor (1, size, size)."""
        return torch.from_numpy(self.render(i).mask)[None]

    def tensors(self, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (N,3,H,W) float32, labels (N,) long and masks (N,1,H,W) bool for ``indices``."""
        idx = range(self.length) if indices is None else [operator.index(i) for i in indices]
        n, s = len(idx), self.size
        images = np.empty((n, s, s, 3), dtype=np.uint8)
        masks = np.empty((n, s, s), dtype=bool)
        labels = np.empty(n, dtype=np.int64)
        for k, i in enumerate(idx):
            sample = self.render(i)
            images[k], masks[k], labels[k] = sample.image, sample.mask, sample.label
        images_t = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        return images_t, torch.from_numpy(labels), torch.from_numpy(masks)[:, None]

    # ----------------------------------------------------------------------------------------

    def _smooth(self, rng: np.random.Generator, grid: int) -> np.ndarray:
        """Low-frequency colour noise (size, size, 3) in [0, 1]: a random grid, upsampled."""
        m = self._interp.get(grid)
        if m is None:
            m = self._interp[grid] = _interp_matrix(self.size, grid).astype(np.float32)
        lattice = rng.random((3, grid, grid), dtype=np.float32)
        return (m @ lattice @ m.T).transpose(1, 2, 0)

    def _grain(self, rng: np.random.Generator, amplitude: float) -> np.ndarray:
        """Fine per-pixel colour noise, uniform in [-amplitude, amplitude] (cheaper than normal)."""
        field = rng.random((self.size, self.size, 3), dtype=np.float32)
        return (field - np.float32(0.5)) * np.float32(2.0 * amplitude)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        img = self._smooth(rng, int(rng.integers(2, 6)))
        # Mid-frequency blotches, then stripes of random orientation, frequency and colour.
        img += (self._smooth(rng, int(rng.integers(8, 15))) - 0.5) * np.float32(rng.uniform(0.05, 0.25))
        theta = rng.uniform(0.0, np.pi)
        freq = rng.uniform(2.0, 7.0) / s
        phase = rng.uniform(0.0, 2 * np.pi)
        amp = rng.uniform(0.0, 0.15) * (rng.random() < 0.8)
        direction = rng.uniform(-1.0, 1.0, 3).astype(np.float32)
        wave = np.sin(2 * np.pi * freq * (self._xs * np.cos(theta) + self._ys * np.sin(theta)) + phase)
        img += (amp * wave).astype(np.float32)[..., None] * direction
        img += self._grain(rng, 0.035)
        return img

    def _distractor(self, rng: np.random.Generator, scale: float) -> tuple[tuple[slice, slice], np.ndarray]:
        """Footprint of one distractor, smaller than the object: (box slices, bool mask in box)."""
        s = self.size
        bx, by = rng.uniform(0.0, s, 2)
        if rng.random() < 0.6:
            # Irregular blob: a stretched disc whose boundary is pushed in and out by noise.
            radius = rng.uniform(0.22, 0.42) * scale
            a = rng.uniform(0.0, np.pi)
            stretch = rng.uniform(0.55, 1.0)
            lattice = rng.uniform(-1.0, 1.0, (7, 7))
            box = self._box(bx, by, 1.75 * radius)
            dx, dy = self._xs[box] - bx, self._ys[box] - by
            du = (dx * np.cos(a) + dy * np.sin(a)) / (radius * stretch)
            dv = (-dx * np.sin(a) + dy * np.cos(a)) / radius
            noise = _lattice_sample(lattice, (du + 1.75) / 3.5 * 6, (dv + 1.75) / 3.5 * 6)
            return box, np.hypot(du, dv) < 1.0 + 0.75 * noise
        # Short thick bar (a capsule): never a whole shape.
        half_width = rng.uniform(0.05, 0.09) * s
        length = rng.uniform(0.4, 0.9) * scale
        a = rng.uniform(0.0, np.pi)
        ex, ey = np.cos(a) * length / 2, np.sin(a) * length / 2
        box = self._box(bx, by, length / 2 + half_width)
        px, py = self._xs[box] - bx, self._ys[box] - by
        t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), -1.0, 1.0)
        return box, np.hypot(px - t * ex, py - t * ey) < half_width

    def _box(self, x: float, y: float, radius: float) -> tuple[slice, slice]:
        """Pixel rows/columns whose centres may lie within ``radius`` of (x, y)."""
        s = self.size
        x0, x1 = max(0, int(x - radius)), min(s, int(x + radius) + 1)
        y0, y1 = max(0, int(y - radius)), min(s, int(y + radius) + 1)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def render(self, i: int, with_object: bool = True) -> ShapeSample:
        """Draw image ``i`` with its exact mask and parameters (deterministic in seed, split, i).

        ``with_object=False`` draws the same image without the object (same background and
        distractors, same returned mask and parameters): the object's footprint can then be
        checked against the full image.
        """
        i = self._index(i)
        s = self.size
        label = i % len(SHAPE_CLASSES)
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i])

        # Object geometry first, so that distractors can be sized relative to it.
        scale = rng.uniform(*_SCALE_RANGE) * s
        cx, cy = rng.uniform(scale, s - scale, 2)
        angle = rng.uniform(0.0, 360.0)
        rad = np.deg2rad(angle)
        dx, dy = self._xs - cx, self._ys - cy
        # Inverse rotation into shape coordinates: counter-clockwise on screen (y down).
        u = (dx * np.cos(rad) - dy * np.sin(rad)) / scale
        v = (dx * np.sin(rad) + dy * np.cos(rad)) / scale
        mask = _INSIDE[label](u, v)

        img = self._background(rng)
        n_distractors = int(rng.integers(2, 6))
        distractor_colours = rng.random((n_distractors, 3))
        texture = self._grain(rng, 0.05)
        for colour in distractor_colours:
            box, footprint = self._distractor(rng, scale)
            region = img[box]
            region[footprint] = colour.astype(np.float32) + texture[box][footprint]

        # Object colour: far from the background around the object (the mean of each quadrant of
        # the disc holding the object, so no side of it fades into the background) and from every
        # distractor colour. The first candidate passing both thresholds wins; if none does (rare),
        # the one that comes closest.
        r2 = u * u + v * v
        local = r2 < 1.44
        bg_means = np.stack(
            [
                img[local & (u >= 0) & (v >= 0)].mean(axis=0, dtype=np.float64),
                img[local & (u < 0) & (v >= 0)].mean(axis=0, dtype=np.float64),
                img[local & (u >= 0) & (v < 0)].mean(axis=0, dtype=np.float64),
                img[local & (u < 0) & (v < 0)].mean(axis=0, dtype=np.float64),
            ]
        )
        bg_means = np.clip(bg_means, 0.0, 1.0)
        candidates = rng.random((_COLOUR_CANDIDATES, 3))
        d_bg = np.linalg.norm(candidates[:, None] - bg_means[None], axis=2).min(axis=1)
        d_dis = np.linalg.norm(candidates[:, None] - distractor_colours[None], axis=2).min(axis=1)
        score = np.minimum(d_bg / _MIN_BG_DISTANCE, d_dis / _MIN_DISTRACTOR_DISTANCE)
        passing = np.flatnonzero(score > 1.0)
        colour = candidates[passing[0] if passing.size else int(np.argmax(score))]

        # Mild texture: a gentle linear shading across the object plus fine grain.
        shade_dir = rng.uniform(-1.0, 1.0, 2)
        shading = (0.06 / np.sqrt(2)) * (u[mask] * shade_dir[0] + v[mask] * shade_dir[1])
        grain = self._grain(rng, 0.045)
        if with_object:
            img[mask] = (colour + shading[:, None]).astype(np.float32) + grain[mask]

        image = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
        return ShapeSample(
            image=image,
            mask=mask,
            label=label,
            class_name=SHAPE_CLASSES[label],
            index=i,
            centre=(float(cx), float(cy)),
            scale=float(scale),
            angle=float(angle),
            colour=(float(colour[0]), float(colour[1]), float(colour[2])),
        )
