"""docs/configuration.md documents every key of every configuration section."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shared.config import AGENT_SCHEMA

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _schemas() -> list[tuple[str, type]]:
    out = list(AGENT_SCHEMA.items())
    try:
        from collector.config import COLLECTOR_SCHEMA
    except ImportError:
        return out
    return out + [(s, c) for s, c in COLLECTOR_SCHEMA.items() if s not in AGENT_SCHEMA]


@pytest.mark.parametrize(("section", "cls"), _schemas(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_key_documented(section: str, cls: type) -> None:
    text = DOC.read_text()
    assert f"### `[{section}]`" in text, f"section [{section}] missing"
    body = text.split(f"### `[{section}]`", 1)[1].split("\n### ", 1)[0]
    for field in dataclasses.fields(cls):
        assert f"| `{field.name}` |" in body, f"{section}.{field.name} not documented"
