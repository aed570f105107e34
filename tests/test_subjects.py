from __future__ import annotations

import pytest

from shared import subjects
from shared.errors import SubjectError


@pytest.mark.parametrize(
    ("raw", "token"),
    [
        ("gpu-node-17", "gpu-node-17"),
        ("node.example.com", "node_example_com"),
        ("a*b>c", "a_b_c"),
        ("  acme east\t", "acme_east"),
        ("x" * 300, "x" * 128),
        ("ümlaut-ok", "ümlaut-ok"),
    ],
)
def test_sanitize_token(raw: str, token: str) -> None:
    assert subjects.sanitize_token(raw) == token


@pytest.mark.parametrize("raw", ["", "   ", ".", "*.>", "\x00"])
def test_sanitize_rejects_empty(raw: str) -> None:
    with pytest.raises(SubjectError):
        subjects.sanitize_token(raw)


def test_subject_helpers() -> None:
    assert subjects.sample_subject("acme-east", "n1") == "gpuwarden.v1.sample.acme-east.n1"
    assert subjects.event_subject("acme", "n.1") == "gpuwarden.v1.event.acme.n_1"
    assert subjects.inventory_subject("a", "b") == "gpuwarden.v1.inventory.a.b"
    assert subjects.alert_subject("a", "b") == "gpuwarden.v1.alert.a.b"
    assert subjects.poll_subject("n1") == "gpuwarden.v1.poll.n1"
    assert subjects.subject_for("event", "a", "b") == subjects.event_subject("a", "b")
    with pytest.raises(SubjectError):
        subjects.subject_for("poll", "a", "b")


def test_parse_round_trip() -> None:
    parsed = subjects.parse_subject(subjects.sample_subject("acme", "n1"))
    assert (parsed.kind, parsed.provider, parsed.host) == ("sample", "acme", "n1")


@pytest.mark.parametrize(
    "bad",
    [
        "gpuwarden.v1.sample.acme",
        "gpuwarden.v2.sample.a.b",
        "gpuwarden.v1.bogus.a.b",
        "x.y.z",
        "gpuwarden.v1.sample..b",
    ],
)
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(SubjectError):
        subjects.parse_subject(bad)


def test_stream_subjects_cover_agent_kinds() -> None:
    for kind in ("sample", "event", "inventory"):
        assert f"gpuwarden.v1.{kind}.>" in subjects.STREAM_SUBJECTS


def test_inbox_prefix_is_the_hosts_token() -> None:
    assert subjects.inbox_prefix("gpu-c.example.net") == "_INBOX_gpu-c_example_net"
    assert subjects.inbox_prefix("a") != subjects.inbox_prefix("ab")
