"""Alerting inside the collector, against real nats-server, PostgreSQL and an HTTP receiver:
an XID event notifies at once (HMAC-signed webhook), a restart does not notify again,
acknowledgement stops escalation, a silence stops notification, state survives restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats
from aiohttp import web

from collector.config import CollectorConfig, load_collector_config
from collector.notify.webhook import SIGNATURE_HEADER, verify
from collector.service import CollectorService
from gpuwarden.servers import free_port
from shared.frames import Frame
from tests.test_ingest import publish
from tests.test_store import event, sample

SECRET = "s3cret-hmac-key"


class Receiver:
    """A webhook receiver on 127.0.0.1: records every request; fails the first ``fail`` ones
    (or every one with ``fail=-1``) with HTTP 500."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.attempts = 0
        self.received: list[tuple[dict[str, str], bytes, float]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        if self.fail < 0 or self.attempts <= self.fail:
            return web.Response(status=500)
        self.received.append((dict(request.headers), body, time.time()))
        return web.Response(status=200)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(b) for _, b, _ in self.received]

    def alerts(self) -> list[tuple[str, str, str]]:
        """(status, alertname, kind) of every delivered alert, in order."""
        return [
            (a["status"], a["labels"]["alertname"], a["annotations"]["kind"])
            for b in self.bodies()
            for a in b["alerts"]
        ]

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def write_config(tmp: Path, dsn: str, nats_url: str, body: str) -> CollectorConfig:
    path = tmp / "collector.toml"
    path.write_text(
        f"""
[collector]
batch = 200
fetch_timeout = "100ms"
durable = "c{abs(hash(str(tmp))) % 10**8}"
[alerting]
tick = "200ms"
health_snapshot = "1s"
{body}
"""
    )
    return load_collector_config(path, env={}, flags={"postgres.dsn": dsn, "nats.servers": [nats_url]})


def webhook_toml(url: str, **extra: object) -> str:
    lines = [f'[[notify.webhook]]\nname = "hook"\nurl = "{url}"\nsecret = "{SECRET}"\nbackoff = "50ms"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def collector(cfg: CollectorConfig) -> AsyncIterator[CollectorService]:
    svc = CollectorService(cfg)
    await svc.startup()
    task = asyncio.create_task(svc.run())
    try:
        yield svc
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)
        await svc.shutdown()


async def until(pred: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        await nc.drain()


async def send(url: str, frames: list[Frame]) -> None:
    async with jetstream(url) as js:
        await publish(js, frames)


async def test_xid_notifies_at_once_signed_and_restart_does_not_notify_again(
    tmp_path: Path, pg_dsn: str, nats_url: str
) -> None:
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, nats_url, webhook_toml(rx.url))
        now = time.time()
        async with collector(cfg) as svc:
            await send(nats_url, [sample("x-01", 1, now), event("x-01", 2, now, xid=79)])
            await until(lambda: len(rx.received) >= 1)
            await until(lambda: svc.alerting.stats["outbox_backlog"] == 0)
        headers, body, _ = rx.received[0]
        assert verify(SECRET.encode(), body, headers[SIGNATURE_HEADER])
        assert not verify(b"wrong", body, headers[SIGNATURE_HEADER])
        doc = json.loads(body)
        assert doc["version"] == "4"
        assert doc["status"] == "firing"
        assert doc["receiver"] == "hook"
        (a,) = doc["alerts"]
        assert a["labels"]["alertname"] == "gpu.xid"
        assert a["labels"]["severity"] == "critical"
        assert a["labels"]["host"] == "x-01"
        assert a["labels"]["xid"] == "79"
        assert "reboot" in (a["annotations"]["summary"] + a["annotations"].get("advice", "")).lower()
        assert a["endsAt"] == "0001-01-01T00:00:00Z"
        assert a["fingerprint"]
        # a restart restores the firing alert and sends nothing again
        async with collector(cfg) as svc2:
            fp = a["fingerprint"]
            assert svc2.alerting.get_alert(fp) is not None
            assert svc2.alerting.get_alert(fp).state == "firing"  # type: ignore[union-attr]
            await send(nats_url, [sample("x-01", 3, time.time())])
            await asyncio.sleep(1.5)
        assert len(rx.received) == 1
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch("SELECT channel, status FROM notification_outbox ORDER BY id")
            kinds = [r["kind"] for r in await conn.fetch("SELECT kind FROM alert_transitions")]
        finally:
            await conn.close()
        assert sorted((r["channel"], r["status"]) for r in rows) == [
            ("hook", "sent"),
            ("log", "sent"),
            ("nats", "sent"),
        ]
        assert kinds[:2] == ["pending", "firing"]
