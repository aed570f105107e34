"""The fast event path (``[alerting] fast_events``): the engine runner's second input.

Event frames (XIDs and the like) are read as a core-NATS subscriber sees them, before the
ingest has stored them, checked like the ingest checks them (:func:`collector.ingest.check`),
kept to this partition's hosts and to ``[collector] host_rate`` (a clock of its own), and
handed to :meth:`collector.alerting.Alerting.judge_early`. The stored copy still reaches the
runner through the ingest and is recognised (per-boot seq), so nothing is judged twice.
"""

from __future__ import annotations

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

    async def start(self) -> None:
        nc = self.nats.nc
        if self.enabled and nc is not None:
            self._sub = await nc.subscribe(f"{PREFIX}.event.>", cb=self.on_msg)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def on_msg(self, msg: Any) -> None:
        item = check(msg.subject, msg.data, self.limits())
        if type(item) is not Accepted or not self.mine(item.frame.host):
            return  # the ingest counts rejections; other partitions judge their own hosts
        if not self.rate.allow(item.frame.host, self.clock()):
            return  # over [collector] host_rate: judged after it is stored, if the ingest takes it
        await self.judge(item.frame)
