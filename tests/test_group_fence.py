"""Collector group: a member stopped inside a fenced write (its fencing rows locked FOR SHARE)
neither stalls a taker's lease round nor keeps its locks for long (real nats-server and
PostgreSQL; docs/operations.md, "Fencing")."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from collector.config import CollectorConfig
from collector.group import fence
from collector.store import db
from collector.wiring import build
from tests.support.collector import load_toml
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
    assert await fence.take(conn, 5, 1, "paused")
    paused = await asyncpg.connect(pg_dsn)
    tx = paused.transaction()
    await tx.start()
    await fence.check(paused, {5: 1})
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
            r["bucket"]: r["member"] for r in await conn.fetch("SELECT bucket, member FROM group_fences")
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
        assert await fence.take(conn, 3, 1, "taker")
        held = await pool.acquire()
        pid = held.get_server_pid()

        async def ended() -> bool:
            return not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

        async def stopped_inside_a_write() -> None:
            async with held.transaction():
                await fence.check(held, {3: 1})  # a fenced write, then the process stops here
                with pytest.raises(fence.LockTimeout):  # a taker cannot raise the token meanwhile
                    await fence.take(conn, 3, 2, "next", wait=0.05)
                await until(ended, what="PostgreSQL to end the session left idle in its transaction")
                await held.fetchval("SELECT 1")  # resumed: its next statement

        with pytest.raises(db.ERRORS):  # what the member's store sees when it resumes
            await stopped_inside_a_write()
        await pool.release(held)
        assert await fence.take(conn, 3, 2, "next", wait=0.05)  # the lock went with the session
        async with pool.acquire() as c:  # the pool connects again
            assert await c.fetchval("SELECT 1") == 1
    finally:
        await parts.postgres.stop()
