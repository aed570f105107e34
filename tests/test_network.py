"""Network checks against real sockets and a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator

import nats
import pytest

from agent.network import nats_rtt_result, parse_target, run_checks, tcp_check
from shared.frames import CheckResult, SampleFrame, decode, encode


@pytest.fixture
async def listening() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that accepts; yields its port."""
    accepted: list[asyncio.StreamWriter] = []

    async def on_client(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for w in accepted:
        w.close()
    await server.wait_closed()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose accept queue is full, so that new SYNs are dropped: connects time out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    clients = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        clients.append(c)
    time.sleep(0.05)
    yield port
    for c in clients:
        c.close()
    srv.close()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("storage-1:2049", ("storage-1", 2049)),
        ("10.0.0.1:22", ("10.0.0.1", 22)),
        ("[::1]:4222", ("::1", 4222)),
        ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),
        ("host:65535", ("host", 65535)),
        ("host:1", ("host", 1)),
        ("host:0", None),
        ("host:65536", None),
        ("host", None),
        ("host:", None),
        (":22", None),
        ("::1:22", None),  # IPv6 needs brackets
        ("host:22x", None),
        ("ho st:22", None),
        ("", None),
    ],
)
def test_parse_target(target: str, expected: tuple[str, int] | None) -> None:
    assert parse_target(target) == expected


async def test_tcp_ok(listening: int) -> None:
    r = await tcp_check(f"127.0.0.1:{listening}", 2.0)
    assert r == CheckResult(
        id=f"tcp:127.0.0.1:{listening}",
        kind="tcp",
        target=f"127.0.0.1:{listening}",
        ok=True,
        latency_ms=r.latency_ms,
    )
    assert r.latency_ms is not None
    assert 0 <= r.latency_ms < 2000


async def test_tcp_refused() -> None:
    port = _closed_port()
    r = await tcp_check(f"127.0.0.1:{port}", 2.0)
    assert (r.ok, r.error, r.latency_ms, r.id) == (False, "connection refused", None, f"tcp:127.0.0.1:{port}")


async def test_tcp_timeout(black_hole: int) -> None:
    r = await tcp_check(f"127.0.0.1:{black_hole}", 0.3)
    assert (r.ok, r.error) == (False, "timeout")


@pytest.mark.parametrize("target", ["nohost", "a:b", "::1:22", "host:99999", ""])
async def test_tcp_bad_target(target: str) -> None:
    r = await tcp_check(target, 1.0)
    assert (r.id, r.kind, r.target, r.ok, r.error) == (f"tcp:{target}", "tcp", target, False, "bad target")


async def test_tcp_unresolvable_name() -> None:
    r = await tcp_check("no-such-host.invalid:80", 3.0)
    assert not r.ok
    assert r.error in ("name not resolved", "timeout")  # "timeout" where the resolver hangs


async def test_tcp_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = await asyncio.start_server(lambda _r, w: w.close(), "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = server.sockets[0].getsockname()[1]
    try:
        r = await tcp_check(f"[::1]:{port}", 2.0)
        assert r.ok
        assert r.id == f"tcp:[::1]:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_run_checks_in_order_and_concurrent(listening: int, black_hole: int) -> None:
    closed = _closed_port()
    targets = [
        f"127.0.0.1:{black_hole}",
        f"127.0.0.1:{listening}",
        "bad",
        f"127.0.0.1:{closed}",
        f"127.0.0.1:{black_hole}",
        f"127.0.0.1:{black_hole}",
    ]
    t0 = time.monotonic()
    results = await run_checks(targets, 0.5)
    elapsed = time.monotonic() - t0
    assert [r.target for r in results] == targets
    assert [r.error for r in results] == [
        "timeout",
        None,
        "bad target",
        "connection refused",
        "timeout",
        "timeout",
    ]
    assert elapsed < 1.4  # three 0.5 s timeouts side by side, not one after another
    frame = SampleFrame(host="h", provider="p", boot_id="b", seq=1, ts=time.time(), checks=tuple(results))
    assert decode(encode(frame)) == frame


async def test_run_checks_empty() -> None:
    assert await run_checks([], 1.0) == []


@pytest.mark.parametrize(
    ("rtt", "error", "ok", "latency", "text"),
    [
        (0.0021, None, True, 2.1, None),
        (0.0, None, True, 0.0, None),
        (None, "not connected", False, None, "not connected"),
        (None, None, False, None, "no round trip"),
        (0.5, "slow", False, 500.0, "slow"),
        (-1.0, None, True, 0.0, None),
        (1e9, None, True, 1e7, None),
    ],
)
def test_nats_rtt_result(
    rtt: float | None, error: str | None, ok: bool, latency: float | None, text: str | None
) -> None:
    r = nats_rtt_result(rtt, error)
    assert (r.id, r.kind, r.ok, r.latency_ms, r.error) == ("nats_rtt", "nats_rtt", ok, latency, text)
    frame = SampleFrame(host="h", provider="p", boot_id="b", seq=1, ts=time.time(), checks=(r,))
    assert decode(encode(frame)) == frame


async def test_nats_rtt_from_a_real_server(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        r = nats_rtt_result(await nc.rtt())
    finally:
        await nc.close()
    assert r.ok
    assert r.latency_ms is not None
    assert 0 < r.latency_ms < 1000
