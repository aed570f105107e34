"""``gpuwarden fleet`` in process: many simulated hosts over one connection, against real NATS."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import nats
import pytest
from nats.aio.msg import Msg

from agent.fleet import Fleet, host_name
from shared.config import NatsConfig
from shared.errors import FaultSpecError
from shared.frames import EventFrame, InventoryFrame, SampleFrame, decode
from shared.subjects import STREAM
from tests.support.wait import until


async def test_fleet_publishes_every_hosts_frames(nats_url: str) -> None:
    hosts, gpus, interval = 24, 2, 0.5
    got: list[SampleFrame | EventFrame | InventoryFrame] = []
    wrong_subject: list[str] = []
    nc = await nats.connect(nats_url)

    async def on_msg(msg: Msg) -> None:
        f = decode(msg.data)
        got.append(f)
        if msg.subject != f"gpuwarden.v1.{f.kind}.{f.provider}.{f.host}":
            wrong_subject.append(msg.subject)

    await nc.subscribe("gpuwarden.v1.>", cb=on_msg)
    await nc.flush()
    js = nc.jetstream()
    before = (await js.stream_info(STREAM)).state.messages if await _has_stream(js) else 0
    fleet = Fleet(
        NatsConfig(servers=(nats_url,)),
        hosts=hosts,
        gpus=gpus,
        providers=3,
        interval=interval,
        faults=("host-0003/gpu1:xid=48@0.3s", "host-0005:host_down@0s"),
        seed=1,
        workers=32,
    )
    await fleet.start()
    await fleet.run(duration=1.6)
    await fleet.close()
    ours = {h.seqr.boot_id for h in fleet.hosts}
    published = fleet.summary()["published"]
    await until(
        lambda: sum(1 for f in got if f.boot_id in ours) >= published, 30, "every published frame tapped"
    )
    after = (await js.stream_info(STREAM)).state.messages
    await nc.close()

    frames: dict[str, list[SampleFrame | EventFrame | InventoryFrame]] = defaultdict(list)
    for f in got:
        if f.boot_id in ours:
            frames[f.host].append(f)
    summary = fleet.summary()
    assert summary["published"] == summary["samples"] + summary["events"] + summary["inventories"]
    assert summary["dropped"] == 0
    assert summary["unsent"] == 0
    assert after - before == summary["published"]
    assert wrong_subject == []
    assert set(frames) == {host_name(i) for i in range(hosts)} - {"host-0005"}
    for h, fs in frames.items():
        seqs = [f.seq for f in fs]
        assert len(set(seqs)) == len(seqs)
        assert fs[0].kind == "inventory"
        assert {f.boot_id for f in fs} == {fs[0].boot_id}
        samples = [f for f in fs if isinstance(f, SampleFrame)]
        # 1.6 s at 0.5 s: 3 or 4 by each host's slot; fewer only by ticks skipped (counted) when the
        # loop fell more than an interval behind
        assert 3 - fleet.stats.skipped_ticks <= len(samples) <= 5, h
        assert all(len(s.gpus) == gpus for s in samples)
        assert fs[0].provider == f"provider-{int(h[-4:]) % 3}"
    events = [f for f in frames["host-0003"] if isinstance(f, EventFrame)]
    assert [(e.type, e.xid, e.gpu_index, e.count) for e in events] == [("xid", 48, 1, 1)]
    assert len({f.boot_id for fs in frames.values() for f in fs}) == hosts - 1


async def test_a_loop_woken_past_the_end_still_makes_or_counts_every_tick_due_before_it(
    nats_url: str,
) -> None:
    """A starved event loop wakes the fleet after its end: every tick due before the end is made
    or counted as skipped (more than an interval late), none dropped unsaid (before, the loop
    stopped at once and a host sampled one time fewer than its slot gave, uncounted)."""
    hosts, interval, duration = 10, 0.5, 1.0
    fleet = Fleet(NatsConfig(servers=(nats_url,)), hosts=hosts, gpus=1, interval=interval, seed=2)
    await fleet.start()

    async def starve() -> None:
        await until(lambda: fleet.stats.samples >= 3, 30, "the fleet ticking")
        time.sleep(1.0)  # noqa: ASYNC251 (the fault injected: the event loop blocked past the end)

    blocker = asyncio.create_task(starve())
    await fleet.run(duration=duration)
    await blocker
    await fleet.close()
    slot = interval / hosts
    due = sum(1 for g in range(hosts * 10) if g * slot < duration)
    assert fleet.stats.samples + fleet.stats.skipped_ticks == due
    assert fleet.stats.skipped_ticks > 0  # (the block did starve it: the figure is not vacuous)


async def _has_stream(js: nats.js.JetStreamContext) -> bool:
    try:
        await js.stream_info(STREAM)
    except nats.js.errors.NotFoundError:
        return False
    return True


def test_fleet_rejects_bad_fault_spec() -> None:
    with pytest.raises(FaultSpecError):
        Fleet(NatsConfig(), hosts=2, gpus=1, faults=("host-0001:nonsense@1s",))
