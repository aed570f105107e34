"""Frames published as agents publish them, a running ingest and the stored sample keys."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import nats

from collector.config import CollectorConfig
from collector.ingest import Ingest
from collector.store.writer import Writer
from shared.frames import Frame, encode
from shared.subjects import subject_for
from tests.support.records import make_config
from tests.support.tasks import in_task


def config(dsn: str, nats_url: str, **flags: Any) -> CollectorConfig:
    return make_config(
        dsn,
        **{"nats.servers": [nats_url], "collector.batch": 500, "collector.fetch_timeout": "200ms", **flags},
    )


async def publish(js: Any, frames: list[Frame]) -> None:
    for f in frames:
        await js.publish(subject_for(f.kind, f.provider, f.host), encode(f))  # as agents: no Nats-Msg-Id


@contextlib.asynccontextmanager
async def running(cfg: CollectorConfig) -> AsyncIterator[Ingest]:
    nc = await nats.connect(cfg.nats.servers[0])
    writer = Writer(cfg.postgres)
    ingest = Ingest(cfg, writer)
    await ingest.setup(nc)
    try:
        async with in_task(ingest.run(), ingest.stop):
            yield ingest
    finally:
        await nc.drain()
        await writer.close()


async def stored_keys(conn: asyncpg.Connection) -> Counter[tuple[str, int]]:
    rows = await conn.fetch("SELECT h.name, s.seq FROM host_samples s JOIN hosts h ON h.id = s.host_id")
    return Counter((r["name"], r["seq"]) for r in rows)


async def _count(conn: asyncpg.Connection, table: str, n: int) -> bool:
    got: int = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
    return got >= n
