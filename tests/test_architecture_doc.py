"""docs/architecture.md points at files that exist, and each "where does X live?" answer is
one file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def test_every_path_the_map_names_exists() -> None:
    paths = set(re.findall(r"`((?:agent|collector|shared|gpuwarden|tests|docs)/[\w/.]+)`", DOC))
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert missing == []


def test_ten_questions_each_answered_by_one_file() -> None:
    section = DOC.split("## Where does X live?", 1)[1]
    answers = re.findall(r"^\d+\. (.+\?) (.+)$", section, re.M)
    assert len(answers) == 10
    for question, answer in answers:
        files = re.findall(r"`([\w/.]+\.py)`", answer)
        assert len(files) == 1, question
        assert answer.strip() == f"`{files[0]}`", question
        assert (ROOT / files[0]).is_file(), question
