"""Real-dataset readers for the `prepare` stage (paper-scale DDPM profiles).

Datasets (docs/paper.md §8.2): CIFAR-10 (the official python pickles, ``cifar-10-batches-py``),
LSUN Church (HF ``tglcourse/lsun_church_train``, parquet), LSUN Bedroom (the LSUN lmdb export), or any
folder of images. ``prepare`` reads one of them, applies the training transform and writes fixed-size
uint8 arrays the other stages read with ``np.load(mmap_mode="r")``:

    out_dir/train.npy      uint8 [n, resolution, resolution, 3]
    out_dir/ref.npy        uint8 [m, resolution, resolution, 3], the FID reference images
    out_dir/manifest.json  sources, counts, transform, seed, sha256 of both arrays, skipped images
    out_dir/{train,ref}.meta.npz  with captions=True: key ``captions``, one per kept image, in order

Transform (docs/paper.md §1.6, the official church script): convert to RGB, resize the shorter side to the
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

Captions (``captions=True``; ``data.kind: laion``, the SD finetuning set of docs/paper.md §8.2, e.g. BK-SDM's
preprocessed 212k LAION-Aesthetics 6.5+ folder): an image folder whose captions come from a
``metadata.csv`` (``file_name,text``: the HF imagefolder / BK-SDM convention) or ``metadata.jsonl``
(``{"file_name": ..., "text": ...}`` per line), file names relative to the metadata file's folder, or
from a sidecar ``<stem>.txt`` / ``<name>.txt`` per image; or parquet files with an image column and a
``text`` / ``caption`` column. The captions of the kept images, in the same order, go to
``train.meta.npz`` / ``ref.meta.npz`` under key ``captions`` (the key of the generated shapes, read by
``deme.data.load_set``). A missing or empty caption, a caption that is not valid UTF-8 (found line by
line, so the message names the line), a metadata row naming a missing image and a duplicate row are
reported like corrupt images: a DataError naming the file and line (or parquet row) with
``on_corrupt=fail``, otherwise skipped together with the image and listed in the manifest.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from deme.io import atomic_write_bytes, sha256_file, write_json


class DataError(ValueError):
    """A problem with the user's dataset; the message names the file (and row/key) and what to do."""


class CaptionError(DataError):
    """A missing, empty or undecodable caption; the message names the file and line (or parquet row)."""


FORMATS = ("cifar_python", "image_folder", "parquet", "lmdb")
CROPS = ("random", "center")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
PARQUET_IMAGE_COLUMNS = ("image", "img")  # HF exports: "image" (LSUN church), "img" (cifar10)
PARQUET_TEXT_COLUMNS = ("text", "caption")  # captioned parquet (LAION exports: "text"; HF: "caption")
CAPTION_FORMATS = ("image_folder", "parquet")  # the formats that can carry captions
METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # HF imagefolder convention (BK-SDM: metadata.csv)
METADATA_NAME_KEY = "file_name"
METADATA_TEXT_KEYS = ("text", "caption")
PARQUET_BATCH_ROWS = 256  # rows decoded from parquet at a time (bounded memory)
MAX_WARNINGS = 20  # skip warnings printed to stderr; the manifest lists all of them

# A source: how many images, and a function that yields (item name, load) pairs in source order, where
# load() returns a PIL image or an HWC uint8 array (and may raise on a corrupt image). A captioned source's
# load() returns (image, caption) and raises CaptionError when the caption is missing or unreadable.
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
# Transform (docs/paper.md §1.6)
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
# Text files, decoded line by line (captions here; prompt files in deme/data/prompts.py)
# ----------------------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


