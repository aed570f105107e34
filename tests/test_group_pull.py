"""Collector group: how a member pulls the buckets it holds (collector.group.consumers), on a real
nats-server: long pull requests topped up per half window, not a request per message; what
happens when a bucket's consumer is recreated or deleted under the puller, or NATS restarts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from collector.group.consumers import HEARTBEAT, BucketConsumers, consumer_name
from collector.ingest import Ingest
from gpuwarden.servers import NatsServer
from shared.subjects import STREAM
from tests.support.collector import load_toml
from tests.support.group import host_name_in_bucket
from tests.support.wait import until

Conns = tuple[NatsClient, NatsClient]


async def group_source(tmp_path: Path, nc: NatsClient) -> BucketConsumers:
    cfg = load_toml(tmp_path, "postgresql://127.0.0.1:1/none", None, "")
    ingest = Ingest(cfg, writer=None)  # type: ignore[arg-type]  # (setup writes nothing)
    await ingest.setup_group(nc, 64, lambda: dict.fromkeys(range(64), 1))
    assert ingest.source is not None
    return ingest.source


@pytest.fixture
async def conns(private_nats: NatsServer) -> AsyncIterator[Conns]:
    """The member's connection and a publisher's."""
    member, publisher = await nats.connect(private_nats.url), await nats.connect(private_nats.url)
    yield member, publisher
    await member.close()
    await publisher.close()


async def publish(nc: NatsClient, bucket: int, payload: bytes) -> str:
    subject = f"gpuwarden.v1.sample.p.{host_name_in_bucket(bucket)}"
    await nc.jetstream().publish(subject, payload)
    return f"{subject}.{bucket}"


async def take(source: BucketConsumers, n: int, within: float) -> list[Msg]:
    """``n`` messages fetched (fails after ``within`` s)."""
    got: list[Msg] = []
    deadline = time.monotonic() + within
    while len(got) < n and time.monotonic() < deadline:
        got += await source.fetch(n - len(got), wait=max(deadline - time.monotonic(), 0.01))
    assert len(got) == n, f"{len(got)} of {n} messages in {within:g} s"
    return got


async def test_frames_trickling_into_many_buckets_cost_no_request_each(tmp_path: Path, conns: Conns) -> None:
    """Eight buckets held, five frames each arriving one at a time (as a fleet's do, a few a
    second per bucket): every one arrives, in order per bucket, and the member sends no pull
    request per frame (before: nats-py's ``fetch`` per bucket and frame, two requests each)."""
    member, publisher = conns
    source = await group_source(tmp_path, member)
    try:
        buckets = range(1, 9)
        for b in buckets:
            await source.start(b)
        sent_before = member.stats["out_msgs"]
        expected: list[tuple[str, bytes]] = []
        got: list[Msg] = []
        for i in range(5):
            for b in buckets:
                expected.append((await publish(publisher, b, f"{b}:{i}".encode()), f"{b}:{i}".encode()))
                got += await take(source, 1, within=10)
        assert sorted((m.subject, m.data) for m in got) == sorted(expected)
        for b in buckets:  # in order per bucket
            mine = [m.data for m in got if m.subject.endswith(f".{b}")]
            assert mine == [f"{b}:{i}".encode() for i in range(5)]
        sent = member.stats["out_msgs"] - sent_before
        assert sent <= len(buckets), f"{sent} messages sent by the member for 40 frames"
        assert all(st.asked + st.buffered <= source.window for st in source.pulls.values())
    finally:
        await source.close()


async def test_a_consumer_recreated_at_its_floor_under_the_puller_keeps_delivering(
    tmp_path: Path, conns: Conns
) -> None:
    """The bucket's consumer is recreated at its floor (as a taker does when it had a message in
    flight) while this member's pull requests wait on it: the server tells the waiting requests
    the consumer was deleted, and the member asks the new consumer at once (not after missed
    heartbeats, ``2 x HEARTBEAT``): the message in flight comes again, then the next one."""
    member, publisher = conns
    source = await group_source(tmp_path, member)
    js = publisher.jetstream()
    try:
        await source.start(5)
        first = await publish(publisher, 5, b"1")
        [m1] = await take(source, 1, within=10)
        assert m1.subject == first  # delivered, not acknowledged
        info = await js.consumer_info(STREAM, consumer_name(source.cfg.collector.durable, 5))
        assert info.num_ack_pending == 1
        await js.delete_consumer(STREAM, info.name)
        await js.add_consumer(STREAM, source.config(5, info.ack_floor.stream_seq + 1))
        await publish(publisher, 5, b"2")
        t0 = time.monotonic()
        again = await take(source, 2, within=HEARTBEAT)
        assert [m.data for m in again] == [b"1", b"2"]
        assert time.monotonic() - t0 < HEARTBEAT
    finally:
        await source.close()


async def test_a_consumer_deleted_under_the_puller_is_created_again(tmp_path: Path, conns: Conns) -> None:
    """The bucket's consumer is deleted and nobody recreates it: the member's request finds no
    consumer (no responders) and the member binds it again (created anew), then pulls."""
    member, publisher = conns
    source = await group_source(tmp_path, member)
    try:
        await source.start(7)
        await publish(publisher, 7, b"1")
        [m1] = await take(source, 1, within=10)
        await m1.ack_sync()
        await publisher.jetstream().delete_consumer(STREAM, consumer_name(source.cfg.collector.durable, 7))
        await publish(publisher, 7, b"2")
        got: list[bytes] = []

        async def arrived() -> bool:
            got.extend(m.data for m in await source.fetch(10, wait=0.2))
            return b"2" in got

        await until(arrived, timeout=2 * HEARTBEAT, what="the frame after the consumer's deletion")
        info = await publisher.jetstream().consumer_info(
            STREAM, consumer_name(source.cfg.collector.durable, 7)
        )
        assert info.config.filter_subject == "gpuwarden.v1.*.*.*.7"
    finally:
        await source.close()


async def test_pulls_are_asked_again_after_nats_restarts(
    tmp_path: Path, conns: Conns, private_nats: NatsServer
) -> None:
    """nats-server restarts (its stream and consumers on disk): the pull requests waiting on it
    are gone; the member asks again once reconnected, not only after missed heartbeats."""
    member, publisher = conns
    source = await group_source(tmp_path, member)
    try:
        for b in (2, 3):
            await source.start(b)
        await publish(publisher, 2, b"before")
        await take(source, 1, within=10)
        private_nats.stop()
        private_nats.start()
        await until(lambda: member.is_connected and publisher.is_connected, timeout=30, what="reconnected")

        async def published() -> bool:  # (JetStream answers once it has recovered its streams)
            try:
                await publish(publisher, 3, b"after")
            except nats.errors.Error:
                return False
            return True

        await until(published, timeout=30, what="a frame stored after the restart")
        t0 = time.monotonic()
        [m] = await take(source, 1, within=2 * HEARTBEAT)
        assert m.data == b"after"
        assert time.monotonic() - t0 < HEARTBEAT
    finally:
        await source.close()


async def test_a_member_lingers_for_its_share_of_the_buckets(tmp_path: Path, conns: Conns) -> None:
    """A member holding a third of the buckets reads about a third of the frames: it lingers
    about three times ``linger`` for a batch, so that the group commits about as often as one
    collector (each member committing as often as one collector multiplied the transactions by
    the members: 25 commits/s with three against 9 with one, bench/group_scale.py); never more
    than ``fetch_timeout``, and a group of one lingers as one collector."""
    member, _ = conns
    cfg = load_toml(tmp_path, "postgresql://127.0.0.1:1/none", None, 'linger = "10ms"')  # fetch_timeout 100ms
    held: dict[int, int] = dict.fromkeys(range(64), 1)
    ingest = Ingest(cfg, writer=None)  # type: ignore[arg-type]  # (setup writes nothing)
    assert ingest.linger() == pytest.approx(0.01)  # not a group member
    await ingest.setup_group(member, 64, lambda: held)
    try:
        assert ingest.linger() == pytest.approx(0.01)
        held = dict.fromkeys(range(21), 1)
        assert ingest.linger() == pytest.approx(0.01 * 64 / 21)
        held = {3: 1}
        assert ingest.linger() == pytest.approx(cfg.collector.fetch_timeout)
    finally:
        await ingest.close()
