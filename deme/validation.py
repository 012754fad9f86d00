"""The first stage of every pipeline: the whole parameters file checked before DVC touches any output.

DVC removes a stage's outputs just before it runs the stage's command, so a bad value that only the stage
itself rejects would cost the outputs of the previous good run. Every stage of dvc.yaml (and of
sweeps/dvc.yaml, checkpoints/dvc.yaml) therefore depends on :data:`MARKER`, the output of the `validate`
stage, which depends on all of params.yaml: a changed params file runs `validate` first, and a bad value
stops `dvc repro` there with one line naming the key, before any other stage runs. The marker's content
never changes, so a valid change reruns only the stages that read the changed keys.

Under ``dvc exp run -S`` (DVC sets ``DVC_EXP_BASELINE_REV``) the rejected keys are also put back to their
values in the experiment's baseline commit, every other line kept (uncommitted edits of other keys stay),
and the rejected version is kept in ``.dvc/tmp/params.rejected.yaml``: a failed experiment leaves the
workspace as it was.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from deme.codedeps import MARKER
from deme.config import ConfigError, config_from_mapping, read_params
MARKER_TEXT = "params.yaml passed validation (deme/validation.py); this file never changes\n"
REJECTED = Path(".dvc/tmp/params.rejected.yaml")


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_machine(cfg) -> None:
    """Values that size memory, against this machine: the generated data set lives in memory while made."""
    d, key = cfg.data, "data.num_train" if cfg.task == "image" else "t2i.data.num_train"
    if d.kind == "shapes":
        need = (d.num_train + d.num_ref) * d.resolution ** 2 * 3
        if need > memory_bytes() // 2:
            raise ConfigError(key, f"{d.num_train} + {d.num_ref} generated images of {d.resolution}x{d.resolution} "
                                   f"need {need / 2**30:.1f} GiB of memory; this machine has "
                                   f"{memory_bytes() / 2**30:.1f} GiB (at most half of it may go to the data)")


def check(path: str | Path = "params.yaml") -> None:
    """Validate both pipelines' sections of ``path`` exactly as the stages load them, and what sizes memory
    against this machine; ConfigError if not."""
    raw = read_params(path)
    check_machine(config_from_mapping(raw))
    if "t2i" in raw:
        check_machine(config_from_mapping(raw, "t2i"))


def _set(doc, keys: list[str], base) -> bool:
    """Set ``doc[keys]`` to the baseline's value (``base`` the baseline mapping), or drop it (and the
    sections left empty that the baseline lacks); False if neither file has the key."""
    chain = [(doc, base)]
    for k in keys[:-1]:
        node, b = chain[-1]
        if not isinstance(node, dict) or k not in node:
            return False
        chain.append((node[k], b.get(k, _MISSING) if isinstance(b, dict) else _MISSING))
    node, b = chain[-1]
    if not isinstance(node, dict):
        return False
    if isinstance(b, dict) and keys[-1] in b:
        node[keys[-1]] = b[keys[-1]]
        return True
    if node.pop(keys[-1], _MISSING) is _MISSING:
        return False
    for i in range(len(chain) - 1, 0, -1):  # sections that -S created and that are now empty
        if chain[i][0] == {} and chain[i][1] is _MISSING:
            del chain[i - 1][0][keys[i - 1]]
    return True


_MISSING = object()


def put_back(path: str | Path = "params.yaml") -> str:
    """Under `dvc exp run`: put each rejected key back to its value in the experiment's baseline commit
    (what `-S` changed), keeping every other line of ``path`` as it is; what was done, or ""."""
    import io

    import yaml
    from ruamel.yaml import YAML

    rev, path = os.environ.get("DVC_EXP_BASELINE_REV"), Path(path)
    if not rev:
        return ""
    try:
        base_text = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, check=True,
                                   timeout=30).stdout.decode()
        base = yaml.safe_load(base_text) or {}
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    REJECTED.parent.mkdir(parents=True, exist_ok=True)
    REJECTED.write_bytes(path.read_bytes())
    rt = YAML()  # round trip, as `dvc exp run -S` writes the file
    rt.default_flow_style = False
    done: list[str] = []
    for _ in range(50):
        try:
            check(path)
            if yaml.safe_load(path.read_text()) == base:  # -S was the only change: the committed bytes
                path.write_text(base_text)
            return (f" ({', '.join(done)} put back to the experiment's baseline in {path}; the rejected file is "
                    f"{REJECTED})")
        except ConfigError as e:
            doc = rt.load(path.read_text())
            if not e.key or e.key in done or not _set(doc, e.key.split("."), base):
                break
            buf = io.StringIO()
            rt.dump(doc, buf)
            path.write_text(buf.getvalue())
            done.append(e.key)
    path.write_text(base_text)  # not a key-level change: the whole file goes back
    return f" ({path} is back at the experiment's baseline; the rejected file is {REJECTED})"


def main(path: str = "params.yaml", marker: str = MARKER) -> int:
    import sys

    try:
        check(path)
    except ConfigError as e:
        where = "" if str(e).startswith(f"{Path(path)}:") else f"{path}: "
        print(f"error: {where}{e}{put_back(path)}", file=sys.stderr)
        return 2
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    if not Path(marker).exists() or Path(marker).read_text() != MARKER_TEXT:
        Path(marker).write_text(MARKER_TEXT)
    print(f"{path}: valid (image profile and text-to-image section)")
    return 0
