"""``GET /api/v1/stream``: a WebSocket of live health changes, alert transitions and incidents.

Each client gets its own bounded :class:`collector.notify.stream.Subscription`; the collector
only ever does ``put_nowait``. A client that falls ``maxsize`` events behind is detached by
the broadcaster and its socket is closed with code 1013 (try again later); a send that does
not complete within ``SEND_TIMEOUT`` closes it the same way. Filters (query parameters,
comma-separated lists): ``provider``, ``host``, ``severity``, ``type``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import WSCloseCode, WSMsgType, web

from collector.api.deps import DEPS
from collector.api.errors import bad

TRY_AGAIN_LATER: Final = 1013
SEND_TIMEOUT: Final = 5.0
QUEUE: Final = web.AppKey("stream_queue", int)
SEVERITY_WORDS: Final = frozenset({"critical", "warning", "info", "unknown", "healthy"})
TYPES: Final = frozenset({"alert", "health", "incident"})


def _set(q: Mapping[str, str], name: str, allowed: frozenset[str] | None = None) -> frozenset[str] | None:
    raw = q.get(name)
    if raw is None or raw == "":
        return None
    values = frozenset(v.strip() for v in raw.split(",") if v.strip())
    if allowed is not None and not values <= allowed:
        raise bad(name, f"{name} must be among {', '.join(sorted(allowed))}")
    return values


class Filter:
    def __init__(self, q: Mapping[str, str]) -> None:
        self.provider = _set(q, "provider")
        self.host = _set(q, "host")
        self.severity = _set(q, "severity", SEVERITY_WORDS)
        self.type = _set(q, "type", TYPES)

    def __call__(self, event: Mapping[str, Any]) -> bool:
        for wanted, key in (
            (self.provider, "provider"),
            (self.host, "host"),
            (self.severity, "severity"),
            (self.type, "type"),
        ):
            if wanted is not None and event.get(key) not in wanted:
                return False
        return True


async def handler(request: web.Request) -> web.WebSocketResponse:
    match = Filter(request.query)  # 400 before the upgrade
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 16)
    await ws.prepare(request)
    sub = request.app[DEPS].broadcaster.subscribe(request.app.get(QUEUE, 1000))
    reader = asyncio.create_task(_drain_incoming(ws))
    try:
        await ws.send_str(json.dumps({"type": "hello", "filters": _describe(match)}))
        while not ws.closed:
            getter = asyncio.ensure_future(sub.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break  # the client went away
            event = getter.result()
            if sub.overflowed:
                await _close(ws, TRY_AGAIN_LATER, b"too slow: fell behind the live stream")
                break
            if not match(event):
                continue
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await ws.send_str(json.dumps(event, default=str))
            except TimeoutError:
                await _close(ws, TRY_AGAIN_LATER, b"too slow: send timed out")
                break
            except ConnectionError:
                break
    finally:
        sub.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        if not ws.closed:
            await _close(ws, WSCloseCode.GOING_AWAY, b"server stopping")
    return ws


async def _close(ws: web.WebSocketResponse, code: int, message: bytes) -> None:
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(2.0):
            await ws.close(code=code, message=message)


async def _drain_incoming(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends, so pings and its close are handled."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            return


def _describe(f: Filter) -> dict[str, list[str] | None]:
    return {
        k: sorted(v) if v is not None else None
        for k, v in (("provider", f.provider), ("host", f.host), ("severity", f.severity), ("type", f.type))
    }
