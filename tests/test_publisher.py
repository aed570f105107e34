"""Publisher against a real nats-server: subjects, acks, the replay buffer, outages, permissions."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import nats
import pytest
from nats.aio.msg import Msg

from agent.gpu.base import GpuEvent, Inventory
from agent.publisher import Publisher, StreamUnavailableError, backoff_delay
from agent.sampler import Deadlines, Sequencer, build_event, build_inventory, build_sample
from agent.service import AgentService
from gpuwarden.servers import NatsServer
from shared.config import AgentConfig, AgentSection, NatsConfig, NetworkChecksConfig, SimulateConfig
from shared.frames import EventFrame, GpuInfo, GpuSample, InventoryFrame, SampleFrame, decode, encode
from shared.subjects import STREAM
from tests.support.nats_frames import stream_frames
from tests.support.wait import until


def cfg(url: str, **kw: object) -> NatsConfig:
    base = {"servers": (url,), "reconnect_wait": 0.2, "reconnect_wait_max": 1.0, "publish_timeout": 1.0}
    base.update(kw)
    return NatsConfig(**base)  # type: ignore[arg-type]


def sample(seqr: Sequencer, gpus: int = 2) -> SampleFrame:
    return build_sample(
        seqr,
        interval_s=1.0,
        gpus=[GpuSample(index=i, uuid=f"GPU-{i}", temp_c=40.0 + i, power_w=100.0) for i in range(gpus)],
    )


def send(pub: Publisher, seqr: Sequencer, frame: SampleFrame | EventFrame | InventoryFrame) -> None:
    pub.publish(seqr.subject(frame.kind), encode(frame), urgent=frame.kind == "event")


def unique_host() -> str:
    return f"h-{uuid.uuid4().hex[:10]}"


def test_backoff_is_jittered_and_capped() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 4.0, rng) for a in range(10)]
    assert all(0.25 <= d <= 4.0 for d in delays)
    assert delays[0] <= 0.5
    assert delays[-1] >= 2.0
    assert len(set(delays)) == len(delays)


def test_deadlines_skip_missed_ticks_without_drift() -> None:
    d = Deadlines(1.0, start=100.0, clock=lambda: 100.0)
    assert d.advance(100.2) == 101.0
    assert d.advance(103.5) == 104.0  # 102 and 103 skipped
    assert d.missed == 2
    assert d.advance(104.0001) == 105.0


async def test_frames_round_trip_on_their_subjects(nats_url: str) -> None:
    url = nats_url
    host = unique_host()
    seqr = Sequencer(host=f"{host}.x", provider="acme east")
    tap = await nats.connect(url)
    got: list[tuple[str, bytes]] = []

    async def on_msg(m: Msg) -> None:
        got.append((m.subject, m.data))

    await tap.subscribe("gpuwarden.v1.>", cb=on_msg)
    await tap.flush()
    pub = Publisher(cfg(url), name="test")
    await pub.start(wait=True)
    inv = build_inventory(
        seqr, Inventory("simulated", "550.1", "12.4", "12.550", (GpuInfo(index=0, uuid="GPU-0"),))
    )
    smp = sample(seqr)
    ev = build_event(seqr, GpuEvent(type="xid", ts=1.7e9, source="simulated", gpu_index=0, xid=79), count=1)
    for f in (inv, smp, ev):
        send(pub, seqr, f)
    assert await pub.flush(5)
    await tap.flush()
    await until(lambda: len(got) == 3, 5, "the three frames tapped")
    await tap.close()
    await pub.close()
    by_subject = {s: decode(d) for s, d in got}
    assert by_subject == {
        f"gpuwarden.v1.inventory.acme_east.{host}_x": inv,
        f"gpuwarden.v1.sample.acme_east.{host}_x": smp,
        f"gpuwarden.v1.event.acme_east.{host}_x": ev,
    }
    assert [f.seq for f in (inv, smp, ev)] == [1, 2, 3]
    assert pub.stats.published == 3
    assert pub.stats.dropped == 0
    assert pub.stats.publish_errors == 0
    stored = await stream_frames(url, f"{host}_x")
    assert sorted(f.seq for f in stored) == [1, 2, 3]


async def test_buffer_keeps_newest_and_counts_drops_before_connecting(nats_url: str) -> None:
    seqr = Sequencer(host=unique_host(), provider="p")
    pub = Publisher(cfg(nats_url, buffer_frames=3), name="test")
    frames = [sample(seqr) for _ in range(10)]
    for f in frames:
        send(pub, seqr, f)
    assert pub.buffered == 3
    assert pub.stats.dropped == 7
    await pub.start(wait=True)
    assert await pub.flush(5)
    await pub.close()
    assert [f.seq for f in await stream_frames(nats_url, seqr.host)] == [8, 9, 10]


async def test_events_overtake_queued_samples_and_are_dropped_last(nats_url: str) -> None:
    seqr = Sequencer(host=unique_host(), provider="p")
    pub = Publisher(cfg(nats_url, buffer_frames=4), name="test")
    ev = build_event(seqr, GpuEvent(type="gpu_lost", ts=1.7e9, source="simulated", gpu_index=1), count=1)
    send(pub, seqr, ev)
    for _ in range(6):
        send(pub, seqr, sample(seqr))
    assert pub.stats.dropped == 3  # three oldest samples, never the event
    await pub.start(wait=True)
    assert await pub.flush(5)
    await pub.close()
    assert [f.seq for f in await stream_frames(nats_url, seqr.host)] == [1, 5, 6, 7]


async def test_replayed_frame_carries_no_message_id_and_is_kept(nats_url: str) -> None:
    """No Nats-Msg-Id (an id another agent could send would suppress the frame, docs/protocol.md):
    a replay after a lost ack is stored twice in the stream; the collector stores it once."""
    seqr = Sequencer(host=unique_host(), provider="p")
    pub = Publisher(cfg(nats_url), name="test")
    await pub.start(wait=True)
    f = sample(seqr)
    send(pub, seqr, f)
    send(pub, seqr, f)  # what a replay after a lost ack looks like
    assert await pub.flush(5)
    await pub.close()
    assert pub.stats.published == 2
    assert [x.seq for x in await stream_frames(nats_url, seqr.host)] == [1, 1]
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(f"gpuwarden.v1.*.*.{seqr.host}", stream=STREAM)
        msgs = await sub.fetch(2, timeout=5)
        assert [(m.headers or {}).get("Nats-Msg-Id") for m in msgs] == [None, None]
    finally:
        await nc.close()


async def test_missing_stream_is_a_clear_error_when_creation_is_off(private_nats: NatsServer) -> None:
    pub = Publisher(cfg(private_nats.url, create_stream=False), name="test")
    with pytest.raises(StreamUnavailableError, match="does not exist"):
        await pub.start(wait=True)
    await pub.close()


async def test_outage_replays_every_frame_once_or_counts_drops_exactly(private_nats: NatsServer) -> None:
    """NATS down for 20 s: a big buffer loses nothing, a small one drops exactly what it counts.

    A real agent (simulated GPUs, 0.25 s ticks, poll replies, RTT checks) rides the same
    outage with a big buffer: every one of its sequence numbers ends up in the stream once.
    """
    agent = AgentService(
        AgentConfig(
            agent=AgentSection(host="agent", provider="p", interval=0.25, kmsg=False),
            nats=cfg(private_nats.url, buffer_frames=10_000),
            network=NetworkChecksConfig(),
            simulate=SimulateConfig(gpus=2),
        )
    )
    agent_task = asyncio.create_task(agent.serve(signals=False))
    big_seq, small_seq = Sequencer(host="big", provider="p"), Sequencer(host="small", provider="p")
    big = Publisher(cfg(private_nats.url, buffer_frames=10_000), name="big")
    small = Publisher(cfg(private_nats.url, buffer_frames=5), name="small")
    await big.start(wait=True)
    await small.start(wait=True)
    running = asyncio.Event()
    running.set()

    async def produce() -> None:
        while True:
            await running.wait()
            send(big, big_seq, sample(big_seq))
            send(small, small_seq, sample(small_seq))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(produce())
    await until(lambda: big_seq.seq >= 15)  # some frames sent while NATS is up
    running.clear()  # no frame in flight at the cut: its fate would be ambiguous to anyone
    assert await big.flush(5)
    assert await small.flush(5)
    # on a loaded machine the 5-frame buffer may already have overflowed while acks lagged: those
    # drops are counted too, and only what was dropped during the outage must be its oldest
    cut_seq, dropped_before = small_seq.seq, small.stats.dropped
    private_nats.stop()
    cut = asyncio.get_running_loop().time()
    running.set()
    # the outage lasts 20 s (its reports are checked below) and until the buffers hold what the
    # checks need, counted in frames, so a slow machine makes the same test
    await until(
        lambda: (
            asyncio.get_running_loop().time() - cut >= 20.5
            and big.buffered > 150
            and small.stats.dropped > 150
            and agent.publisher.buffered > 60
        ),
        timeout=120,
    )
    assert not big.connected
    assert big.buffered > 150
    assert small.buffered == 5
    assert agent.publisher.buffered > 60
    private_nats.start()
    assert await big.wait_connected(15)
    assert await small.wait_connected(15)
    back = big_seq.seq
    await until(lambda: big_seq.seq >= back + 15)  # and some more after it is back
    task.cancel()
    assert await big.flush(10)
    assert await small.flush(10)
    await big.close()
    await small.close()
    assert await agent.publisher.wait_connected(5)
    agent.stop()
    await agent_task

    big_seqs = [f.seq for f in await stream_frames(private_nats.url, "big")]
    small_seqs = [f.seq for f in await stream_frames(private_nats.url, "small")]
    assert sorted(big_seqs) == list(range(1, big_seq.seq + 1))
    assert big_seqs == sorted(big_seqs)  # one sender: replayed oldest first, in order
    assert big.stats.dropped == 0
    assert big.stats.disconnects == 1
    assert big.stats.reconnects == 1
    assert len(set(small_seqs)) == len(small_seqs)
    assert small.stats.dropped > 150
    assert len(small_seqs) + small.stats.dropped == small_seq.seq
    missing = sorted(set(range(1, small_seq.seq + 1)) - set(small_seqs))
    assert len([s for s in missing if s <= cut_seq]) == dropped_before
    lost = [s for s in missing if s > cut_seq]
    assert lost == list(range(lost[0], lost[0] + len(lost)))  # the oldest of the outage
    agent_frames = await stream_frames(private_nats.url, "agent")
    assert sorted(f.seq for f in agent_frames) == list(range(1, agent.seqr.seq + 1))
    assert agent.publisher.stats.dropped == 0
    assert agent.publisher.stats.reconnects == 1
    assert agent_frames[0].kind == "inventory"
    # each publisher reports its outage once: how long, what it buffered and what it dropped
    assert big.outages == small.outages == agent.publisher.outages == 1
    assert big.last_outage is not None
    assert small.last_outage is not None
    assert big.last_outage.until - big.last_outage.since >= 20
    assert big.last_outage.buffered_frames > 150
    assert big.last_outage.dropped_frames == 0
    assert small.last_outage.dropped_frames == small.stats.dropped
    assert small.last_outage.buffered_frames == 5
    reports = [f for f in agent_frames if isinstance(f, SampleFrame) and f.outage is not None]
    assert len(reports) == 1  # the agent's first sample built after NATS came back carries it
    report = reports[0].outage
    assert report is not None
    assert report.until - report.since >= 20
    assert report.buffered_frames > 60
    assert report.dropped_frames == 0
    assert report.since <= reports[0].ts
    assert report.until <= reports[0].ts
    gap = [f for f in agent_frames if f.kind == "sample" and report.since < f.ts < report.until]
    assert len(gap) >= report.buffered_frames - 10  # the buffered samples were replayed (and stored)


PERMS = """
authorization {
  users = [
    {user: agent, password: secret, permissions: {
      publish: {allow: ["gpuwarden.v1.sample.>", "$JS.API.>"]},
      subscribe: {allow: ["_INBOX.>"]}}}
  ]
}
"""


async def test_permission_violation_is_counted_not_retried() -> None:
    from shared.config import Secret

    with NatsServer(config=PERMS) as server:
        c = dataclasses.replace(cfg(server.url, user="agent"), password=Secret("secret"), publish_timeout=0.5)
        pub = Publisher(c, name="test", deny_retry_s=60)
        await pub.start(wait=True)
        seqr = Sequencer(host=unique_host(), provider="p")
        ev = build_event(
            seqr, GpuEvent(type="xid", ts=1.7e9, source="simulated", gpu_index=0, xid=13), count=1
        )
        send(pub, seqr, ev)
        assert await pub.flush(5)
        send(
            pub, seqr, build_event(seqr, GpuEvent(type="xid", ts=1.7e9, source="simulated", xid=13), count=2)
        )
        for _ in range(3):
            send(pub, seqr, sample(seqr))
        assert await pub.flush(5)
        await pub.close()
        assert pub.stats.permission_errors == 2
        assert pub.stats.published == 3
        assert pub.stats.publish_errors == 0


async def test_stream_lost_by_the_server_is_created_again(private_nats: NatsServer) -> None:
    seqr = Sequencer(host=unique_host(), provider="p")
    pub = Publisher(cfg(private_nats.url), name="test")
    await pub.start(wait=True)
    send(pub, seqr, sample(seqr))
    assert await pub.flush(5)
    nc = await nats.connect(private_nats.url)
    await nc.jetstream().delete_stream(STREAM)
    await nc.close()
    send(pub, seqr, sample(seqr))
    assert await pub.flush(10)
    await pub.close()
    assert pub.stats.publish_errors == 1
    assert [f.seq for f in await stream_frames(private_nats.url, seqr.host)] == [2]


async def test_buffer_is_bounded_in_bytes_and_the_drops_are_published_after_an_outage(
    private_nats: NatsServer,
) -> None:
    """A real agent rides a NATS outage with a 40 KB buffer: the buffer never holds more bytes
    than that, every frame dropped is counted, and the first sample after NATS is back carries
    the count, which equals the gap in the sequence numbers the stream got."""
    limit = 40_000
    agent = AgentService(
        AgentConfig(
            agent=AgentSection(host=unique_host(), provider="p", interval=0.1, kmsg=False, poll=False),
            nats=cfg(private_nats.url, buffer_frames=10_000, buffer_bytes=limit),
            network=NetworkChecksConfig(nats_rtt=False),
            simulate=SimulateConfig(gpus=8),
        )
    )
    pub = agent.publisher
    task = asyncio.create_task(agent.serve(signals=False))
    try:
        await until(lambda: pub.stats.published >= 3, 60, "the first frames")
        private_nats.stop()
        peak = 0

        def overflowed() -> bool:
            nonlocal peak
            peak = max(peak, pub.buffered_bytes)
            return pub.stats.dropped >= 20

        await until(overflowed, 60, "the buffer to overflow")
        assert 0 < peak <= limit
        assert pub.stats.dropped_bytes > 0
        private_nats.start()
        await until(lambda: pub.stats.reconnects == 1 and pub.buffered == 0, 60, "the replay")
        dropped = pub.stats.dropped
        published = pub.stats.published
        await until(lambda: pub.stats.published >= published + 3, 60, "samples after the outage")
    finally:
        agent.stop()
        await task
    assert pub.stats.dropped == dropped  # nothing dropped once NATS was back
    frames = await stream_frames(private_nats.url, agent.seqr.host)
    seqs = [f.seq for f in frames]
    missing = set(range(1, agent.seqr.seq + 1)) - set(seqs)
    assert len(missing) == dropped
    reported = [f.agent.dropped_frames for f in frames if isinstance(f, SampleFrame) and f.agent]
    assert max(reported) == dropped  # the collector learns the size of the gap from the agent
