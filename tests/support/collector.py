"""A running collector and a webhook receiver for the end-to-end tests: the config writer,
the collector context, frames sent over JetStream and ``settled`` (wait until what was due happened)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
from aiohttp import web

from collector.config import CollectorConfig, load_collector_config
from collector.service import CollectorService
from shared.frames import Frame
from tests.support.ingest import publish
from tests.support.local_http import Handler, LocalHttp
from tests.support.tasks import started
from tests.support.wait import until

SECRET = "s3cret-hmac-key"


class Receiver(LocalHttp):
    """A webhook receiver on 127.0.0.1: records every request; fails the first ``fail`` ones
    (or every one with ``fail=-1``) with HTTP 500."""

    def __init__(self, fail: int = 0, hang: bool = False) -> None:
        self.fail = fail
        self.hang = hang
        self.attempts = 0
        self.received: list[tuple[dict[str, str], bytes, float]] = []
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        if self.hang:
            await asyncio.sleep(3600)
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

    def routes(self) -> list[tuple[str, Handler]]:
        return [("/hook", self.handle), ("/api/v2/alerts", self.handle)]  # also as an Alertmanager endpoint


def load_toml(
    tmp: Path, dsn: str, nats_url: str | None, collector_rest: str, batch: int = 500
) -> CollectorConfig:
    """``tmp/collector.toml``: a ``[collector]`` section with ``batch`` and a 100 ms fetch
    timeout, continued by ``collector_rest`` (more keys, then other sections); loaded with the
    test's database and, given one, NATS server."""
    path = tmp / "collector.toml"
    path.write_text(f'[collector]\nbatch = {batch}\nfetch_timeout = "100ms"\n{collector_rest}')
    flags: dict[str, object] = {"postgres.dsn": dsn}
    if nats_url is not None:
        flags["nats.servers"] = [nats_url]
    return load_collector_config(path, env={}, flags=flags)


def write_config(tmp: Path, dsn: str, nats_url: str, body: str, alerting: str = "") -> CollectorConfig:
    return load_toml(
        tmp,
        dsn,
        nats_url,
        f"""durable = "c{abs(hash(str(tmp))) % 10**8}"
[alerting]
tick = "200ms"
health_snapshot = "1s"
{alerting}
{body}
""",
        batch=200,
    )


def webhook_toml(url: str, **extra: object) -> str:
    lines = [f'[[notify.webhook]]\nname = "hook"\nurl = "{url}"\nsecret = "{SECRET}"\nbackoff = "50ms"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def collector(cfg: CollectorConfig) -> AsyncIterator[CollectorService]:
    svc = CollectorService(cfg)
    async with started(svc.startup, svc.run, svc.request_stop, svc.shutdown):
        yield svc


async def settled(svc: CollectorService, steps: int = 3) -> None:
    """Wait (on conditions, not time) until the alerting has run ``steps`` more evaluations,
    its timer's included, and its channels have finished every delivery queued by then: what
    was due has happened, so what has not happened will not (for "nothing more" checks)."""
    al = svc.alerting
    target = al.counts["evaluations"] + steps
    await until(lambda: al.counts["evaluations"] >= target)
    assert al.deliverer is not None
    await asyncio.wait_for(al.deliverer.idle(), 30)


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


def told(rx: Receiver) -> list[tuple[str, str, set[str]]]:
    """(kind, rule, hosts) of every webhook notification received, once per delivery id: an
    alert's own names its host; a provider incident's, the hosts it is about."""
    out, seen = [], set()
    for headers, raw, _ in rx.received:
        key = headers.get("X-Gpuwarden-Delivery", "")
        if key in seen:
            continue
        seen.add(key)
        for a in json.loads(raw)["alerts"]:
            ann, labels = a["annotations"], a["labels"]
            hosts = set(filter(None, ann.get("hosts", "").split(","))) or {labels.get("host", "")}
            out.append((ann["kind"], labels["alertname"], hosts))
    return out
