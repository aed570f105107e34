"""Collector group: a bucket's health context moves with it, and is never written ahead of the
alert changes of the frames it records as judged (docs/operations.md, "Collector group").

Real PostgreSQL (alert state, health snapshots, fencing tokens) and one nats-server (the
bucket's consumer, the copy the taker is delivered again); two members' engine runners, stores
and ingests are driven in-process as :mod:`collector.wiring` assembles them, without their
timers, and their leases are plain dicts (bucket -> fencing token) as in tests/test_group.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path

import asyncpg
import nats
import pytest

from collector.config import CollectorConfig
from collector.group import fence
from collector.group.scope import Scope, part_of
from collector.group.store import GroupAlertStore
from collector.health import HealthEngine
from collector.ingest import Ingest
from collector.store.writer import Writer
from gpuwarden.servers import NatsServer
from shared.frames import encode, replace
from shared.subjects import event_subject
from tests.support.collector import load_toml
from tests.support.group import host_name_in_bucket
from tests.support.records import event, sample
from tests.support.runner import CONFIG as RUNNER_CONFIG
from tests.support.runner import build_runner
from tests.support.wait import until

BUCKET = 5
CONFIG = 'durable = "hg"\n' + RUNNER_CONFIG


class Member:
    """One member's runner, store and ingest over its own pool; ``held``: its leases."""

    def __init__(self, cfg: CollectorConfig, pool: asyncpg.Pool, nc: nats.NATS) -> None:
        self.held: dict[int, int] = {}
        self.pool, self.nc = pool, nc
        scope = Scope(64, lambda b: b in self.held, lambda: dict(self.held))
        self.store = store = GroupAlertStore(lambda: pool, scope, "g")
        self.runner = runner = build_runner(cfg, store, scope=scope, on_fenced=self.fenced)[0]
        store.incidents = lambda: runner.alerts_state.incidents
        store.health = lambda: (runner.health, runner.health_engine.healthy_for)
        self.ingest = Ingest(cfg, Writer(cfg.postgres), on_batch=runner.on_frames)

    def fenced(self, buckets: list[int]) -> None:  # collector.group.lease.Membership.drop
        for b in buckets:
            self.held.pop(b, None)

    async def take(self, conn: asyncpg.Connection, bucket: int, token: int) -> None:
        """As collector.group.member.GroupMember._gain: raise, restore, then consume."""
        await fence.take(
            conn, bucket, token, "m", group="g"
        )  # (raised already when the test raised it first)
        self.held[bucket] = token
        await self.runner.regroup(lambda: self.store.reload([bucket]))
        assert self.ingest.source is not None
        await self.ingest.source.start(bucket)

    def xid_alerts(self, code: int) -> list[str]:
        return [
            a.state
            for a in self.runner.alerts_state.alerts.values()
            if a.rule == "gpu.xid" and a.labels.get("xid") == str(code)
        ]

    async def close(self) -> None:
        await self.ingest.close()
        await self.ingest.writer.close()


