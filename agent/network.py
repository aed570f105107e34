"""Agent-side network checks: TCP connect latency to configured targets, NATS round trip.

Each check gives a :class:`~shared.frames.CheckResult` with a stable id (``tcp:<target>``,
``nats_rtt``), ``ok``, the latency in milliseconds when it worked and a short error text
when it did not (``timeout``, ``connection refused``, ``name not resolved``, ``bad target``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import time
from collections.abc import Sequence
from typing import Final

from shared.frames import CheckResult

_TARGET: Final = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>\d{1,5})$")
_MAX_ERROR: Final = 200


def parse_target(target: str) -> tuple[str, int] | None:
    """``(host, port)`` from ``host:port`` or ``[v6]:port``; ``None`` when malformed."""
    m = _TARGET.match(target)
    if m is None:
        return None
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        return None
    return (m.group("v6") or m.group("host")), port


def _error_text(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, socket.gaierror):
        return "name not resolved"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno == errno.ETIMEDOUT:
            return "timeout"
        return os.strerror(e.errno).lower()[:_MAX_ERROR]
    return (str(e) or type(e).__name__)[:_MAX_ERROR]


async def tcp_check(target: str, timeout_s: float) -> CheckResult:
    """Connect to ``target`` (``host:port`` or ``[v6]:port``) and close; never raises.

    The latency covers name resolution and the TCP handshake. ``timeout_s`` bounds both.
    """
    check_id = f"tcp:{target}"
    parsed = parse_target(target)
    if parsed is None:
        return CheckResult(id=check_id, kind="tcp", target=target, ok=False, error="bad target")
    host, port = parsed
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(asyncio.Protocol, host, port)
    except (OSError, TimeoutError) as e:
        return CheckResult(id=check_id, kind="tcp", target=target, ok=False, error=_error_text(e))
    latency_ms = (time.perf_counter() - start) * 1000.0
    transport.close()
    return CheckResult(id=check_id, kind="tcp", target=target, ok=True, latency_ms=round(latency_ms, 3))


async def run_checks(targets: Sequence[str], timeout_s: float) -> list[CheckResult]:
    """Every TCP check, concurrently, in the order of ``targets``."""
    if not targets:
        return []
    return list(await asyncio.gather(*(tcp_check(t, timeout_s) for t in targets)))


def nats_rtt_result(rtt_s: float | None, error: str | None = None) -> CheckResult:
    """The NATS round-trip check from a measured ``rtt_s`` (seconds) or an error text."""
    ok = rtt_s is not None and error is None
    latency = round(min(max(rtt_s, 0.0), 1e4) * 1000.0, 3) if rtt_s is not None else None
    if not ok and error is None:
        error = "no round trip"
    return CheckResult(
        id="nats_rtt",
        kind="nats_rtt",
        target="nats",
        ok=ok,
        latency_ms=latency,
        error=error[:_MAX_ERROR] if error else None,
    )
