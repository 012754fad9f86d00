"""Real-dataset readers for the `prepare` stage (paper-scale DDPM profiles).

Datasets (../shared/PAPER.md §8.2): CIFAR-10 (the official python pickles, ``cifar-10-batches-py``),
LSUN Church (HF ``tglcourse/lsun_church_train``, parquet), LSUN Bedroom (the LSUN lmdb export), or any
folder of images. ``prepare`` reads one of them, applies the training transform and writes fixed-size
uint8 arrays the other stages read with ``np.load(mmap_mode="r")``:

    out_dir/train.npy      uint8 [n, resolution, resolution, 3]
    out_dir/ref.npy        uint8 [m, resolution, resolution, 3], the FID reference images
    out_dir/manifest.json  sources, counts, transform, seed, sha256 of both arrays, skipped images

Transform (PAPER.md §1.6, the official church script): convert to RGB, resize the shorter side to the
training resolution (PIL bilinear), then a random crop (the script's center-crop flag is off), no
horizontal flip. The suite stores fixed-size arrays, so the random crop is drawn ONCE per image here, at
prepare time, from an RNG seeded by (seed, source index); the official script draws a new crop every
epoch. The reference images are center-cropped by default (``ref_crop``), as §8.3 builds its custom
FID statistics.

Reference set, first that applies: ``ref_path`` (any format, every image in it); the dataset's own
held-out split (CIFAR ``test_batch``; parquet files whose name contains "test" or "valid"); otherwise
``num_ref`` random training images (the LSUN-Bedroom convention of §8.3).

Big sets (LSUN church is ~120K images, ~24 GB at 256²) are streamed: images are decoded one at a time
and written into a memory-mapped .npy, never held in RAM together.
"""
from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from deme.io import sha256_file, write_json


class DataError(ValueError):
    """A problem with the user's dataset; the message names the file (and row/key) and what to do."""


FORMATS = ("cifar_python", "image_folder", "parquet", "lmdb")
CROPS = ("random", "center")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
PARQUET_IMAGE_COLUMNS = ("image", "img")  # HF exports: "image" (LSUN church), "img" (cifar10)
PARQUET_BATCH_ROWS = 256  # rows decoded from parquet at a time (bounded memory)
MAX_WARNINGS = 20  # skip warnings printed to stderr; the manifest lists all of them

# A source: how many images, and a function that yields (item name, load) pairs in source order, where
# load() returns a PIL image or an HWC uint8 array (and may raise on a corrupt image).
Item = tuple[str, Callable[[], "Image.Image | np.ndarray"]]
Source = tuple[int, Callable[[], Iterator[Item]]]


# ----------------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------------

def _cifar_dir(path: Path) -> Path | None:
    for d in (path, path / "cifar-10-batches-py"):
        if d.is_dir() and ((d / CIFAR_TRAIN[0]).is_file() or (d / CIFAR_TEST).is_file()):
            return d
    return None


def detect_format(path: str | Path) -> str:
    """Which of FORMATS ``path`` holds: cifar_python, parquet, lmdb or (default) image_folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset not found; put the dataset there (a cifar-10-batches-py directory, "
                        f"parquet files, an LSUN lmdb directory or a folder of images) or fix the path")
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet"
        if path.name == "data.mdb":
            return "lmdb"
        raise DataError(f"{path}: is a file; point at a directory of images, a cifar-10-batches-py "
                        f"directory, a .parquet file or directory, or an lmdb directory")
    if _cifar_dir(path) is not None:
        return "cifar_python"
    if (path / "data.mdb").is_file():
        return "lmdb"
    if next(path.rglob("*.parquet"), None) is not None:
        return "parquet"
    return "image_folder"


# ----------------------------------------------------------------------------------------------------
# Transform (PAPER.md §1.6)
# ----------------------------------------------------------------------------------------------------

def _crop_rng(seed: int, index: int) -> np.random.Generator:
    """The per-image RNG of the random crop: depends on (seed, source index) only."""
    return np.random.default_rng([int(seed), 0, int(index)])


def transform_image(img: Image.Image | np.ndarray, resolution: int, crop: str = "random", seed: int = 0,
                    index: int = 0) -> np.ndarray:
    """RGB; shorter side to ``resolution`` (PIL bilinear, aspect kept); crop to a square; no flip.

    Sizes follow torchvision's ``Resize(int)``: the longer side becomes int(resolution * long / short).
    ``crop="random"`` draws the offset from an RNG seeded by (seed, index), so prepare is deterministic;
    the crop is drawn once per image (not per epoch as in the official script). Returns uint8 [r, r, 3].
    """
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r}: use one of {CROPS}")
    if isinstance(img, np.ndarray):
        if img.shape == (resolution, resolution, 3) and img.dtype == np.uint8:
            return img  # already the training size (CIFAR10 at 32): the transform is the identity
        img = Image.fromarray(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if min(w, h) != resolution:
        if w <= h:
            size = (resolution, int(resolution * h / w))
        else:
            size = (int(resolution * w / h), resolution)
        img = img.resize(size, Image.BILINEAR)
        w, h = img.size
    if crop == "center":  # torchvision CenterCrop: round((size - out) / 2)
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    else:
        rng = _crop_rng(seed, index)
        top = int(rng.integers(0, h - resolution + 1))
        left = int(rng.integers(0, w - resolution + 1))
    out = np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    if out.shape != (resolution, resolution, 3):
        raise ValueError(f"transform produced shape {out.shape}")
    return out


def _open_encoded(data: bytes | None) -> Image.Image:
    """Decode image bytes now (not lazily), so a corrupt image fails here, inside the item's try."""
    if data is None:
        raise ValueError("no image bytes")
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _open_file(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES stays off)
    return img  # the pixels are loaded; closing the file does not drop them


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 python pickles (restricted unpickling)
# ----------------------------------------------------------------------------------------------------

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar as _np_scalar