class GatedChecks:
    """``fence.check`` of the members' stores, the n-th call held until ``gates[n]`` is set
    (a write in flight: its transaction begun, its fencing rows not locked yet)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
        self.gates = [asyncio.Event() for _ in range(n)]
        self.calls = 0
        real = fence.check

        async def check(conn: asyncpg.Connection, tokens: Mapping[int, int], *, group: str) -> None:
            i = self.calls
            self.calls += 1
            if i < len(self.gates):
                await self.gates[i].wait()
            await real(conn, tokens, group=group)

        monkeypatch.setattr("collector.group.store.fence.check", check)


async def outbox_rows(conn: asyncpg.Connection, code: int) -> int:
    got: int = await conn.fetchval(
        "SELECT count(*) FROM notification_outbox WHERE payload->>'rule' = 'gpu.xid'"
        " AND payload->'labels'->>'xid' = $1",
        str(code),
    )
    return got


@pytest.mark.parametrize("snapshot", ["periodic", "the step before's"])
async def test_an_xid_judged_but_not_written_when_the_bucket_is_lost_is_paged_by_the_taker(
    conn: asyncpg.Connection,
    pg_dsn: str,
    private_nats: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    snapshot: str,
) -> None:
    """Member a judges an XID on the fast path; before its step's alert write commits, the
    bucket is taken by b (the fencing token raised: a's write is refused). Meanwhile a health
    snapshot of the bucket is written by a: the periodic one (the timer's), or the one written
    with the step before's alert changes (an ingest batch whose write was in flight when the
    XID was judged). b restores the bucket and is delivered the XID's stored copy again (a left
    it unacknowledged): the XID must be judged and paged, once. Before, the snapshot recorded
    the XID's seq as judged and b skipped the copy: the XID was never paged. And the health
    context moves: an XID a judged and wrote before is known to b (not judged again)."""
    cfg = load_toml(tmp_path, pg_dsn, private_nats.url, CONFIG)
    host = host_name_in_bucket(BUCKET)
    pools = [await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4) for _ in range(2)]
    ncs = [await nats.connect(private_nats.url) for _ in range(2)]
    a, b = Member(cfg, pools[0], ncs[0]), Member(cfg, pools[1], ncs[1])
    try:
        for m in (a, b):
            await m.ingest.setup_group(m.nc, 64, lambda m=m: dict(m.held))  # type: ignore[misc]
        assert a.ingest.source is not None
        assert b.ingest.source is not None
        js = ncs[0].jetstream()
        await a.take(conn, BUCKET, 10)

        # an XID judged and written by a, with the bucket's health context (its seq: 1)
        t0 = time.time()
        await js.publish(event_subject("prov-a", host), encode(event(host, 1, t0, xid=94)))
        first = await a.ingest.source.fetch(10, wait=30)
        await a.ingest.process(first)
        assert a.xid_alerts(94) == ["firing"]
        assert await outbox_rows(conn, 94) == 1

        # an XID judged on a's fast path (seq 2), stored by the ingest, never acknowledged by a
        xid = event(host, 2, t0 + 1, xid=79)
        await js.publish(event_subject("prov-a", host), encode(xid))
        if snapshot == "periodic":
            checks = GatedChecks(monkeypatch, 1)
            fast = asyncio.create_task(a.runner.judge_early(xid))
            await until(lambda: checks.calls == 1, what="the XID's write begun")
            assert a.xid_alerts(79) == ["firing"]  # judged, not written
            saving = asyncio.create_task(a.runner.save_health())  # the timer's snapshot
            assert await fence.take(conn, BUCKET, 11, "b", group="g")  # taken: a's write is refused
            checks.gates[0].set()
            await asyncio.gather(fast, saving)
        else:
            checks = GatedChecks(monkeypatch, 2)
            hot = sample(host, 3, t0 + 2, gpus=1)
            hot = replace(hot, gpus=(replace(hot.gpus[0], temp_c=99.0),))
            batch = asyncio.create_task(a.runner.on_frames([hot]))  # an alert fires: health written with it
            await until(lambda: checks.calls == 1, what="the batch's write begun")
            fast = asyncio.create_task(a.runner.judge_early(xid))
            await until(lambda: a.xid_alerts(79) == ["firing"], what="the XID judged")
            checks.gates[0].set()  # the batch's step commits, with the bucket's health snapshot
            await until(lambda: checks.calls == 2, what="the XID's write begun")
            assert await fence.take(conn, BUCKET, 11, "b", group="g")  # taken: a's write is refused
            checks.gates[1].set()
            await asyncio.gather(batch, fast)
        assert BUCKET not in a.held  # fenced
        assert await outbox_rows(conn, 79) == 0  # the XID's alert write was refused
        again = await a.ingest.source.fetch(10, wait=30)  # the stored copy: not judged, not acked
        await a.ingest.process(again)
        await a.ingest.source.stop(BUCKET)

        # b takes the bucket: its state, with the health context, then the copy delivered again
        await b.take(conn, BUCKET, 11)
        hs = b.runner.health.hosts.get(host)
        assert hs is not None, "the bucket's health context did not move to the taker"
        assert 1 in hs.recent_events
        copies = await b.ingest.source.fetch(10, wait=30)
        assert [m.subject for m in copies] == [m.subject for m in again]
        await b.ingest.process(copies)
        assert b.ingest.source.recreated == 1
        assert b.xid_alerts(79) == ["firing"], "the XID's copy was not judged by the taker"
        assert await outbox_rows(conn, 79) == 1  # paged once
        assert await outbox_rows(conn, 94) == 1  # the XID a wrote is not paged again
        saved = await conn.fetchval("SELECT data FROM health_state WHERE partition = $1", part_of(BUCKET))
        assert saved is not None
    finally:
        for m in (a, b):
            await m.close()
        for nc in ncs:
            await nc.close()
        for pool in pools:
            await pool.close()


async def test_a_partitions_store_writes_the_snapshot_taken_with_the_changes(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """``PgAlertStore.save(health=True)`` (the store's side of the same rule, outside a group):
    the snapshot of the state as it was when called, in the transaction of the changes."""
    from collector.health import HealthState
    from collector.store.alerts import Changes, PgAlertStore

    engine, state = HealthEngine(), HealthState()
    engine.observe(state, event("r-01", 7, time.time()), time.time())
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        store = PgAlertStore(lambda: pool, 3)
        store.health = lambda: (state, engine.healthy_for)
        saving = asyncio.create_task(store.save(Changes(), {}, health=True))
        await asyncio.sleep(0)  # (the snapshot is taken before the write's first await)
        engine.observe(state, event("r-01", 8, time.time()), time.time())  # judged meanwhile
        await saving
    finally:
        await pool.close()
    data = json.loads(await conn.fetchval("SELECT data FROM health_state WHERE partition = 3"))
    assert data["hosts"]["r-01"]["recent_events"] == [7]


async def test_a_released_bucket_is_not_read_back_nor_judged_by_the_member_that_released_it(
    conn: asyncpg.Connection, pg_dsn: str, private_nats: NatsServer, tmp_path: Path
) -> None:
    """A rebalance releases a bucket while its lease is still held (``Membership.round`` calls
    ``on_loss`` first, so that the bucket's state is written under its lease): the member writes
    it, but must not read it back. Before, ``GroupMember._loss`` reloaded the state of every
    bucket still held, the released one too: the runner kept judging its hosts, fed by nobody,
    and raised host.unreachable, gpu.stale and an incident for healthy hosts another member
    judged (never written nor published, but on this member's API, and judged every tick:
    bench/group_scale.py's members that had released buckets carried them)."""
    from collector.group.member import GroupMember

    cfg = load_toml(tmp_path, pg_dsn, private_nats.url, CONFIG)
    kept, released = host_name_in_bucket(BUCKET), host_name_in_bucket(BUCKET + 1)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    nc = await nats.connect(private_nats.url)
    m = Member(cfg, pool, nc)
    member = GroupMember(cfg, "m", lambda: nc, lambda: pool, m.store, m.runner, source=lambda: None)
    try:
        for b in (BUCKET, BUCKET + 1):
            assert await fence.take(conn, b, 10, "m", group="g")
            m.held[b] = 10
        await m.runner.regroup(lambda: m.store.reload([BUCKET, BUCKET + 1]))
        t0 = time.time()
        await m.runner.on_frames([sample(kept, 1, t0, gpus=2), sample(released, 1, t0, gpus=2)])
        assert {kept, released} <= set(m.runner.health.hosts)

        await member._loss(frozenset({BUCKET + 1}))  # released: still held while it is written
        del m.held[BUCKET + 1]
        saved = await conn.fetchval("SELECT data FROM health_state WHERE partition = $1", part_of(BUCKET + 1))
        assert released in json.loads(saved)["hosts"], "the released bucket's state was not written"
        assert kept in m.runner.health.hosts
        assert released not in m.runner.health.hosts, "the released bucket's hosts were read back"

        await m.runner.on_frames([sample(kept, 2, t0 + 30, gpus=2)])
        await m.runner.tick(t0 + 30)  # past stale_after for a host no frame came for
        hosts = {a.labels.get("host") for a in m.runner.alerts_state.alerts.values()}
        assert released not in hosts, "the member judged the hosts of a bucket it released"
    finally:
        await m.close()
        await nc.close()
        await pool.close()
