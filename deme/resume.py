"""Resume state of the long stages that are not training loops: finished pieces ("shards") kept in .ckpt/.

Training resumes from its checkpoints (deme/train.py) and the merge search from its score log; everything
else that takes long does its work in independent pieces (a batch of samples and its features, a batch of
buffer images, a grid point of a loss plane, a group of gradient sketches). Each finished piece is saved as
an npz under ``.ckpt/<profile>/<label>/<fingerprint>/<key>.npz`` (atomic rename, no pickles), so a stage
killed at any point recomputes only the pieces it had not finished, and the rerun's result is the
uninterrupted run's, bit for bit, since every piece is computed from its own seeds alone.

The fingerprint holds everything the pieces depend on (model weights digest, seeds, sampler and feature
settings), the digest of the stage's code (deme/codedeps.py) and the thread count; pieces of another
fingerprint are deleted, so a changed setting starts afresh, and the stage says why (:func:`why_stale`). The
stage clears the folder once its outputs are written.

Two environment variables serve fault tests and monitoring (scripts/fault_harness.py):
``DEME_RESUME_LOG`` (a file: one line per saved piece or checkpoint) and ``DEME_RESUME_THROTTLE_S`` (sleep
that long after each save, so a short stage can be killed at a random moment).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from deme.io import atomic_write_bytes, atomic_write_text


def saved(what: str | Path) -> None:
    """Record that a piece of resume state was written (log line and optional throttle, see module doc)."""
    log = os.environ.get("DEME_RESUME_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{time.time():.3f} {os.getpid()} {what}\n")
    throttle = float(os.environ.get("DEME_RESUME_THROTTLE_S") or 0)
    if throttle > 0:
        time.sleep(throttle)


def state_digest(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 of a model's state (names, dtypes, shapes and bytes): identifies the weights a piece used."""
    state = module.state_dict() if isinstance(module, nn.Module) else module
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_id(path: str | Path) -> list:
    """Name, size and modification time of a file, or of every file in a folder: a cheap identity of a
    dataset file for a fingerprint (hashing a 20 GB LSUN memmap on every resume would not be)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()]


def content_id(path: str | Path, limit: int = 1 << 30) -> list | str:
    """sha256 of a file or folder up to ``limit`` bytes in all (a DVC checkout that rewrites a file changes its
    modification time, not its bytes); ``file_id`` above that."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.exists()]
    if sum(p.stat().st_size for p in files) > limit:
        return file_id(path)
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def array_id(images) -> list | str:
    """Identity of a dataset array for a fingerprint: content_id of the file a memmap reads (load_images),
    else the sha256 of the array's bytes."""
    filename = getattr(images, "filename", None)
    if filename:
        return content_id(filename)
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def stats_id(refs: Mapping | None) -> str | None:
    """sha256 of FID reference statistics ({mode: Stats}): what a proxy FID was scored against."""
    if refs is None:
        return None
    h = hashlib.sha256()
    for mode in sorted(refs):
        st = refs[mode]
        h.update(f"{mode}:{st.count}".encode())
        for a in (st.mu, st.sigma):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
    return h.hexdigest()


def run_context() -> dict[str, Any]:
    """What every resume record also depends on: the running stage's code closure (deme/codedeps.py), the
    torch thread count and the CPU kernels (on CPU the floats depend on both; deme/numerics.py)."""
    from deme.codedeps import running
    from deme.numerics import cpu_kernels

    return {"code": running(), "threads": torch.get_num_threads(), "kernels": cpu_kernels()}


