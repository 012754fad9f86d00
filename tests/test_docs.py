"""The repository stands on its own: code and docs cite the paper or docs/paper.md, and every section of
docs/paper.md that is cited exists."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    files = [REPO / f for f in out] if out else [p for p in REPO.rglob("*") if ".venv" not in p.parts]
    return [f for f in files if f.is_file() and f.suffix in (".py", ".md", ".yaml", ".toml", ".sh", ".cfg")]


def test_no_file_cites_a_note_outside_the_repository():
    outside = re.compile(r"PAPER\.md|\.\./shared/|(?<![\w/.-])shared/")
    bad = [f"{f.relative_to(REPO)}:{i}" for f in _tracked() if f.name != "test_docs.py"
           for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not bad, bad[:20]


def test_every_cited_section_of_the_paper_notes_exists():
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\b", (REPO / "docs" / "paper.md").read_text(), re.M))
    cited = {(f.relative_to(REPO), m) for f in _tracked()
             for m in re.findall(r"paper\.md\)? ?§ ?(\d+(?:\.\d+)?)", f.read_text(errors="replace"))}
    missing = sorted((str(f), s) for f, s in cited if s not in headings)
    assert cited and not missing, missing[:20]


def _list_len(test_file: str, name: str) -> int:
    import ast

    tree = ast.parse((REPO / "tests" / test_file).read_text())
    node = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == name for t in n.targets))
    if isinstance(node, ast.List):
        return len(node.elts)
    import importlib.util  # built by code (helper calls): count by importing the module
    spec = importlib.util.spec_from_file_location(f"_count_{name}", REPO / "tests" / test_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return len(getattr(mod, name))


def test_reliability_counts_are_the_tests_own():
    """docs/reliability.md's table of inputs tried states the counts of the tests' case lists."""
    text = (REPO / "docs" / "reliability.md").read_text()
    fuzz = _list_len("test_params_fuzz.py", "MAPPING_CASES") + _list_len("test_params_fuzz.py", "FILE_CASES")
    for count, words in [(fuzz, "malformed params mappings and files"),
                         (_list_len("test_params_fuzz.py", "CLI_CASES"), "bad params given to the stage CLIs"),
                         (_list_len("test_params_fuzz.py", "MEMORY_CASES"), "values that size memory beyond the machine"),
                         (_list_len("test_pipeline.py", "BAD_SET_PARAMS"), "bad `dvc exp run -S` values")]:
        assert f"| {count} {words}" in text, (count, words)
