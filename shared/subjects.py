"""NATS subject names (v1) and token sanitisation.

| subject                                    | what                                  |
|--------------------------------------------|---------------------------------------|
| ``gpuwarden.v1.sample.<provider>.<host>``    | periodic sample                       |
| ``gpuwarden.v1.event.<provider>.<host>``     | immediate events (XID, GPU lost, ...) |
| ``gpuwarden.v1.inventory.<provider>.<host>`` | inventory at start and on change      |
| ``gpuwarden.v1.alert.<provider>.<host>``     | alert transitions (collector)         |
| ``gpuwarden.v1.poll.<host>``                 | request/reply: a fresh sample         |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import SubjectError

PREFIX = "gpuwarden.v1"
STREAM = "GPUWARDEN"
STREAM_SUBJECTS = (
    f"{PREFIX}.sample.>",
    f"{PREFIX}.event.>",
    f"{PREFIX}.inventory.>",
)
KINDS = ("sample", "event", "inventory", "alert")

_BAD = re.compile(r"[.*>\s\x00-\x1f\x7f]+")
MAX_TOKEN = 128


def sanitize_token(value: str) -> str:
    """Return ``value`` made safe as one subject token.

    Dots, wildcards (``*``, ``>``), whitespace and control characters become ``_``;
    the result is at most 128 characters. Raises :class:`SubjectError` when nothing is left.
    """
    token = _BAD.sub("_", value.strip())[:MAX_TOKEN]
    if not token or token.strip("_") == "":
        raise SubjectError(f"{value!r} is not usable as a subject token")
    return token


def sample_subject(provider: str, host: str) -> str:
    return f"{PREFIX}.sample.{sanitize_token(provider)}.{sanitize_token(host)}"


def event_subject(provider: str, host: str) -> str:
    return f"{PREFIX}.event.{sanitize_token(provider)}.{sanitize_token(host)}"


def inventory_subject(provider: str, host: str) -> str:
    return f"{PREFIX}.inventory.{sanitize_token(provider)}.{sanitize_token(host)}"


def alert_subject(provider: str, host: str) -> str:
    return f"{PREFIX}.alert.{sanitize_token(provider)}.{sanitize_token(host)}"


def poll_subject(host: str) -> str:
    return f"{PREFIX}.poll.{sanitize_token(host)}"


def subject_for(kind: str, provider: str, host: str) -> str:
    """Subject of a frame of ``kind`` (``sample``, ``event``, ``inventory``, ``alert``)."""
    if kind not in KINDS:
        raise SubjectError(f"unknown subject kind {kind!r}")
    return f"{PREFIX}.{kind}.{sanitize_token(provider)}.{sanitize_token(host)}"


@dataclass(frozen=True, slots=True)
class ParsedSubject:
    kind: str
    provider: str
    host: str


def parse_subject(subject: str) -> ParsedSubject:
    """Split ``gpuwarden.v1.<kind>.<provider>.<host>``; raises :class:`SubjectError` otherwise."""
    parts = subject.split(".")
    if len(parts) != 5 or f"{parts[0]}.{parts[1]}" != PREFIX or parts[2] not in KINDS:
        raise SubjectError(f"not a gpuwarden v1 subject: {subject!r}")
    if not parts[3] or not parts[4]:
        raise SubjectError(f"empty token in subject {subject!r}")
    return ParsedSubject(kind=parts[2], provider=parts[3], host=parts[4])


def strip_bucket(subject: str) -> str:
    """A frame's subject as published, from the subject the stream stored it under: a
    collector group's stream appends the host's bucket (``gpuwarden.v1.<kind>.<provider>.
    <host>.<bucket>``, docs/operations.md); core-NATS subscribers never see that form."""
    head, dot, last = subject.rpartition(".")
    if dot and last.isdigit() and head.count(".") == 4:
        return head
    return subject


def inbox_prefix(host: str) -> str:
    """The agent's inbox prefix ``_INBOX_<host token>``: its request replies (JetStream acks and
    API answers) arrive under it, the only inboxes the NATS role lets that agent subscribe to
    (the collector's are under ``_INBOX.``)."""
    return f"_INBOX_{sanitize_token(host)}"
