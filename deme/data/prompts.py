"""Prompt sets and FID references of the zero-shot text-to-image benchmarks (docs/paper.md §3.2, §8.3).

The user's files (``benchmarks.*`` in params.yaml), read and validated here; every problem is one line
naming the file and line (``PromptError``):

- MS-COCO: BK-SDM's ``mscoco_val2014_30k/metadata.csv`` (``file_name,text``, one caption per val2014
  image). The first ``coco_count`` rows are the evaluated prompts (COCO-30K); the next
  ``coco_proxy_count`` rows (or those of ``coco_proxy_prompts``: one caption per image, images disjoint from
  the evaluated prompts') are the merge search's FID proxy (docs/paper.md §1.8). FID reference: every image
  of ``coco_images`` (val2014, 40,504 images) but the proxy prompts' images, resized to ``fid_resolution``
  squared with PIL bicubic, as BK-SDM (§8.3); the proxy prompts' images are the merge search's reference.
- ImageNet-1K: the class names (``.txt`` one per line in class-index order, or ``index<TAB>name``), each
  put in ``imagenet_template`` ``imagenet_per_class`` times (§3.2: 1000 x 2). FID reference: the images
  of ``imagenet_images`` (ImageNet val, recursive), shorter side resized then center-cropped (§8.3 [OURS]).
- PartiPrompts: ``PartiPrompts.tsv`` (column ``Prompt``; Category and Challenge kept) or a ``.txt``
  with one prompt per line; all of them (1,632) or a seeded subset of ``parti_count``. CLIP score only.

Files are decoded line by line, so a byte that is not UTF-8 is reported with its line. Reference images
are streamed into a memory-mapped .npy (deme.data.readers), never held in memory together; corrupt
images are skipped and listed, or fatal with ``data.on_corrupt: fail``; ``reference_samples`` > 0
takes a seeded subset.

Tiny profiles (``data.kind: shapes``) write stand-ins of these files into ``data/<profile>/bench_src/``
(held-out captioned shapes as "COCO", shape x colour class names as "ImageNet", compositional
rephrasings as "PartiPrompts") and read them back through the same readers, so the default pipeline
runs the real code path. Their ImageNet FID reference is the profile's held-out ``ref.npy``.

Outputs (written by stages/prepare.py inside the atomic data/<profile>/):

    prompts/{coco,coco_proxy,imagenet,parti}.json   one prompt set each (layout: ``prompt_set``)
    bench/{coco,coco_search,imagenet}.npy            uint8 [n, fid_resolution, fid_resolution, 3]
    bench/manifest.json                              per reference: source, counts, sha256, skipped
    bench_src/                                       the stand-in source files (shapes profiles only)
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from deme.data import readers
from deme.data.readers import DataError
from deme.io import derive_seed, sha256_file, write_json


class PromptError(DataError):
    """A problem with a benchmark file; one line naming the file (and line) or the params key."""


PROMPT_SETS = ("coco", "coco_proxy", "imagenet", "parti")
FID_BENCHMARKS = ("coco", "imagenet")
SOURCE_KEYS = ("coco_prompts", "coco_images", "imagenet_classes", "imagenet_images", "parti_prompts")
FOLDER_KEYS = ("coco_images", "imagenet_images")

# What to fetch when a benchmark file is missing (docs/paper.md §8.2; BK-SDM's scripts/get_mscoco_files.sh).
FETCH = {
    "coco_prompts": "fetch BK-SDM's COCO-30K captions (file_name,text): wget https://netspresso-research-code-"
                    "release.s3.us-east-2.amazonaws.com/data/mscoco_val2014_30k/metadata.csv "
                    "(github.com/Nota-NetsPresso/BK-SDM)",
    "coco_images": "fetch the MS-COCO 2014 validation images from cocodataset.org: wget "
                   "http://images.cocodataset.org/zips/val2014.zip and unzip it there (40,504 images)",
    "imagenet_classes": "put the 1,000 ImageNet-1K class names there, one per line in class-index order (or "
                        "index<TAB>name), e.g. open_clip's zero_shot_metadata.IMAGENET_CLASSNAMES with its two "
                        "repeated names (missile, sunglasses) made unique",
    "imagenet_images": "fetch the ImageNet-1K validation images (ILSVRC2012_img_val.tar, 50,000 images, from "
                       "image-net.org) and extract them there",
    "coco_proxy_prompts": "make a metadata.csv (file_name,text) of one caption per val2014 image for images that are "
                          "not in the 30K list (from annotations/captions_val2014.json of "
                          "http://images.cocodataset.org/annotations/annotations_trainval2014.zip), at least "
                          "benchmarks.coco_proxy_count rows; or set it to '' to take the rows after benchmarks.coco_count "
                          "of benchmarks.coco_prompts",
    "parti_prompts": "fetch PartiPrompts.tsv from https://github.com/google-research/parti (or the HF dataset "
                     "nateraw/parti-prompts)",
}


# ----------------------------------------------------------------------------------------------------
# Reading files, line by line
# ----------------------------------------------------------------------------------------------------

def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file; a bad byte is a PromptError naming its line."""
    try:
        return [(n, text) for n, text, _ in readers.read_lines(path)]
    except DataError as e:
        raise PromptError(str(e)) from None
    except OSError as e:
        raise PromptError(f"{path}: cannot read ({e.strerror or e})") from None


