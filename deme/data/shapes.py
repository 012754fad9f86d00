"""The tiny profile's dataset: procedurally generated coloured shapes with captions.

Each image is one shape (circle, square, triangle, diamond, cross) of a colour, a size, a position and a
rotation, drawn anti-aliased (4x supersampling) on a background colour with a soft gradient and a little
pixel noise. Each image has a caption such as "a small red circle on a blue background" for the
text-to-image profile. Everything is a pure function of (n, seed, resolution).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "magenta": (210, 50, 200), "cyan": (40, 200, 210), "orange": (240, 130, 30), "white": (240, 240, 240),
}
BACKGROUNDS = {
    "black": (15, 15, 20), "gray": (110, 110, 115), "navy": (20, 30, 80), "forest": (25, 70, 35),
    "beige": (215, 200, 165), "purple": (70, 30, 90),
}
SIZES = ("small", "large")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSet:
    images: np.ndarray  # uint8 [n, H, W, 3]
    shape: np.ndarray  # int [n], index into SHAPES
    color: np.ndarray  # int [n], index into COLORS
    background: np.ndarray  # int [n], index into BACKGROUNDS
    size: np.ndarray  # int [n], index into SIZES
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        """Class label of the feature network: shape x colour."""
        return self.shape * len(COLORS) + self.color


NUM_CLASSES = len(SHAPES) * len(COLORS)


def caption(shape: int, color: int, background: int, size: int) -> str:
    return (f"a {SIZES[size]} {list(COLORS)[color]} {SHAPES[shape]} "
            f"on a {list(BACKGROUNDS)[background]} background")


def _inside(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of unit-scale shape ``kind`` at rotated, normalised coordinates (u, v)."""
    if SHAPES[kind] == "circle":
        return u * u + v * v <= 1.0
    if SHAPES[kind] == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if SHAPES[kind] == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    if SHAPES[kind] == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))
    # triangle with vertices (0,-1), (-0.87, 0.5), (0.87, 0.5): three half-planes
    return (v <= 0.5) & (1.732 * u - v <= 1.0) & (-1.732 * u - v <= 1.0)


def generate_shapes(n: int, seed: int, resolution: int = 16, chunk: int = 512) -> ShapeSet:
    rng = np.random.default_rng(seed)
    shape = rng.integers(len(SHAPES), size=n)
    color = rng.integers(len(COLORS), size=n)
    background = rng.integers(len(BACKGROUNDS), size=n)
    size = rng.integers(len(SIZES), size=n)
    radius = np.where(size == 0, rng.uniform(0.32, 0.42, n), rng.uniform(0.5, 0.65, n))
    center = rng.uniform(-1, 1, (n, 2)) * (1.0 - radius)[:, None] * 0.8
    angle = rng.uniform(0, 2 * np.pi, n)
    jitter = rng.uniform(0.85, 1.1, (n, 1))  # colour brightness
    grad_dir = rng.uniform(0, 2 * np.pi, n)
    grad_amp = rng.uniform(0.0, 0.25, n)
    noise_seed = int(rng.integers(2**31))

    fg = np.asarray(list(COLORS.values()), np.float32)[color] * jitter
    bg = np.asarray(list(BACKGROUNDS.values()), np.float32)[background]

    s = resolution * _SUPERSAMPLE
    axis = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
    yy, xx = np.meshgrid(axis, axis, indexing="ij")  # image coordinates in [-1, 1], y down
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    noise_rng = np.random.default_rng(noise_seed)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        dx = xx[None] - center[lo:hi, 0, None, None]
        dy = yy[None] - center[lo:hi, 1, None, None]
        c, sn = np.cos(angle[lo:hi])[:, None, None], np.sin(angle[lo:hi])[:, None, None]
        r = radius[lo:hi, None, None]
        u, v = (c * dx + sn * dy) / r, (-sn * dx + c * dy) / r
        mask = np.zeros(dx.shape, np.float32)
        for kind in range(len(SHAPES)):
            sel = shape[lo:hi] == kind
            if sel.any():
                mask[sel] = _inside(kind, u[sel], v[sel])
        # anti-aliasing: average the supersampled mask down to the target resolution
        mask = mask.reshape(hi - lo, resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean((2, 4))
        small = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2 - 1
        gy, gx = np.meshgrid(small, small, indexing="ij")
        g = (np.cos(grad_dir[lo:hi])[:, None, None] * gx + np.sin(grad_dir[lo:hi])[:, None, None] * gy)
        shade = 1.0 + grad_amp[lo:hi, None, None] * g
        back = bg[lo:hi, None, None, :] * shade[..., None]
        img = back * (1 - mask[..., None]) + fg[lo:hi, None, None, :] * mask[..., None]
        img = img + noise_rng.normal(0, 4.0, img.shape)
        images[lo:hi] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    captions = [caption(*t) for t in zip(shape, color, background, size)]
    return ShapeSet(images, shape, color, background, size, captions)
