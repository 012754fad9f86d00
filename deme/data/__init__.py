"""Datasets in the suite's format: an ``.npz`` with uint8 images [n, H, W, 3] plus labels and captions.

``load_images`` is the one reader every stage uses; it fails with the file's path and what to run when a
file is missing or corrupt.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from deme.data.shapes import ShapeSet
from deme.io import atomic_write_bytes


def save_set(path: str | Path, data: ShapeSet) -> None:
    """Write a ShapeSet as a compressed .npz, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=data.images, shape=data.shape, color=data.color,
                        background=data.background, size=data.size,
                        captions=np.asarray(data.captions, dtype=np.str_))
    atomic_write_bytes(path, buf.getvalue())


def load_set(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: dataset file missing (make it with: dvc repro data)")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ...: a damaged file, whatever the damage
        raise ValueError(f"{path}: corrupt dataset file ({e}); delete it and rerun: dvc repro data") from None
    images = out.get("images")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: expected 'images' as uint8 [n, H, W, 3], "
                         f"got {None if images is None else (images.dtype, images.shape)}")
    return out


def load_images(path: str | Path) -> np.ndarray:
    return load_set(path)["images"]
