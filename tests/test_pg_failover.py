"""The collector rides a PostgreSQL failover (issue 13, "the engines underneath").

A primary and its streaming standby (``pg_basebackup -R``), the collector on a multi-host DSN
with ``target_session_attrs=read-write``, a simulated fleet publishing, a webhook receiver.
Under load the primary is stopped like a crash (SIGQUIT) and the standby promoted
(``pg_ctl promote``): the collector reconnects to the new primary, storing resumes, and an
XID after the promotion is notified once.

* Synchronous replication (``synchronous_standby_names = '*'``): a commit returns, and the
  collector acknowledges the frames to JetStream, only once the standby holds it, so every
  frame the agents published is on the new primary exactly once.
* Asynchronous replication: what the standby had not received when the primary died is lost,
  though acknowledged (docs/operations.md, "The loss window"). Shown: every frame committed
  before a point the standby is known to have replayed is on the new primary; the frames
  lost are all from after that point.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import nats
import pytest

from agent.fleet import Fleet
from collector.config import CollectorConfig
from collector.store import db
from gpuwarden.servers import NatsServer, PostgresServer, multi_host_dsn
from shared.config import NatsConfig
from shared.subjects import STREAM
from tests.support.cluster import Key, publish_xid, published_keys, stored_keys
from tests.support.collector import Receiver, collector, load_toml, webhook_toml
from tests.support.wait import until


def failover_config(tmp: Path, dsn: str, nats_url: str, hook_url: str) -> CollectorConfig:
    return load_toml(
        tmp,
        dsn,
        nats_url,
        f"""ack_wait = "3s"
[postgres]
connect_timeout = "2s"
[alerting]
tick = "200ms"
health_snapshot = "1s"
[health]
stale_after = "30s"
{webhook_toml(hook_url)}
""",
    )


def xid_pages(rx: Receiver, host: str) -> list[str]:
    return [
        a["status"]
        for b in rx.bodies()
        for a in b["alerts"]
        if a["labels"]["alertname"] == "gpu.xid" and a["labels"].get("host") == host
    ]


async def consumed(url: str) -> bool:
    """Every message of the stream was delivered to the consumers and acknowledged (stored)."""
    nc = await nats.connect(url)
    try:
        infos = await nc.jetstream().consumers_info(STREAM)
    finally:
        await nc.close()
    return bool(infos) and all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos)


async def replayed(standby: PostgresServer, lsn: str) -> bool:
    c = await asyncpg.connect(standby.dsn())
    try:
        return bool(await c.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn))
    finally:
        await c.close()


@pytest.mark.parametrize("pg_pair", ["sync", "async"], indirect=True)
async def test_promoting_the_standby_under_load(
    tmp_path: Path, pg_pair: tuple[PostgresServer, PostgresServer], private_nats: NatsServer
) -> None:
    primary, standby = pg_pair
    sync = bool(primary.settings.get("synchronous_standby_names"))
    dsn = multi_host_dsn([primary, standby])
    nats_cfg = NatsConfig(servers=(private_nats.url,), reconnect_wait=0.2, buffer_frames=100_000)
    fleet = Fleet(nats_cfg, hosts=50, gpus=2, interval=0.5, workers=32)
    async with Receiver() as rx:
        cfg = failover_config(tmp_path, dsn, private_nats.url, rx.url)
        async with collector(cfg) as svc:
            assert svc.pool is not None
            await fleet.start()
            run = asyncio.create_task(fleet.run())
            try:
                await until(lambda: svc.ingest.stats.frames_stored > 300, timeout=60)
                # a point the standby has replayed: what was committed before it must survive
                before: set[Key] = set(await stored_keys(primary.dsn()))
                c = await asyncpg.connect(primary.dsn())
                lsn = await c.fetchval("SELECT pg_current_wal_lsn()::text")
                await c.close()
                await until(lambda: replayed(standby, lsn), timeout=30)
                await until(lambda: svc.ingest.stats.frames_stored > len(before) + 100, timeout=60)
                errors = svc.ingest.stats.db_errors
                await asyncio.to_thread(primary.stop, "immediate")  # like a crash
                # before the promotion the collector meets only the standby, in recovery: it
                # keeps the batch and retries (an operator or Patroni takes a while to promote)
                await until(lambda: svc.ingest.stats.db_errors >= errors + 3, timeout=60)
                assert not svc.ingest.stats.db_up
                await asyncio.to_thread(standby.promote)
                stored = svc.ingest.stats.frames_stored
                await until(lambda: svc.ingest.stats.frames_stored > stored + 200, timeout=90)
                # the collector is on the new primary: its pool and its writer
                async with svc.pool.acquire() as conn:
                    assert await conn.fetchval("SELECT inet_server_port()") == standby.port
                    assert not await conn.fetchval("SELECT pg_is_in_recovery()")
                # and alerting resumed: a fault after the promotion is notified, once
                host = publish_xid(fleet, 7)
                await until(lambda: "firing" in xid_pages(rx, host), timeout=60)
            finally:
                fleet.stop()
                await run
                await fleet.close(flush_timeout=60)
            assert fleet.publisher.stats.dropped == 0
            assert fleet.publisher.buffered == 0
            published = published_keys(fleet)
            await until(lambda: consumed(private_nats.url), timeout=90)
    after = await stored_keys(standby.dsn())
    assert set(after.values()) == {1}  # nothing doubled
    assert before <= set(after)  # nothing replicated before the failure was lost
    lost = published - set(after)
    assert not lost & before
    if sync:
        assert lost == set()  # synchronous replication: nothing acknowledged is lost
    else:
        assert set(after) <= published
    assert xid_pages(rx, host) == ["firing"]


async def test_a_standby_alone_is_a_transient_failure_not_a_data_error(
    pg_pair: tuple[PostgresServer, PostgresServer],
) -> None:
    """While only a standby answers (before its promotion), connecting for writes and writing
    fail with errors the collector retries (``db.is_transient``) rather than rejecting frames."""
    _, standby = pg_pair
    with pytest.raises(asyncpg.TargetServerAttributeNotMatched) as no_primary:
        await asyncpg.connect(multi_host_dsn([standby]))
    assert db.is_transient(no_primary.value)
    c = await asyncpg.connect(standby.dsn())
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError) as read_only:
            await c.execute("CREATE TABLE t (i int)")
    finally:
        await c.close()
    assert db.is_transient(read_only.value)