# The only globals a CIFAR batch needs: what rebuilds an ndarray, and _codecs.encode (how Python 3
# pickles bytes at protocol 2). Plain dicts, lists, ints and bytes need no globals at all.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("_codecs").encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only; any other global is refused (no code runs)."""

    def __init__(self, file, name: str):
        super().__init__(file, encoding="bytes")  # the official files were written by Python 2
        self.name = name

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.name}: refusing to unpickle {module}.{name} (only numpy arrays and plain "
                            f"containers are allowed); use the official cifar-10-batches-py files") from None


def _load_cifar_batch(path: Path) -> np.ndarray:
    """One batch file -> uint8 [n, 32, 32, 3] (the file stores [n, 3072] in CHW order)."""
    if not path.is_file():
        raise DataError(f"{path}: CIFAR-10 batch file missing; download and extract cifar-10-python.tar.gz "
                        f"(https://www.cs.toronto.edu/~kriz/cifar.html) into {path.parent}")
    try:
        with open(path, "rb") as f:
            d = _RestrictedUnpickler(f, str(path)).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
                        f"download the file again") from None
    data = d.get(b"data", d.get("data")) if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = None if not isinstance(data, np.ndarray) else (data.dtype, data.shape)
        raise DataError(f"{path}: expected key b'data' with uint8 [n, 3072], got {got}; "
                        f"is this an official CIFAR-10 python batch?")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _array_source(images: np.ndarray, names: list[str]) -> Source:
    def items():
        for name, img in zip(names, images):
            yield name, (lambda img=img: img)
    return len(images), items


def _cifar_sources(path: Path) -> dict[str, Source]:
    d = _cifar_dir(path) or path
    out = {}
    for split, files in (("train", CIFAR_TRAIN), ("heldout", (CIFAR_TEST,))):
        arrays = [_load_cifar_batch(d / f) for f in files]
        names = [f"{d / f}:{i}" for f, a in zip(files, arrays) for i in range(len(a))]
        out[split] = _array_source(np.concatenate(arrays), names)
    return out


# ----------------------------------------------------------------------------------------------------
# Image folder
# ----------------------------------------------------------------------------------------------------

def _folder_sources(path: Path) -> dict[str, Source]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
                        f"put the images there or fix the path")

    def items():
        for f in files:
            yield str(f), (lambda f=f: _open_file(f))
    return {"train": (len(files), items)}


# ----------------------------------------------------------------------------------------------------
# Parquet (HF datasets export: an `image` column of struct {bytes, path}, or a plain binary column)
# ----------------------------------------------------------------------------------------------------

def _parquet_column(pf, f: Path) -> str:
    names = pf.schema_arrow.names
    for c in PARQUET_IMAGE_COLUMNS:
        if c in names:
            return c
    raise DataError(f"{f}: no image column (looked for {PARQUET_IMAGE_COLUMNS}, found {names}); "
                    f"export the dataset with an 'image' column of encoded image bytes")


def _parquet_split(files: list[Path]) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    opened = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise DataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e}); "
                            f"download it again or remove it") from None
        opened.append((f, pf, _parquet_column(pf, f)))

    def items():
        for f, pf, col in opened:
            row = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[col]):
                arr = batch.column(0)
                if pa.types.is_struct(arr.type):
                    arr = arr.field("bytes")
                for data in arr.to_pylist():
                    yield f"{f}:{row}", (lambda data=data: _open_encoded(data))
                    row += 1
    return sum(pf.metadata.num_rows for _, pf, _ in opened), items


