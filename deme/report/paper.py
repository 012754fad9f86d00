"""The paper's numbers (one data file, ``paper_numbers.yaml``), always labelled as the paper's."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml


@lru_cache(maxsize=1)
def paper_numbers() -> dict:
    return yaml.safe_load((Path(__file__).with_name("paper_numbers.yaml")).read_text())


def paper_table(name: str) -> dict:
    return paper_numbers()["tables"][name]
