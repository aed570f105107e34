"""Collector group: bucket arithmetic, KV leases (real nats-server), fencing tokens (real
PostgreSQL). The group of collector processes is tested in tests/test_group_e2e.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from collector import stream
from collector.group import fence, rebucket
from collector.group.assign import assign, bucket_of, moved
from collector.group.lease import Answer, Lease, Membership, clock
from collector.group.scope import Scope
from collector.group.store import GroupAlertStore, ScopeGate
from collector.ingest import Ingest
from collector.store.alerts import Changes
from collector.store.writer import Writer, WriteResult
from collector.stream import bucket_transform
from gpuwarden.servers import NatsServer
from shared.frames import Frame, encode
from shared.subjects import STREAM, event_subject
from tests.support.collector import collector, load_toml, write_config
from tests.support.group import host_name_in_bucket
from tests.support.ingest import config as ingest_config
from tests.support.ingest import publish, stored_keys
from tests.support.records import event, sample
from tests.support.wait import until


def test_assign_every_bucket_once_balanced() -> None:
    for n in range(1, 9):
        table = assign([f"m{i}" for i in range(n)], 64)
        owned = sorted(b for bs in table.values() for b in bs)
        assert owned == list(range(64))
        sizes = [len(bs) for bs in table.values()]
        assert max(sizes) - min(sizes) <= 1
    assert assign([], 64) == {}


def test_assign_is_deterministic_and_moves_few() -> None:
    three = assign(["a", "b", "c"], 64)
    assert assign(["c", "a", "b", "a"], 64) == three
    four = assign(["a", "b", "c", "d"], 64)
    # the newcomer takes its share (16); a rebalance should not reshuffle everything
    assert 16 <= moved(three, four) <= 40
    two = assign(["a", "b"], 64)
    assert moved(three, two) <= 40


async def test_bucket_of_is_the_streams_partition(private_nats: NatsServer) -> None:
    nc = await nats.connect(private_nats.url)
    js = nc.jetstream()
    # the production transform, on the production prefix, in a stream of its own subjects
    tr = bucket_transform(64)
    await js.add_stream(
        StreamConfig(name="GROUPT", subjects=["gpuwarden.v1.sample.>"], storage=StorageType.MEMORY,
                     subject_transform=tr)
    )  # fmt: skip
    tapped: list[str] = []  # a core-NATS tap: the transform rewrites what is stored, not what is seen

    async def tap(msg: Msg) -> None:
        tapped.append(msg.subject)

    await nc.subscribe("gpuwarden.v1.>", cb=tap)
    hosts = [f"node-{i:04d}" for i in range(300)] + ["a", "gpu_node_7", "Z" * 128]
    for h in hosts:
        await js.publish(f"gpuwarden.v1.sample.prov.{h}", b"x")
    await until(lambda: len(tapped) >= len(hosts), what="every frame tapped")
    assert sorted(tapped) == sorted(f"gpuwarden.v1.sample.prov.{h}" for h in hosts)
    info = await js.stream_info("GROUPT", subjects_filter=">")
    stored = info.state.subjects or {}
    assert len(stored) == len(hosts)
    for subject in stored:
        head, _, b = subject.rpartition(".")
        assert bucket_of(head.rsplit(".", 1)[1], 64) == int(b), subject
    await js.delete_stream("GROUPT")
    await nc.close()


class Member:
    """A Membership with its round loop, recording what it gained and lost."""

    def __init__(
        self, nc: nats.NATS, name: str, lease: float, kv: str, **hooks: Callable[..., Awaitable[None]]
    ) -> None:
        self.gains: list[Mapping[int, int]] = []
        self.losses: list[frozenset[int]] = []

        async def gain(g: Mapping[int, int]) -> None:
            self.gains.append(dict(g))
            if "gain" in hooks:
                await hooks["gain"](g)

        async def loss(lost: frozenset[int]) -> None:
            self.losses.append(lost)

        self.m = Membership(nc, name, buckets=16, lease=lease, kv_bucket=kv, on_gain=gain, on_loss=loss)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.m.start()
        self.task = asyncio.create_task(self.m.run())

    async def pause(self) -> None:
        """Stop its rounds without releasing anything (a killed or stopped process)."""
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def group_nc(nats_url: str):  # type: ignore[no-untyped-def]
    ncs: list[nats.NATS] = []

    async def connect() -> nats.NATS:
        nc = await nats.connect(nats_url)
        ncs.append(nc)
        return nc

    yield connect
    for nc in ncs:
        await nc.close()


async def test_leases_split_exclusively_and_a_dead_members_buckets_are_taken(group_nc, request) -> None:  # type: ignore[no-untyped-def]
    kv = f"grp-{abs(hash(request.node.name)) % 10**8}"
    a = Member(await group_nc(), "a", 2.0, kv)
    await a.start()
    assert a.m.owned() == frozenset(range(16))  # alone: takes every bucket in its first round
    b = Member(await group_nc(), "b", 2.0, kv)
    await b.start()
    both = assign(["a", "b"], 16)

    def split_done() -> bool:
        owned_a, owned_b = a.m.owned(), b.m.owned()
        assert not owned_a & owned_b, f"a bucket owned twice: {sorted(owned_a & owned_b)}"
        return owned_a == both["a"] and owned_b == both["b"]

    await until(split_done, what="a and b to split the buckets")
    assert a.losses
    assert set().union(*a.losses) >= set(both["b"])
    await a.pause()  # a dies holding its buckets

    def taken_over() -> bool:
        assert not a.m.owned() & b.m.owned(), "the dead member still counts itself owner"
        return b.m.owned() == frozenset(range(16))

    await until(taken_over, what="b to take a's buckets over")
    await b.m.stop(release=True)


async def test_a_paused_holder_stops_owning_before_the_taker_owns(group_nc, request) -> None:  # type: ignore[no-untyped-def]
    kv = f"grp-{abs(hash(request.node.name)) % 10**8}"
    a = Member(await group_nc(), "a", 2.0, kv)
    await a.start()
    await a.pause()  # holds 16 buckets, renews nothing (SIGSTOP)
    seen: list[tuple[int, bool]] = []

    async def on_gain(g: Mapping[int, int]) -> None:
        seen.extend((bucket, a.m.owns(bucket)) for bucket in g)  # at the very moment b takes it

    b = Member(await group_nc(), "b", 2.0, kv, gain=on_gain)
    await b.start()
    await until(lambda: b.m.owned() == frozenset(range(16)), what="b to take every bucket")
    assert len(seen) == 16
    assert not [bucket for bucket, a_owns in seen if a_owns], "a still counted itself owner"
    # a resumes: its first round finds its leases gone and reports them lost
    await a.m.round()
    assert a.m.owned() == frozenset()
    assert a.losses
    assert set().union(*a.losses) == set(range(16))
    await b.m.stop(release=True)


async def test_a_renewal_answered_after_the_lease_lapsed_does_not_take_it_up_again(group_nc, request) -> None:  # type: ignore[no-untyped-def]
    """A renewal request answered late (a NATS cluster electing leaders): meanwhile the lease
    lapsed on the holder's clock, so the member skipped the bucket's frames and changes. It
    does not go on holding it as if nothing happened (what it skipped would be judged by
    nobody): the bucket is lost, handed to ``on_loss``, released and taken anew under a newer
    fencing token (its consumer then redelivers what was left unacknowledged)."""
    kv = f"grp-{abs(hash(request.node.name)) % 10**8}"
    a = Member(await group_nc(), "a", 8.0, kv)
    await a.m.start()  # (no round loop: the test drives renewals and rounds)
    before = a.m.tokens()
    assert set(before) == set(range(16))
    a.m.held[3].valid_until = clock() + 0.2  # its earlier renewals failed: about to lapse here
    real = a.m._updates  # the leases' KV updates, all at once

    async def late(leases: list[Lease], value: bytes) -> dict[int, Answer]:
        answers = await real(leases, value)  # (renewed on the server) answered after the lapse here
        lease = a.m.held[3]
        await until(lambda: clock() >= lease.valid_until, what="bucket 3's lease to lapse here")
        return answers

    a.m._updates = late  # type: ignore[method-assign]
    await a.m.renew()
    assert not a.m.owns(3), "a lease that lapsed was taken up again by a late renewal"
    assert a.m.owned() == frozenset(range(16)) - {3}
    a.m._updates = real  # type: ignore[method-assign]
    await a.m.round()
    assert a.losses == [frozenset({3})]
    assert a.m.owns(3)
    assert a.m.tokens()[3] > before[3]
    await a.m.stop(release=True)


async def test_fencing_tokens(conn: asyncpg.Connection) -> None:
    assert await fence.take(conn, 3, 10, "a", group="g1")
    async with conn.transaction():
        await fence.check(conn, {3: 10}, group="g1")
    assert await fence.take(conn, 3, 12, "b", group="g1")
    assert not await fence.take(conn, 3, 11, "a", group="g1")  # never lowered
    with pytest.raises(fence.FencedError):
        async with conn.transaction():
            await fence.check(conn, {3: 10}, group="g1")
    rid = await conn.fetchval(
        "INSERT INTO notification_outbox (partition, channel, delivery_key, payload)"
        " VALUES (10003, 'hook', 'k1', '{}'::jsonb) RETURNING id"
    )
    assert not await fence.claim(conn, rid, 3, 10, "a", group="g1")
    assert await fence.claim(conn, rid, 3, 12, "b", group="g1")
    assert await conn.fetchval("SELECT claimed_by FROM notification_outbox WHERE id = $1", rid) == "b"


async def test_a_steps_outbox_rows_are_claimed_as_written_and_sent_without_another_round_trip(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """A member's step writes its outbox rows behind the fencing check, claimed by it under the
    bucket's token: the gate lets them go without asking PostgreSQL again (no pool here) while
    the bucket is held under that token; under a new token (lost and taken back meanwhile) the
    claim goes to PostgreSQL as for a row reloaded from another member."""
    held: dict[int, int] = {}
    scope = Scope(64, lambda b: b in held, lambda: dict(held))
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    store = GroupAlertStore(lambda: pool, scope, "g")
    store.member = "m1"
    try:
        await store.restore()
        host = "gpu-node-1"
        b = scope.bucket(host)
        assert b is not None
        assert await fence.take(conn, b, 5, "m1", group="g")
        held[b] = 5
        payload = {"labels": {"host": host, "provider": "p"}, "status": "firing"}
        (row,) = await store.save(Changes(deliveries=[("hook", "k1", payload)]), {})
        assert row.fenced == (b, 5)
        stored = await conn.fetchrow(
            "SELECT group_kv, claimed_by, claim_token FROM notification_outbox WHERE id = $1", row.id
        )
        assert tuple(stored) == ("g", "m1", 5)
        no_db = ScopeGate(scope, lambda: None, "m1", "g")
        assert await no_db.claim(row)
        held[b] = 6
        assert not await no_db.claim(row)  # to PostgreSQL now: no pool, refused
        assert not await ScopeGate(scope, lambda: pool, "m1", "g").claim(row)  # token 6 not taken yet
        assert await fence.take(conn, b, 6, "m1", group="g")
        assert await ScopeGate(scope, lambda: pool, "m1", "g").claim(row)
    finally:
        await pool.close()


async def test_two_groups_in_one_database_keep_their_own_fencing_tokens(conn: asyncpg.Connection) -> None:
    """Another group (another KV bucket) on the same bucket number neither lowers, raises nor
    fences this one's token, and neither group claims the other's notifications."""
    assert await fence.take(conn, 3, 50, "a", group="g1")
    assert await fence.take(conn, 3, 7, "x", group="g2")  # a smaller revision of its own KV bucket
    async with conn.transaction():
        await fence.check(conn, {3: 50}, group="g1")
        await fence.check(conn, {3: 7}, group="g2")
    with pytest.raises(fence.FencedError):
        async with conn.transaction():
            await fence.check(conn, {3: 7}, group="g1")
    rows = []
    for key, group in (("k-g1", "g1"), ("k-g2", "g2")):
        rid = await conn.fetchval(
            "INSERT INTO notification_outbox (partition, channel, delivery_key, payload)"
            " VALUES (10003, 'hook', $1, '{}'::jsonb) RETURNING id",
            key,
        )
        await fence.own(conn, [rid], group)
        rows.append(rid)
    assert not await fence.claim(conn, rows[1], 3, 50, "a", group="g1")  # g2's row
    assert not await fence.claim(conn, rows[0], 3, 7, "x", group="g2")  # g1's row
    assert await fence.claim(conn, rows[0], 3, 50, "a", group="g1")
    assert await fence.claim(conn, rows[1], 3, 7, "x", group="g2")
    got = await conn.fetch(
        "SELECT group_kv, member, token FROM group_fences WHERE bucket = 3 ORDER BY group_kv"
    )
    assert [tuple(r) for r in got] == [("g1", "a", 50), ("g2", "x", 7)]


async def test_stream_setup_is_retried_when_the_cluster_answers_late(
    tmp_path: Path, private_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members starting together update the stream at once; on a loaded cluster such an update
    outlasts the API timeout (seen with three members on a three-node cluster): the member retries
    instead of failing its start."""
    cfg = load_toml(tmp_path, "postgresql://127.0.0.1:1/none", private_nats.url, "")
    real = stream.partition
    calls = 0

    async def late_once(js: JetStreamContext, buckets: int) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise nats.errors.TimeoutError
        return await real(js, buckets)

    monkeypatch.setattr(stream, "partition", late_once)
    nc = await nats.connect(private_nats.url)
    try:
        ingest = Ingest(cfg, writer=None)  # type: ignore[arg-type]  # (setup writes nothing)
        await ingest.setup_group(nc, 64, lambda: dict.fromkeys(range(64), 1))
        assert calls == 2
        info = await nc.jetstream().stream_info(STREAM)
        assert info.config.subject_transform == bucket_transform(64)
    finally:
        await nc.close()