def _unquote(cell: str) -> str:
    """A TSV cell as written by a quoting exporter ("a ""b"" c") back to its text; raw cells unchanged."""
    m = re.fullmatch(r'"((?:[^"]|"")*)"', cell)
    return m.group(1).replace('""', '"') if m else cell


@dataclass(frozen=True)
class CocoRow:
    line: int  # first line of the row in metadata.csv (the header is line 1)
    file_name: str
    text: str


def read_coco_metadata(path: str | Path) -> list[CocoRow]:
    """The rows of BK-SDM's metadata.csv (header ``file_name,text``; ``caption`` is accepted for text).

    Every row needs a file name and a non-empty caption; errors name the line."""
    path = Path(path)
    lines = [(n, t, None) for n, t in _lines(path)]
    records = readers.csv_records(lines)
    header = next(records, None)
    if header is None:
        raise PromptError(f"{path}: empty file; expected a header 'file_name,text' and one row per caption")
    names = [h.strip() for h in header[2]]
    text_key = next((k for k in readers.METADATA_TEXT_KEYS if k in names), None)
    if "file_name" not in names or text_key is None:
        raise PromptError(f"{path} line 1: header {names} lacks 'file_name' and 'text'; expected BK-SDM's "
                          f"metadata.csv (file_name,text)")
    i_name, i_text = names.index("file_name"), names.index(text_key)
    rows = []
    for first, _, row in records:
        if len(row) != len(names):
            raise PromptError(f"{path} line {first}: {len(row)} fields, the header has {len(names)} "
                              f"(quote captions that contain commas)")
        name, text = row[i_name].strip(), row[i_text].strip()
        if not name:
            raise PromptError(f"{path} line {first}: empty file_name")
        if not text:
            raise PromptError(f"{path} line {first}: empty caption")
        rows.append(CocoRow(first, name, text))
    return rows


def read_class_names(path: str | Path) -> list[str]:
    """ImageNet class names in class-index order: one per line, or ``index<TAB>name`` lines (any order,
    indices 0..n-1 each once). Empty lines, duplicate names or indices, mixed layouts: errors by line."""
    path = Path(path)
    lines = _lines(path)
    if not lines:
        raise PromptError(f"{path}: empty file; expected one class name per line")
    tabbed = "\t" in lines[0][1]
    by_index: dict[int, tuple[int, str]] = {}
    seen: dict[str, int] = {}
    for n, text in lines:
        if not text.strip():
            raise PromptError(f"{path} line {n}: empty line; one class name per line, no blank lines")
        if ("\t" in text) != tabbed:
            raise PromptError(f"{path} line {n}: mixes layouts; use 'name' on every line or 'index<TAB>name' "
                              f"on every line (line 1 is {'index<TAB>name' if tabbed else 'name'})")
        index, name = len(by_index), text.strip()
        if tabbed:
            head, name = text.split("\t", 1)
            name = name.strip()
            try:
                index = int(head)
            except ValueError:
                raise PromptError(f"{path} line {n}: {head!r} is not a class index") from None
            if index in by_index:
                raise PromptError(f"{path} line {n}: class index {index} again (first at line {by_index[index][0]})")
            if not name:
                raise PromptError(f"{path} line {n}: empty class name")
        if name in seen:
            raise PromptError(f"{path} line {n}: duplicate class name {name!r} (also line {seen[name]}); class "
                              f"names must be unique, rename one (e.g. 'crane (bird)')")
        seen[name] = n
        by_index[index] = (n, name)
    missing = sorted(set(range(len(by_index))) - set(by_index))
    if missing:
        raise PromptError(f"{path}: class indices must be 0..{len(by_index) - 1}; missing {missing[:5]}")
    return [by_index[i][1] for i in range(len(by_index))]


