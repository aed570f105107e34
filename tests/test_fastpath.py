"""The fast event path (collector.fastpath.FastEvents) on its own: frames as a core-NATS
subscriber hands them over, a judge that takes as long as it likes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

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
