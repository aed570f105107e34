"""The collector-group part (:mod:`collector.wiring` puts it in the lifecycle after the runner):
joins the group, and as leases move raises fencing tokens, regroups the engine runner and
starts or stops the buckets' consumers. See docs/operations.md, "Collector group"."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg
from nats.aio.client import Client as NatsClient

from collector.config import CollectorConfig
from collector.group import fence
from collector.group.consumers import BucketConsumers
from collector.group.lease import Membership
from collector.group.store import GroupAlertStore, Reload
from collector.store import db
from shared.ratelog import RateLimitedLog
from shared.tasks import cancel_all

log = logging.getLogger(__name__)


class _Runner(Protocol):
    async def regroup(self, reload: Reload) -> None: ...


def member_name(config: CollectorConfig) -> str:
    return config.collector.member or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(eq=False)
class GroupMember:
    """One member of the collector group: its config and name, its connections (read when
    used: they open in the lifecycle), the group's alert store, the engine runner it regroups
    and the buckets' consumers (``None`` until the ingest runs)."""

    config: CollectorConfig
    name: str
    nc: Callable[[], NatsClient | None]
    pool: Callable[[], asyncpg.Pool | None]
    store: GroupAlertStore
    runner: _Runner
    source: Callable[[], BucketConsumers | None]
    # told the buckets gained (e.g. to load the GPUs' static facts of their hosts from PostgreSQL)
    on_gained: Callable[[frozenset[int]], Awaitable[None]] | None = None
    on_regrouped: Callable[[], None] | None = None  # e.g. sweep the gained buckets' commands
    membership: Membership | None = field(default=None, init=False)
    settled: set[int] = field(default_factory=set, init=False)  # buckets restored here (the fleet view's)
    fence_timeouts: int = field(default=0, init=False)  # buckets not taken: fencing row locked too long
    _ratelog: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log, 60.0), init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def group_kv(self) -> str:
        """The group's identity (its KV bucket): what its rows in PostgreSQL are scoped by."""
        return self.config.collector.group_kv

    def owns(self, bucket: int) -> bool:
        return self.membership is not None and self.membership.owns(bucket)

    def tokens(self) -> dict[int, int]:
        return self.membership.tokens() if self.membership is not None else {}

    def fenced(self, buckets: list[int]) -> None:
        if self.membership is not None:
            self.membership.drop(buckets)

    async def start(self) -> None:
        nc = self.nc()
        assert nc is not None, "NATS starts before the group"
        c = self.config.collector
        self.membership = Membership(
            nc, self.name, buckets=c.buckets, lease=c.lease, kv_bucket=c.group_kv,
            replicas=self.config.nats.stream_replicas, info={"listen": c.listen},
            on_gain=self._gain, on_loss=self._loss,
        )  # fmt: skip
        await self.membership.start()
        self._task = asyncio.create_task(self.membership.run(), name="group")
        log.info("collector group member %s holds buckets %s", self.name, sorted(self.membership.owned()))

    async def stop(self) -> None:
        """Hand the buckets back (state written first): the others take them at once."""
        if self.membership is not None:
            try:
                await self.membership.stop(release=True)
            except db.ERRORS as e:
                log.warning("group leases not released (they expire): %s", e)
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None

    async def _gain(self, gained: Mapping[int, int]) -> list[int]:
        """Buckets taken: raise their fencing tokens, restore their state, then consume them.
        Returns the buckets whose token could not be raised (not taken: tried next round)."""
        assert self.membership is not None
        untaken = await self._raise(gained)
        gained = {b: t for b, t in gained.items() if b not in untaken}
        if not gained:
            return untaken
        self.membership.activate(gained)
        if self.on_gained is not None:
            await self.on_gained(frozenset(gained))
        await self.runner.regroup(lambda: self.store.reload(gained))
        self.settled |= set(gained)
        source = self.source()
        if source is not None:
            await asyncio.gather(*(source.start(b) for b in sorted(gained)))
        if self.on_regrouped is not None:
            self.on_regrouped()
        return untaken

    async def _raise(self, gained: Mapping[int, int]) -> list[int]:
        """Raise the fencing tokens of ``gained``, waiting at most ``lease / 8`` in all for rows a
        write in flight holds (a member paused inside its transaction keeps them locked until it
        resumes or PostgreSQL ends its session): the buckets not raised by then are returned."""
        pool = self.pool()
        assert pool is not None
        assert self.membership is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.membership.lease / 8
        untaken: list[int] = []
        raised: set[int] = set()
        try:
            async with pool.acquire() as conn:
                for b, token in gained.items():
                    wait = max(deadline - loop.time(), 0.01)  # past the budget: only a free row
                    try:
                        if not await fence.take(conn, b, token, self.name, group=self.group_kv, wait=wait):
                            log.error(
                                "bucket %d: PostgreSQL holds a newer fencing token than lease revision %d "
                                "(was the group's KV bucket recreated? docs/operations.md)", b, token,
                            )  # fmt: skip
                        raised.add(b)
                    except fence.LockTimeout:
                        untaken.append(b)
        except db.ERRORS as e:  # PostgreSQL unreachable: nothing more is raised this round
            untaken = [b for b in gained if b not in raised]
            self._ratelog.warning(
                "fence-error",
                "buckets %s not taken this round: fencing tokens not raised: %s",
                sorted(untaken),
                e,
            )
            return untaken
        if untaken:
            self.fence_timeouts += len(untaken)
            self._ratelog.warning(
                "fence-wait",
                "buckets %s not taken this round: their fencing rows stayed locked past %.2fs (a write in "
                "flight; a member paused inside a transaction?); tried again next round",
                untaken, self.membership.lease / 8,
            )  # fmt: skip
        return untaken

    async def _loss(self, lost: frozenset[int]) -> None:
        """Buckets released or lost: stop consuming them, then drop their state (written first).
        A bucket released (a rebalance) is still held while this runs: its state is written
        under its lease, and not read back (``dropped``): the runner would otherwise go on
        judging its hosts, unfed (host.unreachable, gpu.stale), and never write or publish it."""
        self.settled -= lost
        source = self.source()
        if source is not None:
            await asyncio.gather(*(source.stop(b) for b in sorted(lost)))
        await self.runner.regroup(lambda: self.store.reload((), dropped=lost))