@dataclass(frozen=True)
class PartiRow:
    line: int
    prompt: str
    category: str = ""
    challenge: str = ""


def read_parti(path: str | Path) -> list[PartiRow]:
    """PartiPrompts: ``.tsv`` with a header holding ``Prompt`` (plus Category, Challenge, Note), one prompt
    per line (tab-separated, unquoted, as google-research/parti ships it), or any other file with one
    prompt per line. Empty prompts are errors by line."""
    path = Path(path)
    lines = _lines(path)
    if not lines:
        raise PromptError(f"{path}: empty file")
    if path.suffix.lower() != ".tsv":
        for n, text in lines:
            if not text.strip():
                raise PromptError(f"{path} line {n}: empty line; one prompt per line")
        return [PartiRow(n, text.strip()) for n, text in lines]
    header = [h.strip() for h in lines[0][1].split("\t")]
    lower = [h.lower() for h in header]
    if "prompt" not in lower:
        raise PromptError(f"{path} line 1: no 'Prompt' column (header: {header}); expected PartiPrompts.tsv from "
                          f"github.com/google-research/parti (columns Prompt, Category, Challenge, Note)")
    col = {k: lower.index(k) if k in lower else None for k in ("prompt", "category", "challenge")}
    rows = []
    for n, text in lines[1:]:
        cells = [_unquote(c.strip()) for c in text.split("\t")]
        cell = lambda k: cells[col[k]].strip() if col[k] is not None and col[k] < len(cells) else ""  # noqa: E731
        if not cell("prompt"):
            raise PromptError(f"{path} line {n}: empty prompt")
        rows.append(PartiRow(n, cell("prompt"), cell("category"), cell("challenge")))
    if not rows:
        raise PromptError(f"{path}: no prompts after the header")
    return rows


# ----------------------------------------------------------------------------------------------------
# Prompt sets
# ----------------------------------------------------------------------------------------------------

def prompt_set(name: str, benchmark: str, prompts: list[str], source: str, sha256: str, **extra) -> dict:
    """The JSON layout of prompts/<name>.json: name, benchmark, count, prompts, source, sha256 (of the
    source file), then the set's own fields (file names, class indices, categories, ...)."""
    return {"name": name, "benchmark": benchmark, "count": len(prompts), "source": source, "sha256": sha256,
            **extra, "prompts": list(prompts)}


