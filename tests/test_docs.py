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
