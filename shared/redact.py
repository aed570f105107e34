"""Credentials out of text that may be logged: ``scheme://user:password@host`` → ``scheme://***@host``.

NATS server URLs (``nats://user:pass@host:4222``), PostgreSQL DSNs
(``postgresql://user:pass@host/db``) and inventory or webhook URLs may carry credentials;
every log line and error message that shows one of them, or an exception text that may
contain one, goes through :func:`redact`. Key/value DSNs (``password=...``) are covered too.
"""

from __future__ import annotations

import re
from typing import Final

USERINFO: Final = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s?#]*@")
KV_PASSWORD: Final = re.compile(r"(?i)\b(password|passwd|pwd|sslpassword)\s*=\s*('[^']*'|\S+)")


def redact(text: str) -> str:
    """``text`` with the user information of every URL in it, and every ``password=`` value,
    replaced by ``***``."""
    return KV_PASSWORD.sub(r"\1=***", USERINFO.sub(r"\1***@", text))


def redact_url(url: str) -> str:
    """One URL without its credentials (for ``nats://u:p@h:4222`` → ``nats://***@h:4222``)."""
    return redact(url)