async def test_a_bucket_whose_consumer_cannot_be_bound_yet_is_bound_later_and_consumed(
    tmp_path: Path, private_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JetStream call of a bucket's start times out (as while a cluster elects a new leader
    after a node's loss): the bucket's task binds it later and pulls; before, the bucket stayed
    held by its lease and was never consumed."""
    cfg = load_toml(tmp_path, "postgresql://127.0.0.1:1/none", private_nats.url, "")
    nc = await nats.connect(private_nats.url)
    try:
        ingest = Ingest(cfg, writer=None)  # type: ignore[arg-type]  # (setup writes nothing)
        await ingest.setup_group(nc, 64, lambda: dict.fromkeys(range(64), 1))
        source = ingest.source
        assert source is not None
        real = source.js.consumer_info
        calls = 0

        async def late_once(*args: object, **kw: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise nats.errors.TimeoutError
            return await real(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(source.js, "consumer_info", late_once)
        await source.start(5)  # returns: the task retries
        subject = f"gpuwarden.v1.sample.p.{host_name_in_bucket(5)}"
        await nc.jetstream().publish(subject, b"x")
        msgs = await source.fetch(1, wait=30)
        assert [m.subject for m in msgs] == [f"{subject}.5"]
        assert calls >= 2
        await source.close()
    finally:
        await nc.close()


@pytest.mark.parametrize("taker", ["another member", "the same member"])
async def test_a_frame_whose_bucket_is_lost_before_it_is_judged_is_judged_by_the_next_holder(
    conn: asyncpg.Connection, pg_dsn: str, private_nats: NatsServer, taker: str
) -> None:
    """A member's lease on a bucket lapses while its batch is being written (its renewals fail
    while a NATS cluster elects new leaders): the frame is stored, then not judged there (a
    bucket no longer held is not judged, as in ``Alerting.on_frames``). The next holder of the
    bucket, another member or the same one taking it back, judges it. Before, the member
    acknowledged the batch all the same: the next holder's consumer had nothing in flight, so
    it was not recreated and the frame was never judged (one XID of 20 never paged, killing
    the stream leader's node under a group of three)."""
    cfg = ingest_config(pg_dsn, private_nats.url)
    host = host_name_in_bucket(5)
    ncs = [await nats.connect(private_nats.url) for _ in range(2)]
    held: dict[str, dict[int, int]] = {"a": {5: 10}, "b": {}}  # member -> bucket -> fencing token
    judged: dict[str, list[tuple[str, int]]] = {"a": [], "b": []}
    members: dict[str, Ingest] = {}
    for name, nc in zip(("a", "b"), ncs, strict=True):
        ingest = members[name] = Ingest(cfg, Writer(cfg.postgres))

        def judge(name: str) -> Callable[[Sequence[Frame]], Awaitable[None]]:
            async def on_batch(frames: Sequence[Frame]) -> None:  # judges the buckets it holds only
                judged[name] += [(f.host, f.seq) for f in frames if bucket_of(f.host, 64) in held[name]]

            return on_batch

        ingest.on_batch = judge(name)
        await ingest.setup_group(nc, 64, lambda name=name: dict(held[name]))  # type: ignore[misc]
    a, b = members["a"], members["b"]
    real_write = a.writer.write

    async def write_then_lapse(*args: Any, **kw: Any) -> WriteResult:
        result = await real_write(*args, **kw)
        held["a"].clear()  # the lease lapsed on a's clock meanwhile
        a.writer.write = real_write  # type: ignore[method-assign]  # (once)
        return result

    a.writer.write = write_then_lapse  # type: ignore[method-assign]
    try:
        assert a.source is not None
        assert b.source is not None
        await a.source.start(5)
        await ncs[0].jetstream().publish(event_subject("prov-a", host), encode(event(host, 1, time.time())))
        msgs = await a.source.fetch(10, wait=30)
        assert len(msgs) == 1
        await a.process(msgs)
        assert await conn.fetchval("SELECT count(*) FROM events") == 1  # stored ...
        assert judged["a"] == []  # ... not judged by the member that lost the bucket
        await a.source.stop(5)  # its loss handled (collector.group.member.GroupMember._loss)
        taker = b if taker == "another member" else a
        name = "b" if taker is b else "a"
        held[name][5] = 11  # taken (back): a newer fencing token
        assert taker.source is not None
        await taker.source.start(5)
        again = await taker.source.fetch(10, wait=10)
        assert [m.subject for m in again] == [m.subject for m in msgs], "the frame is not delivered again"
        await taker.process(again)
        assert judged[name] == [(host, 1)]
        assert await conn.fetchval("SELECT count(*) FROM events") == 1  # stored once
        assert taker.source.recreated == 1
    finally:
        for ingest in members.values():
            await ingest.close()
            await ingest.writer.close()
        for nc in ncs:
            await nc.close()


async def test_frames_stored_before_the_transform_are_moved_under_their_buckets(
    tmp_path: Path, pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    """Agents published before any group member started (or a collector ran alone before):
    the stream holds frames without a bucket token, which no bucket consumer reads. The group
    moves them under their buckets once, and every one is stored once."""
    cfg = write_config(tmp_path, pg_dsn, private_nats.url, "")
    cfg = dataclasses.replace(cfg, collector=dataclasses.replace(cfg.collector, group=True))
    nc = await nats.connect(private_nats.url)
    js = nc.jetstream()
    await stream.reconcile(js, cfg.nats)  # as an agent or a lone collector leaves it
    now = time.time()
    before = [sample(f"u-{h}", s, now - 60 + s) for h in range(8) for s in range(1, 11)]
    await publish(js, before)
    after = [sample(f"u-{h}", s, now - 60 + s) for h in range(8) for s in range(11, 16)]
    name = rebucket.consumer_name(cfg.collector.durable)
    try:
        async with collector(cfg):
            await until(lambda: _stored(conn, len(before)), 30, "the frames stored before the transform")
            await publish(js, after)  # stored under their bucket: read by the bucket consumers
            await until(lambda: _stored(conn, len(before) + len(after)), 30, "the frames after it")
        moved = await js.consumer_info(STREAM, name)
        assert (moved.delivered.stream_seq, moved.num_pending, moved.num_ack_pending) == (len(before), 0, 0)
        async with collector(cfg) as svc:  # a restart moves nothing again
            task = svc.ingest.unbucketed
            assert task is not None
            await until(task.done, 30, "the restarted member's look")
            assert task.result() == 0
        assert (await js.consumer_info(STREAM, name)).delivered.consumer_seq == len(before)
    finally:
        await nc.close()
    keys = await stored_keys(conn)
    assert set(keys) == {(f.host, f.seq) for f in before + after}
    assert set(keys.values()) == {1}  # nothing twice


async def _stored(conn: asyncpg.Connection, n: int) -> bool:
    return len(await stored_keys(conn)) >= n
