"""Datasets in the suite's format, for every profile: ``<name>.npy`` holds uint8 images [n, H, W, 3]
(a plain .npy, read memory-mapped, so a 24 GB LSUN set is never loaded whole), and an optional
``<name>.meta.npz`` next to it holds per-image labels and captions (the generated shapes).

``load_set`` / ``load_images`` are the one reader every stage uses; they fail with the file's path and
what to run when a file is missing or corrupt. Real datasets are written by deme/data/readers.py.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from deme.data.shapes import ShapeSet
from deme.io import atomic_write_bytes


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".meta.npz")


def save_images(path: str | Path, images: np.ndarray) -> None:
    """Write uint8 [n, H, W, 3] as a plain .npy, atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images, dtype=np.uint8))
    atomic_write_bytes(path, buf.getvalue())


def save_set(path: str | Path, data: ShapeSet) -> None:
    """Write a ShapeSet: images as ``path`` (.npy), labels and captions as ``<stem>.meta.npz``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, shape=data.shape, color=data.color, background=data.background, size=data.size,
                        captions=np.asarray(data.captions, dtype=np.str_))
    atomic_write_bytes(meta_path(path), buf.getvalue())
    save_images(path, data.images)


def load_images(path: str | Path) -> np.ndarray:
    """uint8 [n, H, W, 3], memory-mapped (read-only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: dataset file missing (make it with: dvc repro prepare)")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # bad magic, truncated header, size mismatch: a damaged file, whatever the damage
        raise ValueError(f"{path}: corrupt dataset file ({e}); delete it and rerun: dvc repro prepare") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: expected uint8 images [n, H, W, 3], got {images.dtype} {images.shape}; "
                         "rerun: dvc repro prepare")
    return images


def load_set(path: str | Path) -> dict[str, np.ndarray]:
    """Images plus whatever labels/captions the set has."""
    out = {"images": load_images(path)}
    meta = meta_path(path)
    if meta.exists():
        try:
            with np.load(meta, allow_pickle=False) as z:
                out.update({k: z[k] for k in z.files})
        except Exception as e:
            raise ValueError(f"{meta}: corrupt label file ({e}); delete it and rerun: dvc repro prepare") from None
    return out
