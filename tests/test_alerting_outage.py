"""A PostgreSQL outage while an alert fires: nothing is delivered before it is written, and
once PostgreSQL is back the notification is written and delivered exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from collector.store import migrate
from gpuwarden.servers import NatsServer, PostgresServer
from tests.test_alerting import Receiver, collector, send, settled, until, webhook_toml, write_config
from tests.test_store import sample


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


async def test_alert_during_a_postgres_outage_is_written_then_sent_once(
    tmp_path: Path, own_pg: PostgresServer, private_nats: NatsServer
) -> None:
    dsn = own_pg.dsn()
    c = await asyncpg.connect(dsn)
    await migrate.migrate(c)
    await c.close()
    body = '[health]\nstale_after = "1s"\n' + webhook_toml("{url}")
    async with Receiver() as rx:
        cfg = write_config(tmp_path, dsn, private_nats.url, body.format(url=rx.url))
        async with collector(cfg) as svc:
            await send(private_nats.url, [sample("o-01", 1, time.time(), gpus=2)])
            await until(lambda: svc.alerting.stats["observations"] > 0)
            await asyncio.to_thread(own_pg.stop, "immediate")
            firing = lambda: [a.rule for a in svc.alerting.list_alerts(state="firing")]  # noqa: E731
            await until(lambda: firing() == ["host.unreachable"])  # judged: o-01 went silent
            failed = svc.alerting.stats["persist_errors"]
            await until(lambda: svc.alerting.stats["persist_errors"] >= failed + 2)  # not written
            assert rx.received == []  # so not sent either
            await asyncio.to_thread(own_pg.start)
            await until(lambda: len(rx.received) == 1, timeout=30)
            await settled(svc)
    assert rx.alerts() == [("firing", "host.unreachable", "firing")]
    c = await asyncpg.connect(dsn)
    try:
        rows = await c.fetch("SELECT channel, status FROM notification_outbox WHERE channel = 'hook'")
        kinds = [r["kind"] for r in await c.fetch("SELECT kind FROM alert_transitions ORDER BY id")]
    finally:
        await c.close()
    assert [(r["channel"], r["status"]) for r in rows] == [("hook", "sent")]
    assert kinds[:2] == ["pending", "firing"]