def _image_names(folder: Path) -> set[str]:
    """Paths of the files under ``folder``, relative to it (posix), for the metadata file-name check."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def coco_sets(path: Path, count: int, proxy: int, *, images: Path | None = None, on_corrupt: str = "skip",
              label: str | None = None) -> tuple[dict, dict]:
    """(coco, coco_proxy): rows 1..count and the next ``proxy`` rows of the metadata (disjoint rows, so
    the merge search never sees an evaluated prompt, docs/paper.md §1.8). With ``images``, a row whose image
    is not in that folder is skipped and listed (``on_corrupt=skip``) or a PromptError (``fail``)."""
    path = Path(path)
    rows = read_coco_metadata(path)
    names = _image_names(images) if images is not None else None
    need, kept, skipped = count + proxy, [], []
    for r in rows:
        if len(kept) == need:
            break
        if names is not None and r.file_name not in names:
            if on_corrupt == "fail":
                raise PromptError(f"{path} line {r.line}: image {r.file_name!r} not in {images}; fetch the whole "
                                  f"val2014 folder, or rerun with data.on_corrupt=skip to leave the row out")
            skipped.append({"line": r.line, "file_name": r.file_name, "error": f"image not in {images}"})
            continue
        kept.append(r)
    if len(kept) < need:
        extra = f" ({len(skipped)} row{'s' * (len(skipped) != 1)} skipped for missing images)" if skipped else ""
        raise PromptError(f"{path}: {len(kept)} usable prompt rows{extra}, {need} needed (benchmarks.coco_count="
                          f"{count} + benchmarks.coco_proxy_count={proxy}); add rows (e.g. captions of other val2014 "
                          f"images from annotations/captions_val2014.json) or lower the counts")
    sha, source = sha256_file(path), label or str(path)

    def make(name: str, part: list[CocoRow], purpose: str) -> dict:
        return prompt_set(name, "coco", [r.text for r in part], source, sha, purpose=purpose,
                          metrics=["fid", "clip"], file_names=[r.file_name for r in part],
                          lines=[r.line for r in part], skipped=skipped if name == "coco" else [])
    return (make("coco", kept[:count], "evaluation (COCO-30K protocol, docs/paper.md §3.2)"),
            make("coco_proxy", kept[count:], "merge search FID proxy, disjoint from coco (docs/paper.md §1.8)"))


def imagenet_set(path: Path, template: str, per_class: int, label: str | None = None) -> dict:
    """template with each class name, ``per_class`` times per class, in class order (docs/paper.md §3.2)."""
    names = read_class_names(path)
    prompts = [template.replace("{}", n) for n in names for _ in range(per_class)]
    index = [i for i in range(len(names)) for _ in range(per_class)]
    return prompt_set("imagenet", "imagenet", prompts, label or str(path), sha256_file(Path(path)),
                      purpose="evaluation (ImageNet-1K prompts, docs/paper.md §3.2)", metrics=["fid", "clip"],
                      template=template, per_class=per_class, num_classes=len(names), class_names=names,
                      class_index=index)


def parti_set(path: Path, count: int = 0, seed: int = 0, label: str | None = None) -> dict:
    """All PartiPrompts (count 0) or a seeded subset of ``count`` in file order (CLIP score only)."""
    rows = read_parti(path)
    if count > len(rows):
        raise PromptError(f"{path}: {len(rows)} prompts, benchmarks.parti_count={count} asked for; lower it "
                          f"(0 = all)")
    if 0 < count < len(rows):
        keep = np.sort(np.random.default_rng(derive_seed(seed, "bench", "parti")).choice(len(rows), count,
                                                                                         replace=False))
        rows = [rows[i] for i in keep]
    return prompt_set("parti", "parti", [r.prompt for r in rows], label or str(path), sha256_file(Path(path)),
                      purpose="evaluation (PartiPrompts, CLIP score only, docs/paper.md §3.2)", metrics=["clip"],
                      categories=[r.category for r in rows], challenges=[r.challenge for r in rows],
                      lines=[r.line for r in rows])


def load_prompt_set(path: str | Path) -> dict:
    """A prompt set written by the prepare stage, checked (count matches, prompts are strings)."""
    from deme.io import read_json

    path = Path(path)
    data = read_json(path)
    ok = isinstance(data, dict) and isinstance(data.get("prompts"), list) and \
        all(isinstance(p, str) and p for p in data["prompts"]) and data.get("count") == len(data["prompts"])
    if not ok:
        raise PromptError(f"{path}: not a prompt set (name, count, prompts); rerun: python stages/prepare.py --t2i")
    return data


# ----------------------------------------------------------------------------------------------------
# FID reference images (docs/paper.md §8.3)
# ----------------------------------------------------------------------------------------------------

def _rgb(img) -> Image.Image:
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_square(img, resolution: int) -> np.ndarray:
    """BK-SDM's COCO transform: the whole image resized to resolution x resolution, PIL bicubic."""
    img = _rgb(img)
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def center_crop_resize(img, resolution: int) -> np.ndarray:
    """Shorter side to ``resolution`` (PIL bicubic, torchvision Resize(int) sizes), then a center crop."""
    img = _rgb(img)
    w, h = img.size
    if min(w, h) != resolution:
        size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
        img = img.resize(size, Image.BICUBIC)
        w, h = img.size
    top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


TRANSFORMS: dict[str, Callable] = {"resize": resize_square, "center_crop": center_crop_resize}


