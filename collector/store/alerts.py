"""Alert and health persistence: the one module that reads and writes the alert engine's
state, its notifications' outbox rows, silences, the health snapshot, forgotten hosts and the
GPU fault history for the collector's engine runner (:mod:`collector.alerting`).

One transaction per evaluation step (:func:`save`) writes the alerts that changed, their
transitions, the incidents that changed, the rest of the engine state and one outbox row per
(notification, channel); :mod:`collector.notify.outbox` then delivers the rows. The health
state is serialised by :func:`collector.health.codec.health_snapshot` (the only serialiser).
:class:`PgAlertStore` is these functions over a pool, the store the runner is given.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec

from collector.alerts.config import Silence
from collector.alerts.model import Alert, Incident, Transition, plain
from collector.health.codec import health_snapshot
from collector.health.history import BoardHistory
from collector.health.model import HealthState
from collector.notify.outbox import Early, Landed, OutboxRow, Outcome
from collector.store.history import load_history, save_history

_json = msgspec.json.Encoder().encode


async def record_early(conn: asyncpg.Connection, partition: int, done: Landed) -> None:
    """Write early deliveries' outcomes (from the spool after a restart, or that landed after
    their step was written): inserted as they ended, or the pending row updated."""
    async with conn.transaction():
        for row, o in done:
            rid = await conn.fetchval(
                "INSERT INTO notification_outbox (partition, channel, delivery_key, payload, status,"
                " attempts, last_error, sent_at) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7,"
                " CASE WHEN $5 = 'sent' THEN to_timestamp($8) END)"
                " ON CONFLICT (delivery_key) DO UPDATE SET status = EXCLUDED.status,"
                " attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error, sent_at = EXCLUDED.sent_at"
                " WHERE notification_outbox.status = 'pending' RETURNING id",
                partition, row.channel, row.key, json.dumps(row.payload), o.status, o.attempts, o.error, o.at,
            )  # fmt: skip
            if rid is not None and o.status == "failed":
                await conn.execute(
                    "INSERT INTO notification_dead_letter (outbox_id, channel, payload, error, attempts)"
                    " VALUES ($1, $2, $3::jsonb, $4, $5)",
                    rid, row.channel, json.dumps(row.payload), o.error or "", o.attempts,
                )  # fmt: skip


@dataclass(slots=True)
class Changes:
    """What one evaluation step changed, to be written in one transaction."""

    alerts: dict[str, Alert] = field(default_factory=dict)  # by fingerprint
    deleted: set[str] = field(default_factory=set)
    transitions: list[Transition] = field(default_factory=list)
    incidents: dict[str, Incident] = field(default_factory=dict)
    engine: dict[str, Any] | None = None
    deliveries: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # channel, key, payload

    def empty(self) -> bool:
        return not (
            self.alerts
            or self.deleted
            or self.transitions
            or self.incidents
            or self.engine
            or self.deliveries
        )

    def merge(self, other: Changes) -> None:
        self.alerts.update(other.alerts)
        self.deleted -= set(other.alerts)
        self.deleted |= other.deleted
        for fp in other.deleted:
            self.alerts.pop(fp, None)
        self.transitions += other.transitions
        self.incidents.update(other.incidents)
        self.engine = other.engine or self.engine
        self.deliveries += other.deliveries


async def save(
    conn: asyncpg.Connection,
    partition: int,
    ch: Changes,
    early: Early | None = None,
    group: str | None = None,
    claim: tuple[str | None, int] | None = None,
) -> list[OutboxRow]:
    """Write ``ch`` in one transaction (the caller's, when it has one: no savepoint); return the
    new outbox rows (to deliver), ``group``'s when given (a collector group's, docs/operations.md),
    claimed by ``claim`` (member, fencing token) when given.
    Deliveries whose key is in ``early`` were handed to their channel already: written with their
    outcome (``None``: still in flight, written pending) and not returned. Each statement is a
    round trip, which on a busy event loop waits for a turn of the loop: the alert changes are one
    statement per kind and the outbox rows one statement, whatever their number (a notification
    is delivered once its step is written, except an event-class critical's first notice)."""
    rows: list[OutboxRow] = []
    early = early or {}
    async with contextlib.nullcontext() if conn.is_in_transaction() else conn.transaction():
        if ch.alerts:
            await conn.executemany(
                "INSERT INTO alerts (fingerprint, partition, rule, labels, severity, state, level, policy,"
                " incident, data, updated_at)"
                " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10::jsonb, now())"
                " ON CONFLICT (fingerprint) DO UPDATE SET partition = EXCLUDED.partition,"
                " severity = EXCLUDED.severity, state = EXCLUDED.state, level = EXCLUDED.level,"
                " policy = EXCLUDED.policy, incident = EXCLUDED.incident, data = EXCLUDED.data,"
                " updated_at = now()",
                [
                    (
                        a.fingerprint, partition, a.rule, json.dumps(a.labels), a.severity, a.state, a.level,
                        a.policy, a.incident, json.dumps(plain(a)),
                    )
                    for a in ch.alerts.values()
                ],
            )  # fmt: skip
        if ch.deleted:
            await conn.execute("DELETE FROM alerts WHERE fingerprint = ANY($1::text[])", list(ch.deleted))
        if ch.transitions:
            await conn.executemany(
                "INSERT INTO alert_transitions (partition, fingerprint, rule, labels, at, kind, state,"
                " severity, summary, incident, reason)"
                " VALUES ($1, $2, $3, $4::jsonb, to_timestamp($5), $6, $7, $8, $9, $10, $11)",
                [
                    (
                        partition, t.fingerprint, t.rule, json.dumps(dict(t.labels)), t.at, t.kind, t.state,
                        t.severity, t.summary, t.incident, t.reason or None,
                    )
                    for t in ch.transitions
                ],
            )  # fmt: skip
        if ch.incidents:
            await conn.executemany(
                "INSERT INTO incidents (id, partition, provider, host, opened_at, closed_at, data)"
                " VALUES ($1, $2, $3, $4, to_timestamp($5), to_timestamp($6), $7::jsonb)"
                " ON CONFLICT (id) DO UPDATE SET closed_at = EXCLUDED.closed_at, data = EXCLUDED.data",
                [
                    (i.id, partition, i.provider, i.host, i.opened_at, i.closed_at, json.dumps(plain(i)))
                    for i in ch.incidents.values()
                ],
            )
        if ch.engine is not None:
            await conn.execute(
                "INSERT INTO alert_engine_state (partition, data, updated_at) VALUES ($1, $2::jsonb, now())"
                " ON CONFLICT (partition) DO UPDATE SET data = EXCLUDED.data, updated_at = now()",
                partition,
                json.dumps(ch.engine),
            )
        landed = [
            (OutboxRow(0, channel, key, payload), early[key] or Outcome("pending", 0))
            for channel, key, payload in ch.deliveries
            if key in early
        ]
        if landed:
            await record_early(conn, partition, landed)
        new = [d for d in ch.deliveries if d[1] not in early]
        if new:
            # in the step's order (ids follow it); a key already there, or twice here, is
            # inserted once and returned once
            ids = {
                r["delivery_key"]: r["id"]
                for r in await conn.fetch(
                    "INSERT INTO notification_outbox"
                    " (partition, channel, delivery_key, payload, group_kv, claimed_by, claim_token)"
                    " SELECT $1, v.c, v.k, v.p::jsonb, $5, $6, $7"
                    " FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS v(c, k, p, n)"
                    " ORDER BY v.n ON CONFLICT (delivery_key) DO NOTHING RETURNING id, delivery_key",
                    partition,
                    [c for c, _, _ in new],
                    [k for _, k, _ in new],
                    [json.dumps(p) for _, _, p in new],
                    group,
                    claim[0] if claim else None,
                    claim[1] if claim else None,
                )
            }
            for channel, key, payload in new:
                rid = ids.pop(key, None)
                if rid is not None:
                    rows.append(OutboxRow(rid, channel, key, payload))
    return rows


async def load(
    conn: asyncpg.Connection, partition: int | Sequence[int]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The saved alert state (``AlertState.to_dict`` shape) and health snapshot of a partition,
    or of several merged (a collector group member's buckets, docs/operations.md)."""
    parts = [partition] if isinstance(partition, int) else list(partition)
    alerts = [json.loads(r["data"]) for r in await conn.fetch(
        "SELECT data FROM alerts WHERE partition = ANY($1::int[])", parts)]  # fmt: skip
    incidents = [json.loads(r["data"]) for r in await conn.fetch(
        "SELECT data FROM incidents WHERE partition = ANY($1::int[]) AND (closed_at IS NULL"
        " OR closed_at > now() - interval '1 day')", parts)]  # fmt: skip
    silences = await active_silences(conn)
    engine: dict[str, Any] = {}
    for raw in await conn.fetch(
        "SELECT data FROM alert_engine_state WHERE partition = ANY($1::int[]) ORDER BY partition", parts
    ):
        engine = _merge_engine(engine, json.loads(raw["data"]))
    health: dict[str, Any] | None = None
    for raw in await conn.fetch(
        "SELECT data FROM health_state WHERE partition = ANY($1::int[]) ORDER BY partition", parts
    ):
        d = json.loads(raw["data"])
        hosts = {**(health or {}).get("hosts", {}), **d.get("hosts", {})}
        health = {**(health or {}), **d, "hosts": hosts}
    state = {**engine, "alerts": alerts, "incidents": incidents, "silences": silences}
    return state, health


async def active_silences(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """The silences added through the API that have not ended (``Silence.to_dict`` shape)."""
    return [
        {
            "id": r["id"],
            "matchers": json.loads(r["matchers"]),
            "starts_at": r["s"],
            "ends_at": r["e"],
            "author": r["author"],
            "comment": r["comment"],
        }
        for r in await conn.fetch(
            "SELECT id, matchers, extract(epoch FROM starts_at)::float8 AS s,"
            " extract(epoch FROM ends_at)::float8 AS e, author, comment FROM silences"
            " WHERE expired_at IS NULL AND ends_at > now()"
        )
    ]


def _merge_engine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two partitions' engine state as one (hosts per provider and incident slots united)."""
    if not a:
        return b
    hosts = {p: list(h) for p, h in a.get("hosts", {}).items()}
    for p, h in b.get("hosts", {}).items():
        known = hosts.setdefault(p, [])
        known.extend(x for x in h if x not in known)
    silences = list(a.get("active_silences", []))
    silences += [s for s in b.get("active_silences", []) if s not in silences]
    return {
        **a,
        "hosts": hosts,
        "open_incidents": {**a.get("open_incidents", {}), **b.get("open_incidents", {})},
        "active_silences": silences,
    }


async def pending(conn: asyncpg.Connection, partition: int | Sequence[int]) -> list[OutboxRow]:
    parts = [partition] if isinstance(partition, int) else list(partition)
    rows = await conn.fetch(
        "SELECT id, channel, delivery_key, payload FROM notification_outbox"
        " WHERE partition = ANY($1::int[]) AND status = 'pending' ORDER BY id",
        parts,
    )
    return [OutboxRow(r["id"], r["channel"], r["delivery_key"], json.loads(r["payload"])) for r in rows]


async def save_health(conn: asyncpg.Connection, partition: int, data: Mapping[str, Any]) -> None:
    await save_health_many(conn, {partition: data})


async def save_health_many(conn: asyncpg.Connection, snapshots: Mapping[int, Mapping[str, Any]]) -> None:
    """The health snapshots of several partitions in one statement (one round trip), encoded by
    msgspec (a bucket's snapshot is tens of KB: json.dumps took 1-3 ms of the event loop each)."""
    if not snapshots:
        return
    parts = sorted(snapshots)
    await conn.execute(
        "INSERT INTO health_state (partition, data, saved_at)"
        " SELECT p, d::jsonb, now() FROM unnest($1::int[], $2::text[]) AS v(p, d)"
        " ON CONFLICT (partition) DO UPDATE SET data = EXCLUDED.data, saved_at = now()",
        parts,
        [_json(snapshots[p]).decode() for p in parts],
    )


async def save_silence(conn: asyncpg.Connection, s: Mapping[str, Any]) -> None:
    await conn.execute(
        "INSERT INTO silences (id, matchers, starts_at, ends_at, author, comment)"
        " VALUES ($1, $2::jsonb, to_timestamp($3), to_timestamp($4), $5, $6) ON CONFLICT (id) DO NOTHING",
        s["id"],
        json.dumps(s["matchers"]),
        s["starts_at"],
        s["ends_at"],
        s["author"],
        s["comment"],
    )


async def expire_silence(conn: asyncpg.Connection, sid: str) -> None:
    await conn.execute("UPDATE silences SET expired_at = now() WHERE id = $1 AND expired_at IS NULL", sid)


async def forgotten_hosts(conn: asyncpg.Connection) -> set[str]:
    return {r["name"] for r in await conn.fetch("SELECT name FROM hosts WHERE forgotten_at IS NOT NULL")}


async def mark_forgotten(conn: asyncpg.Connection, host: str) -> None:
    await conn.execute("UPDATE hosts SET forgotten_at = now() WHERE name = $1", host)


async def clear_forgotten(conn: asyncpg.Connection, hosts: Collection[str]) -> None:
    await conn.execute("UPDATE hosts SET forgotten_at = NULL WHERE name = ANY($1::text[])", list(hosts))


@dataclass(slots=True)
class Restored:
    """What a starting collector reads back: the alert state (``AlertState.to_dict`` shape),
    the health snapshot, the outbox rows still pending, forgotten hosts, GPU fault history."""

    alerts: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] | None = None
    pending: list[OutboxRow] = field(default_factory=list)
    forgotten: set[str] = field(default_factory=set)
    boards: list[BoardHistory] = field(default_factory=list)


class PgAlertStore:
    """The engine runner's store in PostgreSQL (``pool()`` is ``None`` until it is opened)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool | None], partition: int) -> None:
        self.pool = pool
        self.partition = partition
        # the runner's health state and healthy_for (collector.wiring): what ``save(health=True)``
        # writes with the alert changes; in a collector group, a step that changes alerts writes
        # the health context of its buckets with it, so that a taker that judges the same frames
        # again (a dead owner's unacknowledged batch) knows the events already judged
        self.health: Callable[[], tuple[HealthState, int]] | None = None

    @property
    def available(self) -> bool:
        return self.pool() is not None

    def _acquire(self) -> Any:
        pool = self.pool()
        assert pool is not None, "PostgreSQL is not open yet"
        return pool.acquire()

    async def restore(self) -> Restored:
        async with self._acquire() as conn:
            alerts, health = await load(conn, self.partition)
            rows = await pending(conn, self.partition)
            forgotten = await forgotten_hosts(conn)
            boards = await load_history(conn)
        return Restored(alerts, health, rows, forgotten, boards)

    async def save(
        self, ch: Changes, early: Early, landed: Landed = (), *, health: bool = False
    ) -> list[OutboxRow]:
        """:func:`save`, then the outcomes of early deliveries that ended after their step was
        written (:func:`record_early`); on one connection. With ``health``, the health snapshot
        of the state as it is when called (:attr:`health`) in the same transaction."""
        snap = health_snapshot(*self.health()) if health and self.health is not None else None
        async with self._acquire() as conn, conn.transaction():
            rows = await save(conn, self.partition, ch, early)
            if landed:
                await record_early(conn, self.partition, landed)
            if snap is not None:
                await save_health(conn, self.partition, snap)
        return rows

    async def record_early(self, done: Landed) -> None:
        async with self._acquire() as conn:
            await record_early(conn, self.partition, done)

    async def save_health(self, state: HealthState, healthy_for: int) -> None:
        data = health_snapshot(state, healthy_for)
        async with self._acquire() as conn:
            await save_health(conn, self.partition, data)

    async def load_history(self) -> list[BoardHistory]:
        async with self._acquire() as conn:
            return await load_history(conn)

    async def save_history(
        self, changed: Sequence[BoardHistory], gone: Sequence[tuple[str, float]], cutoff: float = 0.0
    ) -> list[BoardHistory]:
        async with self._acquire() as conn:
            return await save_history(conn, changed, gone, cutoff)

    async def save_silence(self, s: Silence) -> None:
        async with self._acquire() as conn:
            await save_silence(conn, s.to_dict())

    async def expire_silence(self, sid: str) -> None:
        async with self._acquire() as conn:
            await expire_silence(conn, sid)

    async def mark_forgotten(self, host: str) -> None:
        async with self._acquire() as conn:
            await mark_forgotten(conn, host)

    async def clear_forgotten(self, hosts: Collection[str]) -> None:
        async with self._acquire() as conn:
            await clear_forgotten(conn, hosts)

    async def forgotten_hosts(self) -> set[str]:
        async with self._acquire() as conn:
            return await forgotten_hosts(conn)

    async def mark_sent(self, row_id: int, attempts: int) -> None:
        async with self._acquire() as conn:
            await conn.execute(
                "UPDATE notification_outbox SET status = 'sent', attempts = $2, sent_at = now()"
                " WHERE id = $1",
                row_id,
                attempts,
            )

    async def mark_failed(self, row: OutboxRow, attempts: int, error: str) -> None:
        """The row failed after its channel's retries: ``failed``, and a dead letter."""
        async with self._acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE notification_outbox SET status = 'failed', attempts = $2, last_error = $3"
                " WHERE id = $1",
                row.id, attempts, error,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO notification_dead_letter (outbox_id, channel, payload, error, attempts)"
                " VALUES ($1, $2, $3::jsonb, $4, $5)",
                row.id, row.channel, json.dumps(row.payload), error, attempts,
            )  # fmt: skip