def _parquet_sources(path: Path) -> dict[str, Source]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise DataError(f"{path}: no .parquet files found; put the dataset's parquet files there")
    heldout = [f for f in files if "test" in f.name.lower() or "valid" in f.name.lower()]
    train = [f for f in files if f not in heldout]
    out = {"train": _parquet_split(train)} if train else {}
    if heldout:
        out["heldout"] = _parquet_split(heldout)
    return out


# ----------------------------------------------------------------------------------------------------
# LMDB (the LSUN export: keys -> encoded image bytes, webp/jpeg)
# ----------------------------------------------------------------------------------------------------

def _lmdb_sources(path: Path) -> dict[str, Source]:
    try:
        import lmdb
    except ImportError:
        raise DataError(f"{path}: reading LSUN lmdb files needs the lmdb module: pip install lmdb") from None
    subdir = path.is_dir()
    try:
        env = lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as e:
        raise DataError(f"{path}: cannot open the lmdb database ({e}); point at the directory holding "
                        f"data.mdb (e.g. church_outdoor_train_lmdb)") from None
    n = env.stat()["entries"]

    def items():
        with env.begin(write=False) as txn:
            for key, value in txn.cursor():
                yield key.decode("utf-8", "replace"), (lambda value=bytes(value): _open_encoded(value))
    return {"train": (n, items)}


_READERS = {"cifar_python": _cifar_sources, "image_folder": _folder_sources, "parquet": _parquet_sources,
            "lmdb": _lmdb_sources}


def _sources(fmt: str, path: Path) -> dict[str, Source]:
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown dataset format {fmt!r}; use one of {FORMATS}")
    if not path.exists():
        detect_format(path)  # raises the "not found" message
    return _READERS[fmt](path)


def _chain(*sources: Source) -> Source:
    def items():
        for _, it in sources:
            yield from it()
    return sum(n for n, _ in sources), items


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------

def _subset(n: int, k: int, seed: int, what: str, where: str) -> np.ndarray:
    """Indices of a seeded random subset of size k (0 = all), in source order."""
    if k == 0 or k == n:
        return np.arange(n)
    if k > n:
        raise DataError(f"{where}: asked for {k} {what} images but only {n} are there; "
                        f"lower the count (0 = all)")
    tag = {"training": 1, "reference": 2}[what]  # independent streams for the two subsets
    return np.sort(np.random.default_rng([int(seed), tag]).choice(n, size=k, replace=False))