def write_reference(source: readers.Source, out: Path, *, resolution: int, transform: str, samples: int = 0,
                    seed: int = 0, on_corrupt: str = "skip", where: str = "", progress: bool = False) -> dict:
    """Stream the images of ``source`` (a deme.data.readers Source) into the .npy ``out``.

    samples: 0 = every image, else a seeded subset in source order. Returns the manifest entry: counts,
    transform, sha256 and the skipped images."""
    if samples > source[0]:
        raise PromptError(f"{where}: benchmarks.reference_samples={samples} but only {source[0]} images are "
                          f"there; lower it (0 = all)")
    idx = readers._subset(source[0], samples, seed, "reference", where)
    skips = readers._Skips(on_corrupt)
    fn = TRANSFORMS[transform]
    out.parent.mkdir(parents=True, exist_ok=True)
    n = readers._write_set(out, source, idx, resolution=resolution, crop="center", seed=seed, skips=skips,
                           progress=progress, desc=out.stem, transform=lambda img, i: fn(img, resolution))
    skips.summary()
    return {"source": where, "available": source[0], "selected": len(idx), "count": n, "resolution": resolution,
            "transform": transform, "samples": samples, "seed": seed, "sha256": sha256_file(out),
            "skipped": skips.items}


def folder_reference(folder: Path, out: Path, *, transform: str, label: str = "", only: set[str] | None = None,
                     exclude: set[str] = frozenset(), **kw) -> dict:
    """Every image under ``folder`` (recursive, sorted) as a reference .npy; ``only`` / ``exclude``: file names
    relative to ``folder`` (posix, as in COCO metadata) to keep / to leave out."""
    folder = Path(folder)
    source = readers._folder_sources(folder)["train"]
    if only is not None or exclude:
        def keep(name: str) -> bool:
            rel = Path(name).relative_to(folder).as_posix()
            return (only is None or rel in only) and rel not in exclude
        items = [item for item in source[1]() if keep(item[0])]
        if not items:
            raise PromptError(f"{label or folder}: no images left for {out.name} (kept {len(only or ())} named, "
                              f"left out {len(exclude)})")
        source = (len(items), lambda: iter(items))
    return write_reference(source, out, transform=transform, where=label or str(folder), **kw)


def array_reference(images_npy: Path, out: Path, *, label: str = "", **kw) -> dict:
    """A reference from a suite .npy (the tiny profiles' held-out ref.npy), resized if needed."""
    images = np.load(images_npy, mmap_mode="r")
    names = [f"{label or images_npy}:{i}" for i in range(len(images))]
    return write_reference(readers._array_source(images, names), out, transform="center_crop",
                           where=label or str(images_npy), **kw)


# ----------------------------------------------------------------------------------------------------
# Tiny stand-ins (data.kind: shapes)
# ----------------------------------------------------------------------------------------------------

PARTI_STANDIN_ROWS = 160  # about a tenth of PartiPrompts' 1,632
PARTI_TEMPLATES = (  # (template, Challenge): rephrasings the training captions never use
    ("a {bg} background with a {size} {color} {shape} on it", "Properties & Positioning"),
    ("a {shape} that is {color}, on {bg}", "Linguistic Structures"),
    ("on a {bg} background, there is a {size} {color} {shape}", "Linguistic Structures"),
    ("a {size} {shape}, coloured {color}, in front of a {bg} background", "Properties & Positioning"),
)


def standin_class_names() -> list[str]:
    """'red circle', ...: shape x colour in the feature network's label order (shape * 8 + colour)."""
    from deme.data.shapes import COLORS, SHAPES

    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def _standin_coco(cfg, root: Path) -> tuple[Path, Path]:
    """Held-out captioned shapes (own seed: not the training or reference images) as metadata.csv + PNGs."""
    from deme.data.shapes import generate_shapes

    n = cfg.benchmarks.coco_count + cfg.benchmarks.coco_proxy_count
    held = generate_shapes(n, derive_seed(cfg.seed, "bench", "coco"), cfg.data.resolution)
    images = root / "coco" / "images"
    images.mkdir(parents=True)
    for i, img in enumerate(held.images):
        Image.fromarray(img).save(images / f"{i:05d}.png")
    meta = root / "coco" / "metadata.csv"
    with open(meta, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file_name", "text"])
        w.writerows([f"{i:05d}.png", c] for i, c in enumerate(held.captions))
    return meta, images


def _standin_parti(cfg, root: Path) -> Path:
    """A PartiPrompts-like .tsv of compositional rephrasings of random shapes."""
    from deme.data.shapes import BACKGROUNDS, COLORS, SHAPES, SIZES

    n = max(PARTI_STANDIN_ROWS, cfg.benchmarks.parti_count)
    rng = np.random.default_rng(derive_seed(cfg.seed, "bench", "parti-standin"))
    rows = ["Prompt\tCategory\tChallenge\tNote"]
    for i in range(n):
        template, challenge = PARTI_TEMPLATES[i % len(PARTI_TEMPLATES)]
        words = dict(shape=SHAPES[rng.integers(len(SHAPES))], color=list(COLORS)[rng.integers(len(COLORS))],
                     bg=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], size=SIZES[rng.integers(len(SIZES))])
        rows.append(f"{template.format(**words)}\tIllustrations\t{challenge}\tshapes stand-in")
    path = root / "parti" / "PartiPrompts.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_standins(cfg, root: Path) -> dict[str, Path]:
    """The stand-in source files under ``root`` (data/<profile>/bench_src), deterministic from cfg.seed;
    returns them by ``benchmarks.<key>``. imagenet_images is not written: the profile's ref.npy serves."""
    root.mkdir(parents=True, exist_ok=True)
    meta, images = _standin_coco(cfg, root)
    classes = root / "imagenet" / "classes.txt"
    classes.parent.mkdir(parents=True)
    classes.write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(standin_class_names())), encoding="utf-8")
    return {"coco_prompts": meta, "coco_images": images, "imagenet_classes": classes,
            "parti_prompts": _standin_parti(cfg, root)}


