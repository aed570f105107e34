"""The fast event path (``[alerting] fast_events``): the engine runner's second input.

Event frames (XIDs and the like) are read as a core-NATS subscriber sees them, before the
ingest has stored them, checked like the ingest checks them (:func:`collector.ingest.check`),
kept to this partition's hosts and to ``[collector] host_rate`` (a clock of its own), and
handed to :meth:`collector.alerting.Alerting.judge_early`. The stored copy still reaches the
runner through the ingest and is recognised (per-boot seq), so nothing is judged twice.

Each frame is judged in a task of its own: the subscription hands over the next event as soon
as this one is handed to the runner, not once its step has been written (events close
together, an XID beside a throttle event, queued behind each other's writes for seconds on a
loaded machine). The tasks start in arrival order and take the runner's step lock in that
order, so events are judged in the order they came. At most ``MAX_IN_FLIGHT`` are judged at
once; beyond that an event is judged after the ingest has stored it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors

from collector.ingest import Limits, check
from collector.links import Nats
from collector.ratelimit import HostRateLimit
from collector.store.writer import Accepted
from shared.frames import Frame
from shared.subjects import PREFIX

MAX_IN_FLIGHT = 1024  # events being judged at once on the fast path


class FastEvents:
    def __init__(
        self,
        nats: Nats,
        limits: Callable[[], Limits],
        mine: Callable[[str], bool],
        judge: Callable[[Frame], Awaitable[None]],
        rate: HostRateLimit,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nats, self.limits, self.mine, self.judge = nats, limits, mine, judge
        self.rate, self.enabled, self.clock = rate, enabled, clock
        self._sub: Any = None
        self._judging: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        nc = self.nats.nc
        if self.enabled and nc is not None:
            self._sub = await nc.subscribe(f"{PREFIX}.event.>", cb=self.on_msg)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if self._judging:  # the events handed over are judged (and written) before the runner stops
            await asyncio.gather(*self._judging, return_exceptions=True)

    async def on_msg(self, msg: Any) -> None:
        item = check(msg.subject, msg.data, self.limits())
        if type(item) is not Accepted or not self.mine(item.frame.host):
            return  # the ingest counts rejections; other partitions judge their own hosts
        if not self.rate.allow(item.frame.host, self.clock()):
            return  # over [collector] host_rate: judged after it is stored, if the ingest takes it
        if len(self._judging) >= MAX_IN_FLIGHT:
            return  # judged after it is stored
        task = asyncio.ensure_future(self.judge(item.frame))  # not waiting for its step's write
        self._judging.add(task)
        task.add_done_callback(self._judging.discard)
