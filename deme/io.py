"""Small I/O helpers: atomic outputs, JSON, derived seeds, repository facts.

Every stage writes to a temporary sibling path and renames at the end, so a killed stage never leaves a
half-written output that DVC or the next stage could take for a good one; the next write of the same path
deletes the temporary siblings a killed writer left.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary siblings a killed writer of ``path`` left behind (``.<name>.*.tmp``)."""
    if path.parent.exists():
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; an output follows the umask like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_npy(path: str | Path, array) -> None:
    """One numpy array as .npy (no pickles), written atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_npz(path: str | Path, **arrays) -> None:
    """Named numpy arrays as .npz (no pickles), written atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (run the stage that makes it: dvc repro)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: corrupt JSON (not UTF-8 text)") from None
    except OSError as e:  # a folder in its place, no permission
        raise ValueError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def derive_seed(base: int, *purpose: Any) -> int:
    """A seed named by purpose ('train', 'search', 'eval', ...): stable across runs and machines."""
    digest = hashlib.sha256(repr((int(base),) + tuple(purpose)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# Per-image sampling seeds live in disjoint ranges by purpose, so the merge search and the final
# evaluation never share initial noise (docs/paper.md §1.8, selection-bias caveat).
SEED_SPACES = {"eval": 0, "search": 1, "grid": 2, "analysis": 3, "buffer": 4, "curve": 5}
SEED_SPACE_SIZE = 10_000_000  # samples per (base seed, purpose)


def sample_seeds(purpose: str, n: int, base: int = 0) -> range:
    """Per-image seeds; the ranges of different (base, purpose) pairs never overlap."""
    if purpose not in SEED_SPACES:
        raise KeyError(f"unknown seed purpose {purpose!r}; known: {', '.join(SEED_SPACES)}")
    if n > SEED_SPACE_SIZE:
        raise ValueError(f"{n} samples exceed the seed space of one purpose ({SEED_SPACE_SIZE})")
    start = (int(base) * len(SEED_SPACES) + SEED_SPACES[purpose]) * SEED_SPACE_SIZE
    return range(start, start + n)


def repo_root() -> Path:
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env)
    here = Path.cwd()
    for p in (here, *here.parents):
        if (p / "dvc.yaml").exists() or (p / ".git").exists():
            return p
    return here


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or repo_root(), capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
