"""Collector group: a member stopped inside a fenced write (its fencing rows locked FOR SHARE)
neither stalls a taker's lease round nor keeps its locks for long (real nats-server and
PostgreSQL; docs/operations.md, "Fencing")."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import asyncpg
import nats
import pytest

from agent.fleet import Fleet, host_name
from collector.config import CollectorConfig
from collector.group import fence
from collector.group.scope import GROUP_STRIDE
from collector.store import db
from collector.wiring import build
from gpuwarden.servers import NatsServer
from shared.config import NatsConfig
from tests.support.collector import Receiver, collector, load_toml, webhook_toml
from tests.support.group import ALERTS, xid_keys, xids
from tests.support.wait import until


def _config(tmp: Path, dsn: str, nats_url: str, kv: str, group: bool = True) -> CollectorConfig:
    # group=False: a collector alone (the group is the default), whose sessions keep no timeout
    body = (
        f'group = true\nbuckets = 16\nlease = "2s"\ngroup_kv = "{kv}"\nmember = "taker"\n'
        if group
        else "group = false\n"
    )
    return load_toml(tmp, dsn, nats_url, body)


async def test_a_locked_fencing_row_defers_its_bucket_not_the_rest_of_the_round(
    tmp_path: Path, pg_dsn: str, nats_url: str, conn: asyncpg.Connection, request: pytest.FixtureRequest
) -> None:
    parts = build(_config(tmp_path, pg_dsn, nats_url, f"grp-{abs(hash(request.node.name)) % 10**8}"))
    member, share = parts.group, parts.share
    assert member is not None
    assert share is not None
    # a member stopped inside its write of bucket 5: the row stays locked FOR SHARE
    kv = member.group_kv
    assert await fence.take(conn, 5, 1, "paused", group=kv)
    paused = await asyncpg.connect(pg_dsn)
    tx = paused.transaction()
    await tx.start()
    await fence.check(paused, {5: 1}, group=kv)
    await parts.postgres.start()
    await parts.nats.start()
    try:
        await member.start()  # its first lease round, alone in the group: every bucket is its
        m = member.membership
        assert m is not None
        assert m.owned() == frozenset(range(16)) - {5}, "the locked row held up the round's other buckets"
        assert 5 not in m.held  # handed back, not held unfenced
        assert member.fence_timeouts >= 1
        fences = {
            r["bucket"]: r["member"]
            for r in await conn.fetch("SELECT bucket, member FROM group_fences WHERE group_kv = $1", kv)
        }
        assert fences == {b: "paused" if b == 5 else "taker" for b in range(16)}
        counted = {s.name: s.value for metric in share.collect() for s in metric.samples}
        assert counted["gpuwarden_group_fence_timeouts_total"] >= 1

        await tx.rollback()  # the stopped member's transaction ends (it resumed, or its session did)
        await until(lambda: member.owns(5), what="bucket 5 taken at a round after its row was freed")
        row = await conn.fetchrow("SELECT member, token FROM group_fences WHERE bucket = 5")
        assert (row["member"], row["token"]) == ("taker", m.tokens()[5])
    finally:
        await member.stop()
        await parts.nats.stop()
        await parts.postgres.stop()
        await paused.close()


async def test_a_members_transaction_left_open_is_ended_and_its_pool_goes_on(
    tmp_path: Path, pg_dsn: str, nats_url: str, conn: asyncpg.Connection, request: pytest.FixtureRequest
) -> None:
    static = build(_config(tmp_path, pg_dsn, nats_url, "", group=False))
    await static.postgres.start()
    try:
        assert static.postgres.pool is not None
        async with static.postgres.pool.acquire() as c:
            assert await c.fetchval("SHOW idle_in_transaction_session_timeout") == "0"
    finally:
        await static.postgres.stop()

    parts = build(_config(tmp_path, pg_dsn, nats_url, f"grp-{abs(hash(request.node.name)) % 10**8}"))
    await parts.postgres.start()
    pool = parts.postgres.pool
    assert pool is not None
    try:
        async with pool.acquire() as c:
            assert await c.fetchval("SHOW idle_in_transaction_session_timeout") == "6s"  # 3 leases
        kv = parts.config.collector.group_kv
        assert await fence.take(conn, 3, 1, "taker", group=kv)
        held = await pool.acquire()
        pid = held.get_server_pid()

        async def ended() -> bool:
            return not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

        async def stopped_inside_a_write() -> None:
            async with held.transaction():
                await fence.check(held, {3: 1}, group=kv)  # a fenced write, then the process stops here
                with pytest.raises(fence.LockTimeout):  # a taker cannot raise the token meanwhile
                    await fence.take(conn, 3, 2, "next", group=kv, wait=0.05)
                await until(ended, what="PostgreSQL to end the session left idle in its transaction")
                await held.fetchval("SELECT 1")  # resumed: its next statement

        with pytest.raises(db.ERRORS):  # what the member's store sees when it resumes
            await stopped_inside_a_write()
        await pool.release(held)
        assert await fence.take(conn, 3, 2, "next", group=kv, wait=0.05)  # the lock went with the session
        async with pool.acquire() as c:  # the pool connects again
            assert await c.fetchval("SELECT 1") == 1
    finally:
        await parts.postgres.stop()


@pytest.mark.timeout(300)
async def test_two_groups_in_one_database_each_page_their_faults_and_neither_fences_the_other(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two groups of one member each (another ``durable``: another KV bucket) on one database and
    one NATS: each takes every bucket under its own fencing rows (before migration 0013 the
    second's lease revisions were below the first's tokens: its writes were fenced out) and
    pages every fault, once, on its own webhook (both read the whole stream)."""
    url = private_nats.url
    faults = [f"{host_name(i)}/gpu0:xid=79@2s" for i in (1, 5, 9)]
    suffix = abs(hash(str(tmp_path))) % 10**8
    async with Receiver() as rx_a, Receiver() as rx_b:
        cfgs = []
        for name, rx in (("a", rx_a), ("b", rx_b)):
            (tmp_path / name).mkdir()
            body = (
                f'durable = "g{name}{suffix}"\ngroup = true\nlease = "4s"\nmember = "{name}"\n'
                f'[alerting]\ntick = "200ms"\nhealth_snapshot = "1s"\n{ALERTS}{webhook_toml(rx.url)}'
            )
            cfgs.append(load_toml(tmp_path / name, pg_dsn, url, body, batch=200))
        assert cfgs[0].collector.group_kv != cfgs[1].collector.group_kv
        # group a's KV bucket has seen 200 revisions already: its tokens are above group b's
        # (one bucket's tokens compared across the groups, as before migration 0013, fence b out)
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().create_key_value(bucket=cfgs[0].collector.group_kv, ttl=4.0, history=1)
            for i in range(200):
                await kv.put("x.older", str(i).encode())
        finally:
            await nc.close()
        async with collector(cfgs[0]) as svc_a, collector(cfgs[1]) as svc_b:
            members = [svc.parts.group for svc in (svc_a, svc_b)]
            for m in members:
                assert m is not None
                await until(lambda m=m: len(m.tokens()) == 64, what="every bucket taken")  # type: ignore[misc]
            fleet = Fleet(NatsConfig(servers=(url,)), hosts=12, gpus=1, interval=1.0, faults=faults)
            await fleet.start()
            run = asyncio.create_task(fleet.run(duration=30))
            try:
                await until(lambda: len(xids(rx_a)) == 3 and len(xids(rx_b)) == 3, timeout=60)
                for svc in (svc_a, svc_b):
                    await asyncio.wait_for(svc.alerting.deliverer.idle(), 30)
            finally:
                fleet.stop()
                await run
                await fleet.close()
            for m in members:
                assert m is not None
                assert len(m.tokens()) == 64, "a group lost buckets to the other's fencing tokens"
        want = Counter({host_name(i): 1 for i in (1, 5, 9)})
        assert xids(rx_a) == want, xid_keys(rx_a)
        assert xids(rx_b) == want, xid_keys(rx_b)
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT group_kv, count(*) AS n FROM group_fences GROUP BY group_kv")
        bases = {
            r["group_kv"]: r["base"] for r in await conn.fetch("SELECT group_kv, base FROM collector_groups")
        }
        # each group's health snapshots in partitions of its own (base + bucket), 64 each
        snapshots = {
            kv: await conn.fetchval(
                "SELECT count(*) FROM health_state WHERE partition BETWEEN $1 AND $1 + 63", base
            )
            for kv, base in bases.items()
        }
    finally:
        await conn.close()
    kvs = [c.collector.group_kv for c in cfgs]
    assert {r["group_kv"]: r["n"] for r in rows} == dict.fromkeys(kvs, 64)
    assert sorted(bases.values()) == [10_000, 10_000 + GROUP_STRIDE], bases
    assert snapshots == dict.fromkeys(kvs, 64)
    fenced = [r.getMessage() for r in caplog.records if "fenc" in r.getMessage().lower()]
    assert not fenced, fenced
