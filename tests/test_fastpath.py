"""The fast event path (collector.fastpath.FastEvents) on its own: frames as a core-NATS
subscriber hands them over, a judge that takes as long as it likes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from collector.fastpath import FastEvents
from collector.ingest import Limits
from collector.ratelimit import HostRateLimit
from shared.frames import Frame, encode
from shared.subjects import event_subject
from tests.support.records import event
from tests.support.wait import until


@dataclass
class Msg:
    subject: str
    data: bytes


class NoNats:
    nc = None


def msg(host: str, seq: int) -> Msg:
    return Msg(event_subject("prov-a", host), encode(event(host, seq, time.time())))


async def test_an_event_is_not_held_up_by_the_judging_of_the_one_before() -> None:
    """The first event's step is slow (its write waits for PostgreSQL); the next event is
    handed over at once all the same, and both were handed over in arrival order."""
    gate = asyncio.Event()
    judged: list[str] = []

    async def judge(frame: Frame) -> None:
        judged.append(frame.host)
        if frame.host == "slow":
            await gate.wait()

    now = time.time()
    fe = FastEvents(
        NoNats(),  # type: ignore[arg-type]
        lambda: Limits(1 << 20, now - 86400, now + 86400),
        lambda host: True,
        judge,
        HostRateLimit(0, 1),
    )
    await asyncio.wait_for(fe.on_msg(msg("slow", 1)), 5)
    await asyncio.wait_for(fe.on_msg(msg("next", 1)), 5)
    await until(lambda: judged == ["slow", "next"], timeout=5, what="both events handed over")
    gate.set()
    await asyncio.wait_for(fe.stop(), 5)  # (waits for the events being judged)


def linked(shared: Any, own: Any) -> tuple[FastEvents, list[str]]:
    """A path on NATS links ``shared`` (the ingest's) and ``own``; the hosts it judged."""
    judged: list[str] = []

    async def judge(frame: Frame) -> None:
        judged.append(frame.host)

    now = time.time()
    limits = Limits(1 << 20, now - 86400, now + 86400)
    return FastEvents(shared, lambda: limits, lambda host: True, judge, HostRateLimit(0, 1), own=own), judged


async def test_events_come_over_a_connection_of_the_paths_own(nats_url: str) -> None:
    """The path subscribes on a NATS connection of its own (``...-events``), not the ingest's,
    where an event would queue behind the samples JetStream sends for a fetch; it is closed
    when the path stops."""
    from collector.links import Nats
    from tests.support.records import make_config

    cfg = make_config("postgresql://unused", **{"nats.servers": [nats_url]})
    shared, own = Nats(cfg), Nats(cfg, "events")
    await shared.start()
    fe, judged = linked(shared, own)
    try:
        await fe.start()
        assert own.nc is not None
        assert own.nc is not shared.nc
        assert own.name.endswith("-events")
        assert shared.nc is not None
        assert not shared.nc._subs
        m = msg("h-01", 1)
        await shared.nc.publish(m.subject, m.data)
        await until(lambda: judged == ["h-01"], timeout=10, what="the event judged")
        await fe.stop()
        assert own.nc.is_closed
        assert not shared.nc.is_closed
    finally:
        await fe.stop()
        await shared.stop()


async def test_without_a_connection_of_its_own_the_path_shares_the_ingests(nats_url: str) -> None:
    """Its own connection cannot be made at start: the path subscribes on the ingest's (fail-open)."""
    from collector.links import Nats
    from shared.errors import ServiceUnavailableError
    from tests.support.records import make_config

    class Unreachable:
        nc = None
        stopped = False

        async def start(self) -> None:
            raise ServiceUnavailableError("cannot reach NATS: refused")

        async def stop(self) -> None:
            self.stopped = True

    shared, own = Nats(make_config("postgresql://unused", **{"nats.servers": [nats_url]})), Unreachable()
    await shared.start()
    fe, judged = linked(shared, own)
    try:
        await fe.start()
        assert shared.nc is not None
        assert shared.nc._subs
        m = msg("h-02", 1)
        await shared.nc.publish(m.subject, m.data)
        await until(lambda: judged == ["h-02"], timeout=10, what="the event judged")
    finally:
        await fe.stop()
        await shared.stop()
    assert own.stopped
