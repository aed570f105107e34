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
from collector.group.assign import GROUP_PARTITION_BASE
from collector.group.scope import LOCAL, Scope, part_of
from collector.health.codec import health_snapshot
from collector.health.model import HealthState
from collector.notify.outbox import Early, Landed, OutboxRow
from collector.store import alerts as pg
from collector.store.history import load_history

# what a member's runner reloads when its buckets change: alert state, health, rows to send
Reload = Callable[[], Awaitable[tuple[dict[str, Any], dict[str, Any] | None, list[OutboxRow]]]]


class GroupAlertStore(pg.PgAlertStore):
    """``incidents()`` gives the runner's incidents (a provider-wide incident's bucket is its
    first host's)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool | None], scope: Scope) -> None:
        super().__init__(pool, LOCAL)  # what is no bucket's (early rows, self-check) is LOCAL
        self.scope = scope
        self.incidents: Callable[[], Mapping[str, Incident]] = dict
        # the runner's health state and healthy_for: a step that changes alerts writes the health
        # context of its buckets with it, so that a taker that judges the same frames again
        # (a dead owner's unacknowledged batch) knows the events already judged
        self.health: Callable[[], tuple[HealthState, int]] | None = None

    def parts(self) -> list[int]:
        return [part_of(b) for b in sorted(self.scope.tokens())]

    async def restore(self) -> pg.Restored:
        async with self._acquire() as conn:
            alerts, health = await pg.load(conn, self.parts())
            rows = await pg.pending(conn, self.parts())
            forgotten = await pg.forgotten_hosts(conn)
            boards = await load_history(conn)
        return pg.Restored(alerts, health, rows, forgotten, boards)

    async def reload(
        self, gained: Iterable[int]
    ) -> tuple[dict[str, Any], dict[str, Any] | None, list[OutboxRow]]:
        """The state of the buckets held now, and the gained buckets' pending notifications."""
        gained = sorted(gained)
        async with self._acquire() as conn:
            alerts, health = await pg.load(conn, self.parts())
            rows = await pg.pending(conn, [part_of(b) for b in gained]) if gained else []
        return alerts, health, rows

    async def save(self, ch: pg.Changes, early: Early, landed: Landed = ()) -> list[OutboxRow]:
        tokens = self.scope.tokens()
        parts = self.scope.split(ch, self.incidents(), tokens)
        rows: list[OutboxRow] = []
        async with self._acquire() as conn, conn.transaction():
            buckets = [p - GROUP_PARTITION_BASE for p in parts if p != LOCAL]
            await fence.check(conn, {b: tokens[b] for b in buckets})
            for part, sub in parts.items():
                rows += await pg.save(conn, part, sub, early)
            touched = {p for p, sub in parts.items() if p != LOCAL and (sub.transitions or sub.deliveries)}
            if touched and self.health is not None:
                state, healthy_for = self.health()
                hosts = {
                    h: hs for h, hs in state.hosts.items() if part_of(self.scope.bucket(h) or 0) in touched
                }
                split = self.scope.split_health(health_snapshot(HealthState(hosts=hosts), healthy_for))
                for part in touched:
                    await pg.save_health(conn, part, split.get(part, {"hosts": {}}))
            if landed:
                await pg.record_early(conn, LOCAL, landed)
        return rows

    async def save_health(self, state: HealthState, healthy_for: int) -> None:
        data = health_snapshot(state, healthy_for)
        split = self.scope.split_health(data)
        async with self._acquire() as conn:
            for part, d in split.items():
                await pg.save_health(conn, part, d)


class ScopeGate:
    """The outbox's :class:`collector.notify.outbox.Gate` of a group member: a row of a bucket
    is claimed only with the bucket's current fencing token, and sent only while the lease
    holds on this member's clock; a host-less row (``LOCAL``) is this member's own."""

    def __init__(self, scope: Scope, pool: Callable[[], asyncpg.Pool | None], member: str) -> None:
        self.scope = scope
        self.pool = pool
        self.member = member

    async def claim(self, row: OutboxRow) -> bool:
        b = self.scope.of_payload(row.payload)
        if b is None:
            return True
        token = self.scope.tokens().get(b)
        pool = self.pool()
        if token is None or pool is None:
            return False
        async with pool.acquire() as conn:
            return await fence.claim(conn, row.id, b, token, self.member)

    def holds(self, row: OutboxRow) -> bool:
        b = self.scope.of_payload(row.payload)
        return b is None or self.scope.owns(b)