def utf8_line_error(path: str | Path, lineno: int, raw: bytes, err: UnicodeDecodeError) -> str:
    """``<path> line <n>: not valid UTF-8 (byte 0x.. at column c)``: where the bad byte is."""
    return (f"{path} line {lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            f"re-save the file as UTF-8")


def read_lines(path: str | Path, *, strict: bool = True) -> list[tuple[int, str, str | None]]:
    """The lines of a text file as (line number, text, error), decoded one line at a time.

    A leading BOM and the line ends (\\n or \\r\\n) are dropped; a final newline does not make an extra
    line. strict: a line that is not valid UTF-8 raises DataError naming the line and the byte; otherwise
    that line is decoded with surrogateescape and ``error`` holds the message (None for good lines).
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM):]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    out = []
    for lineno, raw in enumerate(raw_lines, start=1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            out.append((lineno, raw.decode("utf-8"), None))
        except UnicodeDecodeError as e:
            msg = utf8_line_error(path, lineno, raw, e)
            if strict:
                raise DataError(msg) from None
            out.append((lineno, raw.decode("utf-8", "surrogateescape"), msg))
    return out


def has_surrogates(text: str) -> bool:
    """True when ``text`` holds bytes that were not valid UTF-8 (decoded with surrogateescape)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def csv_records(lines: list[tuple[int, str, str | None]], delimiter: str = ",",
                quoting: int = csv.QUOTE_MINIMAL) -> Iterator[tuple[int, int, list[str]]]:
    """CSV records of decoded lines as (first line, last line, fields); quoted fields may span lines."""
    it = iter(lines)
    numbers = []

    def feed():
        for lineno, text, _ in it:
            numbers.append(lineno)
            yield text + "\n"
    reader = csv.reader(feed(), delimiter=delimiter, quoting=quoting, strict=False)
    done = 0
    for row in reader:
        first, last = numbers[done], numbers[reader.line_num - 1]
        done = reader.line_num
        yield first, last, row


# ----------------------------------------------------------------------------------------------------
# Captions of an image folder: metadata.csv / metadata.jsonl (HF imagefolder, BK-SDM) or <image>.txt
# ----------------------------------------------------------------------------------------------------

def _row_error(lines, first: int, last: int) -> str | None:
    """The UTF-8 error of the first bad line among lines first..last, if any."""
    for lineno, _, err in lines[first - 1:last]:
        if err:
            return err
    return None


class _Row(NamedTuple):
    """One metadata row."""

    line: int  # first line of the row (1-based, the header is line 1)
    name: str | None  # file_name
    text: str | None  # the caption
    utf8: str | None  # the UTF-8 error of the row's lines, if any
    problem: str | None  # what makes the row unusable (malformed), if anything


def _jsonl_rows(meta: Path, lines) -> Iterator[_Row]:
    for lineno, text, err in lines:
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield _Row(lineno, None, None, err, err or f"not a JSON object ({e})")
            continue
        if not isinstance(row, dict):
            yield _Row(lineno, None, None, err, "not a JSON object")
            continue
        value = next((row[k] for k in METADATA_TEXT_KEYS if k in row), None)
        name = row.get(METADATA_NAME_KEY)
        yield _Row(lineno, name if isinstance(name, str) else None, None if value is None else str(value),
                   err, None)


def _csv_rows(meta: Path, lines) -> Iterator[_Row]:
    records = csv_records(lines)
    header = next(records, None)
    if header is None:
        raise DataError(f"{meta}: empty file; expected a header '{METADATA_NAME_KEY},text' and one row per image")
    names = [h.strip() for h in header[2]]
    text_key = next((k for k in METADATA_TEXT_KEYS if k in names), None)
    if METADATA_NAME_KEY not in names or text_key is None:
        raise DataError(f"{meta} line 1: header {names} lacks '{METADATA_NAME_KEY}' and 'text' (or 'caption'); "
                        f"the file needs the columns {METADATA_NAME_KEY},text")
    i_name, i_text = names.index(METADATA_NAME_KEY), names.index(text_key)
    for first, last, row in records:
        if not any(f.strip() for f in row):
            continue  # a blank line
        err = _row_error(lines, first, last)
        if len(row) != len(names):
            yield _Row(first, None, None, err, f"{len(row)} fields, the header has {len(names)}")
        else:
            yield _Row(first, row[i_name], row[i_text], err, None)


def _read_metadata(meta: Path, skips: "_Skips") -> dict[Path, "str | CaptionError"]:
    """image path -> caption (or the CaptionError of its row). Rows that name no existing image, malformed
    rows and duplicates are reported through ``skips`` (a DataError with on_corrupt=fail)."""
    lines = read_lines(meta, strict=False)
    rows = _jsonl_rows(meta, lines) if meta.suffix == ".jsonl" else _csv_rows(meta, lines)
    out: dict[Path, str | CaptionError] = {}
    first_line: dict[Path, int] = {}
    for r in rows:
        where = f"{meta} line {r.line}"
        name = (r.name or "").strip()
        if r.problem or not name:
            problem = r.problem or f"no {METADATA_NAME_KEY}"
            skips.add(f"{meta}:{r.line}", DataError(problem if problem.startswith(str(meta)) else
                                                    f"{where}: {problem}"), what="metadata row")
            continue
        if has_surrogates(name):
            skips.add(f"{meta}:{r.line}", DataError(r.utf8 or f"{where}: file name is not valid UTF-8"),
                      what="metadata row")
            continue
        image = meta.parent / name
        if not image.is_file():
            skips.add(f"{meta}:{r.line}", DataError(f"{where}: image {name!r} not found in {meta.parent}"),
                      what="metadata row")
            continue
        if image in out:
            skips.add(f"{meta}:{r.line}", DataError(f"{where}: second row for {name!r} (first at line "
                                                    f"{first_line[image]}); this row is ignored"),
                      what="metadata row")
            continue
        first_line[image] = r.line
        if r.text is not None and has_surrogates(r.text):
            out[image] = CaptionError(r.utf8 or f"{where}: caption is not valid UTF-8")
        elif r.text is None or not r.text.strip():
            out[image] = CaptionError(f"{where}: missing caption")
        else:
            out[image] = r.text.strip()
    return out


def _sidecar_caption(image: Path) -> str:
    """The caption of ``a.png`` from ``a.txt`` (or ``a.png.txt``); CaptionError when there is none."""
    for side in (image.with_suffix(".txt"), image.with_name(image.name + ".txt")):
        if side.is_file():
            try:
                lines = read_lines(side)
            except DataError as e:
                raise CaptionError(str(e)) from None
            text = "\n".join(t for _, t, _ in lines).strip()
            if not text:
                raise CaptionError(f"{side}: empty caption")
            return text
    raise CaptionError(f"{image}: no caption (no metadata.csv / metadata.jsonl row, no {image.stem}.txt)")


def _folder_captions(path: Path, skips: "_Skips") -> Callable[[Path], str]:
    """caption(image) for a captioned image folder: metadata rows first, then a sidecar .txt."""
    metas = sorted(p for name in METADATA_FILES for p in path.rglob(name) if p.is_file())
    dirs = [m.parent for m in metas]
    for d in dirs:
        if dirs.count(d) > 1:
            raise DataError(f"{d}: both metadata.csv and metadata.jsonl; keep one")
    if not metas and next(path.rglob("*.txt"), None) is None:
        raise DataError(f"{path}: no captions found (looked for {' / '.join(METADATA_FILES)} with columns "
                        f"{METADATA_NAME_KEY},text, or a <image>.txt per image); add them, or use data.kind "
                        f"without captions")
    table: dict[Path, str | CaptionError] = {}
    for meta in metas:
        table.update(_read_metadata(meta, skips))

    def caption(image: Path) -> str:
        got = table.get(image)
        if got is None:
            return _sidecar_caption(image)
        if isinstance(got, CaptionError):
            raise got
        return got
    return caption


# ----------------------------------------------------------------------------------------------------
# Image folder
# ----------------------------------------------------------------------------------------------------

def _folder_sources(path: Path, skips: "_Skips | None" = None) -> dict[str, Source]:
    """Every image under ``path`` (recursive, sorted); with ``skips`` (captions wanted) each item loads
    (image, caption), the caption first so that an uncaptioned image is not decoded for nothing."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
                        f"put the images there or fix the path")
    caption = _folder_captions(path, skips) if skips is not None else None

    def load_captioned(f: Path) -> tuple[Image.Image, str]:
        text = caption(f)  # first: an image without a caption is not decoded
        return _open_file(f), text

    def items():
        for f in files:
            if caption is None:
                yield str(f), (lambda f=f: _open_file(f))
            else:
                yield str(f), (lambda f=f: load_captioned(f))
    return {"train": (len(files), items)}


# ----------------------------------------------------------------------------------------------------
# Parquet (HF datasets export: an `image` column of struct {bytes, path}, or a plain binary column)
# ----------------------------------------------------------------------------------------------------

def _find_column(pf, f: Path, candidates: tuple[str, ...], what: str, hint: str) -> str:
    """The first of ``candidates`` in the parquet file's schema, or one line naming what was found."""
    names = pf.schema_arrow.names
    for c in candidates:
        if c in names:
            return c
    raise DataError(f"{f}: no {what} column (looked for {candidates}, found {names}); export the dataset with {hint}")


def _parquet_column(pf, f: Path) -> str:
    return _find_column(pf, f, PARQUET_IMAGE_COLUMNS, "image", "an 'image' column of encoded image bytes")


def _parquet_text_column(pf, f: Path) -> str:
    return _find_column(pf, f, PARQUET_TEXT_COLUMNS, "caption", "a 'text' column of captions")


def _parquet_caption(value, where: str) -> str:
    """A parquet caption cell (string or bytes) as text; CaptionError naming file:row when unusable."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CaptionError(f"{where}: caption is not valid UTF-8 (byte 0x{value[e.start]:02x} at "
                               f"position {e.start + 1})") from None
    if value is None or not str(value).strip():
        raise CaptionError(f"{where}: missing caption")
    return str(value).strip()


def _load_parquet_captioned(data, text, where: str) -> tuple[Image.Image, str]:
    caption = _parquet_caption(text, where)  # first: a row without a caption is not decoded
    return _open_encoded(data), caption


def _parquet_split(files: list[Path], captions: bool = False) -> Source:
    """Rows of ``files`` in order; with ``captions`` each item loads (image, caption)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    opened = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise DataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e}); "
                            f"download it again or remove it") from None
        cols = [_parquet_column(pf, f)] + ([_parquet_text_column(pf, f)] if captions else [])
        opened.append((f, pf, cols))

    def items():
        for f, pf, cols in opened:
            row = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols):
                arr = batch.column(0)
                if pa.types.is_struct(arr.type):
                    arr = arr.field("bytes")
                texts = batch.column(1).to_pylist() if captions else [None] * len(arr)
                for data, text in zip(arr.to_pylist(), texts):
                    name = f"{f}:{row}"
                    if captions:
                        yield name, (lambda data=data, text=text, name=name:
                                     _load_parquet_captioned(data, text, name))
                    else:
                        yield name, (lambda data=data: _open_encoded(data))
                    row += 1
    return sum(pf.metadata.num_rows for _, pf, _ in opened), items


