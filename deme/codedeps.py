"""The code a stage runs, by construction: the static import closure of its command.

Every DVC stage lists as code deps exactly the files of this repository that its command can import:
the stage script, plus every ``deme`` module reached by ``import`` statements anywhere in those files
(function-level imports included, package ``__init__`` files included). ``dvc.yaml`` files are kept in
step by

    python -m deme.codedeps            # check: one line per stage whose code deps differ; exit 1 if any
    python -m deme.codedeps --write    # rewrite the code deps of every stage in place

and tests/test_codedeps.py fails when they differ, so an edit to any module reruns every stage that
imports it and no other. The same closure, hashed, goes into every resume fingerprint (deme/resume.py).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "deme"
DVC_FILES = ("dvc.yaml", "sweeps/dvc.yaml", "checkpoints/dvc.yaml")
_CODE = re.compile(r"^(stages|deme)/")
MARKER = "metrics/params.ok"  # the `validate` stage's output (deme/validation.py)


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def _imports(path: Path, root: Path) -> set[str]:
    """Every module of the package named by an import in ``path`` (and every package above it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root).with_suffix("")
    here = list(rel.parts[:-1])  # the importing file's package
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing file's package
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import submodule`
        for name in names:
            parts = name.split(".")
            if parts[0] != PACKAGE:
                continue
            for i in range(1, len(parts) + 1):
                if _module_file(".".join(parts[:i]), root):
                    found.add(".".join(parts[:i]))
    return found


@lru_cache(maxsize=None)
def _closure_of(entry: str, root: Path) -> frozenset[Path]:
    todo, seen = [root / entry], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += [m for m in (_module_file(n, root) for n in _imports(f, root)) if m and m not in seen]
    return frozenset(seen)


def entries(cmd: str) -> list[str]:
    """The repository files a stage command runs: ``stages/x.py`` and ``-m deme.y`` modules."""
    found = re.findall(r"(?<!\S)(stages/[\w/]+\.py)", cmd)
    for mod in re.findall(r"-m\s+(deme(?:\.\w+)*)", cmd):
        found.insert(0, str(_module_file(mod, ROOT).relative_to(ROOT)))
    return found


def closure(cmd: str, root: Path = ROOT) -> list[str]:
    """Sorted repository-relative paths of every file the command can import."""
    files: set[Path] = set()
    for e in entries(cmd):
        files |= _closure_of(e, root)
    return sorted(str(f.relative_to(root)) for f in files)


def code_deps(cmd: str, root: Path = ROOT) -> list[str]:
    """:func:`closure` as dvc.yaml lists it: a subpackage all of whose files are in it is named by its folder."""
    files = set(closure(cmd, root))
    deps = set(files)
    for pkg in sorted(root.glob(f"{PACKAGE}/**/__init__.py"), key=lambda p: len(p.parts)):
        d = pkg.parent
        if d == root / PACKAGE:
            continue
        inside = {str(f.relative_to(root)) for f in d.rglob("*.py")}
        if inside <= files:
            rel = str(d.relative_to(root))
            if not any(rel.startswith(x + "/") for x in deps if not x.endswith(".py")):
                deps = (deps - inside) | {rel}
    return sorted(deps)


def digest(cmd: str, root: Path = ROOT) -> str:
    """sha256 over the command's code closure (paths and contents): the code part of a resume fingerprint."""
    h = hashlib.sha256()
    for rel in closure(cmd, root):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def running() -> str:
    """:func:`digest` of the running stage script (``sys.argv[0]`` under stages/), or "" outside a stage."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or script.parent != ROOT / "stages" or script.suffix != ".py":
        return ""
    return digest(f"python stages/{script.name}")


# --- keeping dvc.yaml in step ------------------------------------------------------------------------

def _stages(text: str) -> dict[str, str]:
    """stage name -> cmd, from a dvc.yaml's text (foreach stages by their template)."""
    import yaml

    out = {}
    for name, body in (yaml.safe_load(text).get("stages") or {}).items():
        out[name] = (body.get("do") or body)["cmd"]
    return out


def sync(dvc_file: str | Path, write: bool = False, root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Compare (and with ``write`` replace) each stage's code deps with its closure.

    Returns ``{stage: (missing, extra)}`` for the stages that differ. Code deps are the deps under
    ``stages/`` or ``deme/``; every stage but `validate` also depends on the validation marker
    (deme/validation.py); every other dep (data, models, statistics) is left as written. Paths are
    relative to the repository root, as every stage of these files runs there (``wdir: ..``).
    """
    path = root / dvc_file
    text = path.read_text()
    cmds = _stages(text)
    lines, out, diffs = text.splitlines(keepends=True), [], {}
    stage, i = None, 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  (\w+):\s*(#.*)?$", line)
        if m and m.group(1) in cmds:
            stage = m.group(1)
        dm = re.match(r"^(\s+)deps:\s*$", line)
        if not (dm and stage):
            out.append(line)
            i += 1
            continue
        out.append(line)
        item = dm.group(1) + "  - "
        i += 1
        listed, kept = [], []
        while i < len(lines) and lines[i].startswith(item):
            dep = lines[i][len(item):].split("#")[0].strip()
            (listed if _CODE.match(dep) else kept).append(dep if _CODE.match(dep) else lines[i])
            i += 1
        want = code_deps(cmds[stage], root)
        if stage != "validate" and MARKER not in [k.strip()[2:].split("#")[0].strip() for k in kept]:
            want, kept = want + [MARKER], kept  # every stage waits for the whole params file's check
        missing = sorted(set(want) - set(listed))
        extra = sorted(set(listed) - set(want))
        want = [w for w in want if w != MARKER] + ([MARKER] if MARKER in want else [])
        if missing or extra:
            diffs[stage] = (missing, extra)
        out += [f"{item}{d}\n" for d in want] + kept
    if write and diffs:
        path.write_text("".join(out))
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deme.codedeps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite the code deps in place")
    args = ap.parse_args(argv)
    bad = 0
    for f in DVC_FILES:
        for stage, (missing, extra) in sync(f, write=args.write).items():
            bad += 1
            what = ", ".join([f"+{m}" for m in missing] + [f"-{e}" for e in extra])
            print(f"{f}: {stage}: {'rewrote' if args.write else 'code deps differ from its import closure'}: {what}")
    if bad and not args.write:
        print("run `python -m deme.codedeps --write` to bring them in step", file=sys.stderr)
    return 1 if bad and not args.write else 0


if __name__ == "__main__":
    raise SystemExit(main())