# ----------------------------------------------------------------------------------------------------
# The prepare stage's entry points
# ----------------------------------------------------------------------------------------------------

@dataclass
class Sources:
    """Where each benchmark file is, and how to name it in the outputs."""

    paths: dict[str, Path]  # benchmarks.<key> -> path (imagenet_images: a folder, or a .npy for stand-ins)
    standin: bool
    labels: dict[str, str]  # benchmarks.<key> -> the name recorded in the prompt sets and manifest


def source_path(bench, key: str) -> Path:
    """``benchmarks.<key>`` as an existing path, or one line naming the key and what to fetch."""
    value = getattr(bench, key)
    if not value:
        raise PromptError(f"benchmarks.{key}: not set; {FETCH[key]}")
    path = Path(value)
    if not path.exists():
        raise PromptError(f"benchmarks.{key}={value}: not found; {FETCH[key]}")
    if (key in FOLDER_KEYS) != path.is_dir():
        kind = "a folder of images" if key in FOLDER_KEYS else "a file"
        raise PromptError(f"benchmarks.{key}={value}: expected {kind}; {FETCH[key]}")
    return path


def benchmark_sources(cfg, data_dir: Path, final_dir: Path | None = None) -> Sources:
    """Real kinds: the user's files, checked to exist. Shapes: the stand-ins, written to
    ``data_dir/bench_src`` (recorded under ``final_dir``, where data_dir lands after the atomic rename)."""
    if cfg.data.kind != "shapes":
        paths = {key: source_path(cfg.benchmarks, key) for key in SOURCE_KEYS}
        return Sources(paths, False, {k: str(p) for k, p in paths.items()})
    for key in (*SOURCE_KEYS, "coco_proxy_prompts"):  # never ignore a path silently
        if getattr(cfg.benchmarks, key):
            raise PromptError(f"benchmarks.{key}: set, but data.kind: shapes profiles generate their own stand-in "
                              f"benchmarks; clear it (or use a profile with real data, e.g. sd14)")
    data_dir, final_dir = Path(data_dir), Path(final_dir or data_dir)
    paths = write_standins(cfg, data_dir / "bench_src")
    paths["imagenet_images"] = data_dir / "ref.npy"  # written later by the stage; read only for the reference
    labels = {k: str(final_dir / p.relative_to(data_dir)) for k, p in paths.items()}
    return Sources(paths, True, labels)


def check_proxy(coco: dict, proxy: dict, where: str) -> None:
    """The merge search's proxy prompts: one caption per image (their images are the search's FID reference)
    and no image of the evaluated prompts (docs/paper.md §1.8); else one line naming the file and line."""
    first: dict[str, int] = {}
    for line, name in zip(proxy["lines"], proxy["file_names"]):
        if name in first:
            raise PromptError(f"{where} line {line}: image {name!r} again (first at line {first[name]}); the merge "
                              f"search's reference is the proxy prompts' images, so keep one caption per image")
        first[name] = line
    shared = set(coco["file_names"]) & set(first)
    if shared:
        raise PromptError(f"{where}: {len(shared)} of its proxy images are also in the evaluated COCO prompts (e.g. "
                          f"{sorted(shared)[0]}); the proxy must be disjoint from them (docs/paper.md §1.8)")