def why_stale(old: Any, new: Mapping) -> str:
    """Why a resume record ``old`` (as read back from JSON) cannot be continued by a run whose record is ``new``
    (both ``{"inputs": ..., "code": ..., "threads": ...}``), or "" if it can. The stage prints it."""
    new = json.loads(json.dumps(new, sort_keys=True, default=str))
    if not isinstance(old, dict) or old.get("inputs") != new.get("inputs"):
        return "other settings or inputs"
    if old.get("code") != new.get("code"):
        return "other code (a module the stage imports changed)"
    if old.get("threads") != new.get("threads"):
        return f"{old.get('threads')} CPU threads, not {new.get('threads')} (runtime.num_threads)"
    if old.get("kernels") != new.get("kernels"):
        return f"CPU kernels {old.get('kernels')}, not {new.get('kernels')} (runtime.cpu_kernels)"
    return ""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fingerprint_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Shards:
    """Finished pieces of one computation, keyed by strings; see the module docstring.

    ``main``: this process may delete stale folders (under ``accelerate launch`` every process saves its own
    pieces into the same folder; only rank 0 cleans up). ``memo``: keep what was read or written in memory
    for the next :meth:`get` (off for pieces too large to hold all at once, e.g. latents)."""

    def __init__(self, folder: str | Path, fingerprint: Any, *, main: bool = True, memo: bool = True):
        self.root = Path(folder)
        fingerprint = {"inputs": fingerprint, **run_context()}
        digest = fingerprint_of(fingerprint)
        self.dir = self.root / digest
        if main and self.root.exists():
            for stale in self.root.iterdir():
                if stale.name != digest:
                    if stale.is_dir() and any(stale.glob("*.npz")):
                        why = why_stale(_read_json(stale / "fingerprint.json"), fingerprint)
                        print(f"[resume] {stale}: pieces made with {why}; starting over", flush=True)
                    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if main and not (self.dir / "fingerprint.json").exists():
            atomic_write_text(self.dir / "fingerprint.json", json.dumps(fingerprint, sort_keys=True, default=str))
        self.reused = 0
        self.items = {"fresh": 0, "reused": 0}  # work items (e.g. images) computed now / read back
        self._memo: dict[str, dict[str, np.ndarray]] | None = {} if memo else None

    def _file(self, key: str) -> Path:
        return self.dir / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays saved under ``key``, or None if there are none (a corrupt file is deleted: recompute)."""
        if self._memo is not None and key in self._memo:
            return self._memo[key]
        path = self._file(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # only our own atomic writes land here, but a disk can still fail
            print(f"[resume] {path}: unreadable piece ({type(e).__name__}); recomputing it", file=sys.stderr)
            path.unlink(missing_ok=True)
            return None
        self.reused += 1
        if self._memo is not None:
            self._memo[key] = arrays
        return arrays

    def has(self, key: str) -> bool:
        """Whether a readable piece is saved under ``key`` (read once and kept for :meth:`get`)."""
        return self.get(key) is not None

    def put(self, key: str, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in arrays.items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self._file(key), buf.getvalue())
        if self._memo is not None:
            self._memo[key] = arrays
        saved(self._file(key))

    def note(self, total: int, what: str = "pieces") -> None:
        """Say how many pieces came from an earlier run (stdout: the stage log and the fault tests read it)."""
        if self.reused:
            print(f"[resume] {self.reused} of {total} {what} reused from {self.dir}", flush=True)

    def count(self, n: int, fresh: bool) -> None:
        self.items["fresh" if fresh else "reused"] += n

    def fresh_fraction(self) -> float:
        """The share of this process's items computed in this run (1.0 when nothing was resumed): a rate
        measured over a resumed run counts only those."""
        total = self.items["fresh"] + self.items["reused"]
        return self.items["fresh"] / total if total else 1.0

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def batch_key(lo: int, hi: int) -> str:
    return f"{lo:09d}-{hi:09d}"


class ScoreLog:
    """Scored merge candidates appended to a JSON-lines file whose first line is a key of everything the
    scores depend on, so a killed search resumes without rescoring and a changed setting starts afresh."""

    def __init__(self, path: str | Path, key: str):
        self.path = Path(path)
        self.record = {"inputs": key, **run_context()}
        self.key = json.dumps(self.record, sort_keys=True)

    def _rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        if not lines or lines[0] != self.key:
            return []
        rows = []
        for line in lines[1:]:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the rows around it are good
                continue
        return rows

    def load(self) -> dict[tuple[float, ...], float]:
        return {tuple(row["w"]): row["fid"] for row in self._rows()}

    def start(self) -> None:
        """Begin the log afresh, or rewrite it without a line a kill cut short (appends stay line-aligned)."""
        rows = self._rows()
        if not rows and self.path.exists() and self.path.read_text().count("\n") > 1:
            first = self.path.read_text().split("\n", 1)[0]
            try:
                why = why_stale(json.loads(first), self.record)
            except ValueError:
                why = "other settings or inputs"
            print(f"[resume] {self.path}: scores made with {why}; starting over", flush=True)
        atomic_write_text(self.path, "".join([self.key + "\n"] + [json.dumps(r) + "\n" for r in rows]))

    def append(self, w, fid: float) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"w": list(w), "fid": fid}) + "\n")
        saved(f"{self.path} w={list(w)}")
