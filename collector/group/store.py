"""A group member's alert store and outbox gate: the runner's state written and read by bucket.

:class:`GroupAlertStore` is :class:`collector.store.alerts.PgAlertStore` for a member of a
collector group: a step's changes are cut by bucket (:meth:`collector.group.scope.Scope.split`)
and written in one transaction after the fencing check (:func:`collector.group.fence.check`);
the health snapshot is written per bucket; :meth:`GroupAlertStore.reload` reads back the
state of the buckets held now and the notifications the gained buckets' previous owner left
pending. :class:`ScopeGate` lets the deliverer claim and send only the rows of buckets held.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import asyncpg

from collector.alerts.model import Incident
from collector.group import fence
from collector.group.scope import LOCAL, Scope, partition_base
from collector.health.codec import health_snapshot
from collector.health.model import HealthState
from collector.notify.outbox import Early, Landed, OutboxRow
from collector.store import alerts as pg
from collector.store.history import load_history

# what a member's runner reloads when its buckets change: alert state, health, rows to send
Reload = Callable[[], Awaitable[tuple[dict[str, Any], dict[str, Any] | None, list[OutboxRow]]]]


class GroupAlertStore(pg.PgAlertStore):
    """``incidents()`` gives the runner's incidents (a provider-wide incident's bucket is its
    first host's); ``group``: the group's KV bucket (its fencing rows and outbox rows)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool | None], scope: Scope, group: str) -> None:
        super().__init__(pool, LOCAL)  # what is no bucket's (early rows, self-check) is LOCAL
        self.scope = scope
        self.group = group
        self.incidents: Callable[[], Mapping[str, Incident]] = dict
        self.member = ""  # this member's name: its steps' outbox rows are claimed as written (save)
        # bucket -> the fencing token its state was read back under (restore, reload): the runner
        # holds that bucket's health context only from then on, so its snapshot is written only
        # while the token is the same (a bucket just gained, not reloaded yet, is not overwritten
        # with the runner's empty view of it: the taker would restore nothing)
        self.loaded: dict[int, int] = {}

    async def restore(self) -> pg.Restored:
        async with self._acquire() as conn:  # the group's partitions, before anything is read
            self.scope.base = await partition_base(conn, self.group)
        self.partition = self.scope.local
        tokens = self.scope.tokens()
        parts = [self.scope.part(b) for b in sorted(tokens)]
        async with self._acquire() as conn:
            alerts, health = await pg.load(conn, parts)
            rows = await pg.pending(conn, parts)
            forgotten = await pg.forgotten_hosts(conn)
            boards = await load_history(conn)
        self.loaded = dict(tokens)
        return pg.Restored(alerts, health, rows, forgotten, boards)

    async def reload(
        self, gained: Iterable[int], dropped: Iterable[int] = ()
    ) -> tuple[dict[str, Any], dict[str, Any] | None, list[OutboxRow]]:
        """The state of the buckets held now, less ``dropped`` (buckets being released: their
        leases are still held while their state is written, not to be read back), and the
        gained buckets' pending notifications."""
        gained = sorted(gained)
        dropped = set(dropped)
        tokens = {b: t for b, t in self.scope.tokens().items() if b not in dropped}
        async with self._acquire() as conn:
            alerts, health = await pg.load(conn, [self.scope.part(b) for b in sorted(tokens)])
            rows = await pg.pending(conn, [self.scope.part(b) for b in gained]) if gained else []
        self.loaded = dict(tokens)
        return alerts, health, rows

    def _restored(self, tokens: Mapping[int, int]) -> set[int]:
        """The buckets held (``tokens``) whose health context the runner holds: read back here
        under the token they are held under now."""
        return {b for b, t in tokens.items() if self.loaded.get(b) == t}

    async def save(
        self, ch: pg.Changes, early: Early, landed: Landed = (), *, health: bool = False
    ) -> list[OutboxRow]:
        """One step's changes (and the early deliveries' outcomes) in one transaction behind the
        fencing check, with the health snapshots of the buckets whose alerts changed (a
        transition or a notification), or with ``health`` of every bucket held. The snapshots
        are taken here before the first await, i.e. at the point where the runner took ``ch``
        (:meth:`collector.alerting.Alerting._flush`): a snapshot records as judged only frames
        whose alert changes are in ``ch`` or written before it (docs/operations.md). Only the
        buckets read back under the token they are held under get one (:attr:`loaded`)."""
        tokens = self.scope.tokens()
        parts = self.scope.split(ch, self.incidents(), tokens)
        local, base = self.scope.local, self.scope.base
        buckets = {p - base for p in parts if p != local}
        restored = self._restored(tokens)
        if not health:
            restored &= {
                p - base for p, sub in parts.items() if p != local and (sub.transitions or sub.deliveries)
            }
        snapshots = self._snapshots(*self.health(), restored) if self.health is not None and restored else {}
        rows: list[OutboxRow] = []
        async with self._acquire() as conn, conn.transaction():
            await fence.check(conn, {b: tokens[b] for b in buckets | restored}, group=self.group)
            for part, sub in parts.items():  # the outbox rows written as the group's
                if part == local:
                    rows += await pg.save(conn, part, sub, early, self.group)
                    continue
                # claimed here, behind the fencing check above: ScopeGate.claim needs no round
                # trip for them while the bucket is held under the same token
                b = part - base
                written = await pg.save(conn, part, sub, early, self.group, (self.member or None, tokens[b]))
                for r in written:
                    r.fenced = (b, tokens[b])
                rows += written
            await pg.save_health_many(conn, snapshots)
            if landed:
                await pg.record_early(conn, local, landed)
        return rows

    def _snapshots(
        self, state: HealthState, healthy_for: int, buckets: set[int]
    ) -> dict[int, dict[str, Any]]:
        """Partition -> the health snapshot of the hosts of ``buckets`` in ``state``."""
        bucket = self.scope.bucket
        hosts = {h: hs for h, hs in state.hosts.items() if bucket(h) in buckets}
        return self.scope.split_health(health_snapshot(HealthState(hosts=hosts), healthy_for), buckets)

    async def save_health(self, state: HealthState, healthy_for: int) -> None:
        """``state``'s snapshot of the buckets held and read back, behind the fencing check (the
        runner of a group writes its snapshots with its alert changes instead: :meth:`save`)."""
        tokens = self.scope.tokens()
        restored = self._restored(tokens)
        snapshots = self._snapshots(state, healthy_for, restored)
        async with self._acquire() as conn, conn.transaction():
            await fence.check(conn, {b: tokens[b] for b in restored}, group=self.group)
            await pg.save_health_many(conn, snapshots)


class ScopeGate:
    """The outbox's :class:`collector.notify.outbox.Gate` of a group member: a row of a bucket
    is claimed only with the bucket's current fencing token, and sent only while the lease
    holds on this member's clock; a host-less row (``LOCAL``) is this member's own."""

    def __init__(
        self, scope: Scope, pool: Callable[[], asyncpg.Pool | None], member: str, group: str
    ) -> None:
        self.scope = scope
        self.pool = pool
        self.member = member
        self.group = group

    async def claim(self, row: OutboxRow) -> bool:
        b = self.scope.of_payload(row.payload)
        if b is None:
            return True
        token = self.scope.tokens().get(b)
        if token is not None and row.fenced == (b, token):
            return True  # written and claimed by this member's step, under the lease it holds now
        pool = self.pool()
        if token is None or pool is None:
            return False
        async with pool.acquire() as conn:
            return await fence.claim(conn, row.id, b, token, self.member, group=self.group)

    def holds(self, row: OutboxRow) -> bool:
        b = self.scope.of_payload(row.payload)
        return b is None or self.scope.owns(b)