def _set_npy_count(path: Path, n: int) -> None:
    """Shrink a .npy's first dimension to n in place: rewrite the header (same length) and truncate."""
    fmt = np.lib.format
    with open(path, "r+b") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
        prefix = 6 + 2 + (2 if version == (1, 0) else 4)  # magic, version, header-length field
        new_shape = (n,) + tuple(shape[1:])
        header = repr({"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran, "shape": new_shape})
        header = header.encode("latin1")
        pad = offset - prefix - len(header) - 1
        if pad < 0:  # cannot happen: the count only shrinks
            raise RuntimeError(f"{path}: header does not fit")
        f.seek(prefix)
        f.write(header + b" " * pad + b"\n")
        f.truncate(offset + int(np.prod(new_shape)) * dtype.itemsize)


class _Skips:
    """Collects skipped images for the manifest; one stderr line each for the first MAX_WARNINGS."""

    def __init__(self, on_corrupt: str):
        self.on_corrupt, self.items, self.seen = on_corrupt, [], set()

    def add(self, item: str, err: Exception) -> None:
        reason = f"{type(err).__name__}: {err}".strip()
        if self.on_corrupt == "fail":
            raise DataError(f"{item}: cannot read image ({reason}); fix or delete it, or rerun with "
                            f"on_corrupt=skip to leave it out") from None
        if item in self.seen:  # a training image drawn again for the reference set
            return
        self.seen.add(item)
        self.items.append({"item": item, "error": reason})
        if len(self.items) <= MAX_WARNINGS:
            _warn(f"warning: skipping {item}: {reason}")

    def summary(self) -> None:
        if len(self.items) > MAX_WARNINGS:
            _warn(f"warning: {len(self.items)} images skipped in all ({len(self.items) - MAX_WARNINGS} not "
                  f"shown); see 'skipped' in manifest.json")


def _warn(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # does not break a running progress bar


def _write_set(out: Path, source: Source, indices: np.ndarray, *, resolution: int, crop: str, seed: int,
               skips: _Skips, progress: bool, desc: str) -> int:
    """Transform the selected images of ``source`` into the .npy ``out``; returns the count written."""
    total, items = source
    if len(indices) == 0:
        raise DataError(f"{out.name}: no images selected; check the dataset path and counts")
    wanted = np.zeros(total, dtype=bool)
    wanted[indices] = True
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8,
                                    shape=(len(indices), resolution, resolution, 3))
    written = seen = 0
    try:
        with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
            for index, (name, load) in enumerate(items()):
                if index >= total:
                    raise DataError(f"{name}: the source holds more images than it reported ({total}); "
                                    f"is the dataset being modified?")
                if not wanted[index]:
                    continue
                seen += 1
                try:
                    img = transform_image(load(), resolution, crop, seed, index)
                except Exception as e:  # decode errors, truncated files, unconvertible modes, ...
                    skips.add(name, e)
                else:
                    arr[written] = img
                    written += 1
                bar.update(1)
        arr.flush()
        del arr
        if seen != len(indices):
            raise DataError(f"{out.name}: the source reported {total} images but yielded fewer; "
                            f"is the dataset being modified?")
        if written == 0:
            raise DataError(f"{out.name}: none of the {len(indices)} selected images could be read; "
                            f"see the warnings above")
        if written < len(indices):
            _set_npy_count(out, written)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return written


def prepare(fmt: str, path: str | Path, out_dir: str | Path, *, resolution: int, crop: str = "random",
            num_train: int = 0, num_ref: int = 0, ref_path: str | Path = "", seed: int = 0,
            on_corrupt: str = "skip", progress: bool = True, ref_crop: str = "center") -> dict:
    """Read the dataset at ``path`` (format ``fmt``, or "auto"), write train.npy, ref.npy, manifest.json.

    num_train / num_ref: 0 = all (of the training images / of the reference source); otherwise a seeded
    random subset in source order. Reference source: ``ref_path`` if given, else the held-out split,
    else ``num_ref`` random training images (required > 0 then). ``on_corrupt``: "skip" (listed in the
    manifest, warned on stderr) or "fail" (DataError naming the image). Returns the manifest.
    """
    path, out_dir = Path(path), Path(out_dir)
    if fmt == "auto":
        fmt = detect_format(path)
    for key, value, allowed in (("crop", crop, CROPS), ("ref_crop", ref_crop, CROPS),
                                ("on_corrupt", on_corrupt, ("skip", "fail"))):
        if value not in allowed:
            raise DataError(f"{key}={value!r}: use one of {allowed}")
    if not (isinstance(resolution, int) and resolution > 0):
        raise DataError(f"resolution={resolution!r}: use a positive integer")
    if num_train < 0 or num_ref < 0:
        raise DataError(f"num_train={num_train}, num_ref={num_ref}: use 0 (all) or a positive count")

    sources = _sources(fmt, path)
    if "train" not in sources:
        raise DataError(f"{path}: no training images (every parquet file name contains 'test' or 'valid'); "
                        f"rename the training files")
    train = sources["train"]
    train_idx = _subset(train[0], num_train, seed, "training", str(path))

    ref_fmt = ""
    if ref_path:
        ref_fmt = detect_format(ref_path)
        ref_sources = _sources(ref_fmt, Path(ref_path))
        ref, ref_source = _chain(*ref_sources.values()), "ref_path"
    elif "heldout" in sources:
        ref, ref_source = sources["heldout"], "held-out split"
    else:
        if num_ref == 0:
            raise DataError(f"{path}: the {fmt} format has no held-out split, so the reference set needs "
                            f"num_ref > 0 (random training images) or a ref_path")
        ref, ref_source = train, "random training images"
    ref_idx = _subset(ref[0], num_ref, seed, "reference", str(ref_path or path))

    out_dir.mkdir(parents=True, exist_ok=True)
    skips = _Skips(on_corrupt)
    kw = dict(resolution=resolution, seed=seed, skips=skips, progress=progress)
    n_train = _write_set(out_dir / "train.npy", train, train_idx, crop=crop, desc="train", **kw)
    n_ref = _write_set(out_dir / "ref.npy", ref, ref_idx, crop=ref_crop, desc="ref", **kw)
    skips.summary()

    manifest = {
        "format": fmt,
        "source": str(path),
        "ref_source": ref_source,
        "ref_path": str(ref_path) if ref_path else None,
        "ref_format": ref_fmt or fmt,
        "resolution": resolution,
        "crop": crop,
        "ref_crop": ref_crop,
        "seed": seed,
        "num_train_requested": num_train,
        "num_ref_requested": num_ref,
        "num_train_available": train[0],
        "num_ref_available": ref[0],
        "num_train": n_train,
        "num_ref": n_ref,
        "sha256": {"train.npy": sha256_file(out_dir / "train.npy"), "ref.npy": sha256_file(out_dir / "ref.npy")},
        "skipped": skips.items,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest
