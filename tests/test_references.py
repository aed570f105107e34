"""Every reference in the code and the docs points inside the repository: no file cites the
founding notes that never were part of it, and every ``docs/*.md`` a file names exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Spelled in parts so that this file does not cite them itself.
OUTSIDE_NOTES = re.compile(r"\b(?:" + "|".join(("DESIGN", "STYLE", "REFERENCE")) + r")\.md\b")
DOC_PATH = re.compile(r"\bdocs/[\w-]+\.md\b")


def repo_texts() -> dict[str, str]:
    """Path -> text of every file git tracks or would track (untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    texts = {}
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images and other binary files
    return texts


def test_the_scan_reads_the_code_and_the_docs() -> None:
    texts = repo_texts()
    assert {"README.md", "docs/health.md", "docs/reference.md", "agent/ruff.toml"} <= texts.keys()
    assert OUTSIDE_NOTES.search("see " + "STYLE" + ".md rule 1")


def test_no_file_cites_notes_outside_the_repository() -> None:
    cited = [
        f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
        for name, text in repo_texts().items()
        for m in OUTSIDE_NOTES.finditer(text)
    ]
    assert cited == [], "cite a file in the repository instead (docs/reference.md):\n" + "\n".join(cited)


def test_every_cited_doc_exists() -> None:
    missing = sorted(
        f"{name}: {m.group()}"
        for name, text in repo_texts().items()
        for m in DOC_PATH.finditer(text)
        if not (ROOT / m.group()).is_file()
    )
    assert missing == []
