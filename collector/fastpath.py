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

The subscription has a NATS connection of its own (``own``, named ``...-events``): on the
ingest's connection an event's bytes queue in the same socket behind whatever batch of
samples JetStream is sending for the ingest's fetch (a megabyte at 1,000 frames), read and
parsed a slice per turn of a busy event loop. Its own socket is read as soon as the event
arrives. If that connection cannot be made at start, the path shares the ingest's (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors

from collector.ingest import Limits, check
from collector.links import Nats
from collector.ratelimit import HostRateLimit
from collector.store.writer import Accepted
from shared.errors import ServiceUnavailableError
from shared.frames import Frame
from shared.subjects import PREFIX

log = logging.getLogger(__name__)
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
        own: Nats | None = None,
    ) -> None:
        self.nats, self.limits, self.mine, self.judge = nats, limits, mine, judge
        self.rate, self.enabled, self.clock = rate, enabled, clock
        self.own = own  # the path's own connection (started and stopped here), or None: the ingest's
        self._sub: Any = None
        self._judging: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        if not self.enabled:
            return
        nc = None
        if self.own is not None:
            try:
                await self.own.start()
                nc = self.own.nc
            except ServiceUnavailableError as e:
                log.warning("fast event path: no NATS connection of its own (%s); sharing the ingest's", e)
        if nc is None:
            nc = self.nats.nc
        if nc is not None:
            self._sub = await nc.subscribe(f"{PREFIX}.event.>", cb=self.on_msg)
            # the server has the subscription when start returns: an event published on another
            # connection right after is not missed by this path (it still comes through ingest)
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await nc.flush(timeout=5)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if self._judging:  # the events handed over are judged (and written) before the runner stops
            await asyncio.gather(*self._judging, return_exceptions=True)
        if self.own is not None:
            await self.own.stop()

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