def build_prompt_sets(cfg, src: Sources) -> dict[str, dict]:
    """The four prompt sets from the (validated) source files; nothing is written."""
    b, p, L = cfg.benchmarks, src.paths, src.labels
    if b.coco_proxy_prompts and not src.standin:  # a separate caption file for the merge search's proxy
        coco, _ = coco_sets(p["coco_prompts"], b.coco_count, 0, images=p["coco_images"],
                            on_corrupt=cfg.data.on_corrupt, label=L["coco_prompts"])
        path = source_path(b, "coco_proxy_prompts")
        _, proxy = coco_sets(path, 0, cfg.benchmarks.coco_proxy_count, images=p["coco_images"],
                             on_corrupt=cfg.data.on_corrupt, label=str(path))
        where = f"benchmarks.coco_proxy_prompts={path}"
    else:
        coco, proxy = coco_sets(p["coco_prompts"], b.coco_count, cfg.benchmarks.coco_proxy_count, images=p["coco_images"],
                                on_corrupt=cfg.data.on_corrupt, label=L["coco_prompts"])
        where = f"benchmarks.coco_prompts={L['coco_prompts']} (the rows after coco_count)"
    check_proxy(coco, proxy, where)
    return {"coco": coco, "coco_proxy": proxy,
            "imagenet": imagenet_set(p["imagenet_classes"], b.imagenet_template, b.imagenet_per_class,
                                     label=L["imagenet_classes"]),
            "parti": parti_set(p["parti_prompts"], b.parti_count, cfg.seed, label=L["parti_prompts"])}


def write_benchmarks(cfg, sets: dict[str, dict], src: Sources, data_dir: Path, final_dir: Path | None = None,
                     progress: bool = True) -> dict:
    """prompts/<set>.json, bench/{coco,coco_search,imagenet}.npy and bench/manifest.json under ``data_dir``; returns
    flat counts for metrics/<profile>/data.json."""
    b, data_dir = cfg.benchmarks, Path(data_dir)
    final_dir = Path(final_dir or data_dir)
    for name, s in sets.items():
        s["fid_reference"] = str(final_dir / "bench" / f"{name if name != 'coco_proxy' else 'coco_search'}.npy") \
            if s["benchmark"] in FID_BENCHMARKS else None
        write_json(data_dir / "prompts" / f"{name}.json", s)
    kw = dict(resolution=b.fid_resolution, samples=b.reference_samples, on_corrupt=cfg.data.on_corrupt,
              progress=progress and not src.standin)
    bench = data_dir / "bench"
    # the merge search scores against the proxy prompts' own images, and the evaluation's reference leaves
    # them out: the search is never tuned on the images it is evaluated against (docs/paper.md §1.8)
    proxy = set(sets["coco_proxy"]["file_names"])
    coco_kw = dict(transform="resize", label=src.labels["coco_images"], seed=derive_seed(cfg.seed, "bench", "coco"))
    refs = {"coco": folder_reference(src.paths["coco_images"], bench / "coco.npy", exclude=proxy, **coco_kw, **kw),
            "coco_search": folder_reference(src.paths["coco_images"], bench / "coco_search.npy", only=proxy,
                                            **coco_kw, **{**kw, "samples": 0})}
    ref_kw = dict(label=src.labels["imagenet_images"], seed=derive_seed(cfg.seed, "bench", "imagenet"), **kw)
    refs["imagenet"] = (array_reference(src.paths["imagenet_images"], bench / "imagenet.npy", **ref_kw)
                        if src.standin else
                        folder_reference(src.paths["imagenet_images"], bench / "imagenet.npy",
                                         transform="center_crop", **ref_kw))
    write_json(bench / "manifest.json", {"standin": src.standin, "references": refs,
                                         "prompt_sets": {k: {"count": s["count"], "source": s["source"],
                                                             "sha256": s["sha256"]} for k, s in sets.items()}})
    counts = {f"prompts_{k}": s["count"] for k, s in sets.items()}
    counts["prompts_skipped_coco"] = len(sets["coco"]["skipped"])
    for k, r in refs.items():
        counts[f"bench_{k}"] = r["count"]
        counts[f"bench_skipped_{k}"] = len(r["skipped"])
    return counts