def _parquet_sources(path: Path, skips: "_Skips | None" = None) -> dict[str, Source]:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise DataError(f"{path}: no .parquet files found; put the dataset's parquet files there")
    heldout = [f for f in files if "test" in f.name.lower() or "valid" in f.name.lower()]
    train = [f for f in files if f not in heldout]
    captions = skips is not None
    out = {"train": _parquet_split(train, captions)} if train else {}
    if heldout:
        out["heldout"] = _parquet_split(heldout, captions)
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


def _sources(fmt: str, path: Path, skips: "_Skips | None" = None) -> dict[str, Source]:
    """The splits of the dataset at ``path``; with ``skips`` (captions wanted) their items load
    (image, caption) and metadata problems are reported through ``skips``."""
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown dataset format {fmt!r}; use one of {FORMATS}")
    if not path.exists():
        detect_format(path)  # raises the "not found" message
    if skips is None:
        return _READERS[fmt](path)
    if fmt not in CAPTION_FORMATS:
        raise DataError(f"{path}: the {fmt} format has no captions; a captioned dataset (data.kind: laion) is an "
                        f"image folder with metadata.csv (file_name,text), metadata.jsonl or <image>.txt "
                        f"captions, or parquet files with an image and a text column")
    return _READERS[fmt](path, skips)


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

    def add(self, item: str, err: Exception, what: str = "image") -> None:
        """Record a skipped ``item``; with on_corrupt=fail raise a DataError instead. Caption and metadata
        problems (DataErrors) already name their file and line; the message keeps them."""
        reason = f"{type(err).__name__}: {err}".strip()
        if self.on_corrupt == "fail":
            if isinstance(err, DataError):
                what = "caption" if isinstance(err, CaptionError) else what
                raise DataError(f"{err}; fix the {what}, or rerun with on_corrupt=skip to leave "
                                f"{'the image' if what == 'caption' else 'it'} out") from None
            raise DataError(f"{item}: cannot read {what} ({reason}); fix or delete it, or rerun with "
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


def default_transform(resolution: int, crop: str, seed: int) -> Callable[[object, int], np.ndarray]:
    """The training transform of docs/paper.md §1.6 as a (image, source index) -> uint8 [r, r, 3] function."""
    return lambda img, index: transform_image(img, resolution, crop, seed, index)


def _warn(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # does not break a running progress bar


def _write_set(out: Path, source: Source, indices: np.ndarray, *, resolution: int, crop: str, seed: int,
               skips: _Skips, progress: bool, desc: str, transform: Callable | None = None,
               captions: list[str] | None = None) -> int:
    """Transform the selected images of ``source`` into the .npy ``out``; returns the count written.

    ``transform(image, index)``: default the training transform (``default_transform``). ``captions``: a
    list that receives the caption of every written image, in order (captioned sources); a skipped image
    takes its caption with it."""
    total, items = source
    transform = transform or default_transform(resolution, crop, seed)
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
                    got = load()
                    img, text = got if isinstance(got, tuple) else (got, None)
                    img = transform(img, index)
                except Exception as e:  # decode errors, truncated files, unconvertible modes, captions, ...
                    skips.add(name, e)
                else:
                    arr[written] = img
                    written += 1
                    if captions is not None:
                        captions.append(text)
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


def write_captions(images_path: Path, captions: list[str]) -> Path:
    """``<stem>.meta.npz`` next to ``images_path`` with key ``captions`` (as deme.data.save_set writes the
    shapes' captions), atomically; returns its path."""
    from deme.data import meta_path

    buf = io.BytesIO()
    np.savez_compressed(buf, captions=np.asarray(captions, dtype=np.str_))
    meta = meta_path(images_path)
    atomic_write_bytes(meta, buf.getvalue())
    return meta


def prepare(fmt: str, path: str | Path, out_dir: str | Path, *, resolution: int, crop: str = "random",
            num_train: int = 0, num_ref: int = 0, ref_path: str | Path = "", seed: int = 0,
            on_corrupt: str = "skip", progress: bool = True, ref_crop: str = "center",
            captions: bool = False) -> dict:
    """Read the dataset at ``path`` (format ``fmt``, or "auto"), write train.npy, ref.npy, manifest.json.

    num_train / num_ref: 0 = all (of the training images / of the reference source); otherwise a seeded
    random subset in source order. Reference source: ``ref_path`` if given, else the held-out split,
    else ``num_ref`` random training images (required > 0 then). ``on_corrupt``: "skip" (listed in the
    manifest, warned on stderr) or "fail" (DataError naming the image). ``captions``: the dataset is
    captioned (image folder + metadata.csv / metadata.jsonl / <image>.txt, or parquet with a text
    column; a ref_path must be too); the captions of the written images go to train.meta.npz and
    ref.meta.npz (key ``captions``). Returns the manifest.
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

    skips = _Skips(on_corrupt)  # before reading: caption metadata problems are reported while reading it
    sources = _sources(fmt, path, skips if captions else None)
    if "train" not in sources:
        raise DataError(f"{path}: no training images (every parquet file name contains 'test' or 'valid'); "
                        f"rename the training files")
    train = sources["train"]
    train_idx = _subset(train[0], num_train, seed, "training", str(path))

    ref_fmt = ""
    if ref_path:
        ref_fmt = detect_format(ref_path)
        ref_sources = _sources(ref_fmt, Path(ref_path), skips if captions else None)
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
    kw = dict(resolution=resolution, seed=seed, skips=skips, progress=progress)
    texts = {"train": [] if captions else None, "ref": [] if captions else None}
    n_train = _write_set(out_dir / "train.npy", train, train_idx, crop=crop, desc="train",
                         captions=texts["train"], **kw)
    n_ref = _write_set(out_dir / "ref.npy", ref, ref_idx, crop=ref_crop, desc="ref", captions=texts["ref"], **kw)
    skips.summary()
    sha = {"train.npy": sha256_file(out_dir / "train.npy"), "ref.npy": sha256_file(out_dir / "ref.npy")}
    if captions:
        for name, text in texts.items():
            meta = write_captions(out_dir / f"{name}.npy", text)
            sha[meta.name] = sha256_file(meta)

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
        "sha256": sha,
        "skipped": skips.items,
    }
    if captions:
        manifest["captions"] = {"train.meta.npz": len(texts["train"]), "ref.meta.npz": len(texts["ref"])}
    write_json(out_dir / "manifest.json", manifest)
    return manifest
