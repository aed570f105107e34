"""Persistence of the alert engine's state, the health snapshot and the notification outbox.

One transaction per evaluation step writes the alerts that changed, their transitions, the
incidents that changed, the rest of the engine state and one outbox row per (notification,
channel). Only then are the rows handed to the channels; each delivered row is marked
``sent``; one that fails after its channel's retries is marked ``failed`` and copied to
``notification_dead_letter``. A restarted collector restores the state and delivers the
rows still ``pending``: what was sent is never sent again.

Fail-open (PostgreSQL unreachable): the alerting hands the deliveries of a step it could not
write to the channels at once, as rows with ``id`` 0 ("early"); each outcome is reported to
the ``early`` callback (kept in memory and appended to the local :class:`Spool`) instead of
PostgreSQL. When the step is written, :func:`save` inserts those rows with the outcome already
known (``sent``, ``failed``; ``pending`` while still in flight, updated by delivery key when it
lands) and returns them not for delivery: the stable delivery key means nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from collector.alerts.model import Alert, Incident, Transition
from collector.health.model import HEALTHY, CheckStatus, HealthState, XidRecord
from collector.notify.base import Channel, ChannelStats, DeliveryError
from shared.redact import redact
from shared.tasks import cancel_all

log = logging.getLogger(__name__)


def _ts(x: float | None) -> Any:
    return None if x is None else x


@dataclass(slots=True)
class OutboxRow:
    id: int
    channel: str
    key: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an early delivery ended: ``sent`` or ``failed`` after ``attempts``."""

    status: str
    attempts: int
    error: str | None = None
    at: float = 0.0


EarlyCallback = Callable[[OutboxRow, Outcome], None]


class Spool:
    """A local, append-only record of early deliveries and their outcomes (JSON lines), so that
    what was sent while PostgreSQL was down is written there once it is back, even after a
    restart. Only touched while PostgreSQL is down; emptied once everything is recorded."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.errors = 0

    def append(self, row: OutboxRow, outcome: Outcome) -> None:
        if self.path is None:
            return
        line = json.dumps(
            {"channel": row.channel, "key": row.key, "payload": row.payload, "status": outcome.status,
             "attempts": outcome.attempts, "error": outcome.error, "at": outcome.at}
        )  # fmt: skip
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.errors += 1
            log.warning("notification spool %s not written (kept in memory only): %s", self.path, e)

    def read(self) -> list[tuple[OutboxRow, Outcome]]:
        if self.path is None or not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
                out.append(
                    (
                        OutboxRow(0, d["channel"], d["key"], d["payload"]),
                        Outcome(d["status"], int(d["attempts"]), d.get("error"), float(d.get("at") or 0)),
                    )
                )
            except (ValueError, KeyError, TypeError):
                log.warning("notification spool %s: an unreadable line skipped", self.path)
        return out

    def clear(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


async def record_early(
    conn: asyncpg.Connection, partition: int, done: Sequence[tuple[OutboxRow, Outcome]]
) -> None:
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


def plain(obj: Alert | Incident) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in obj.__slots__:
        v = getattr(obj, name)
        out[name] = dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
    return out


async def save(
    conn: asyncpg.Connection,
    partition: int,
    ch: Changes,
    early: Mapping[str, Outcome | None] | None = None,
) -> list[OutboxRow]:
    """Write ``ch`` in one transaction; return the new outbox rows (to deliver). Deliveries
    whose key is in ``early`` were handed to their channel already: written with their outcome
    (``None``: still in flight, written pending) and not returned."""
    rows: list[OutboxRow] = []
    early = early or {}
    async with conn.transaction():
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
                    (i.id, partition, i.provider, i.host, i.opened_at, _ts(i.closed_at), json.dumps(plain(i)))
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
        for channel, key, payload in ch.deliveries:
            if key in early:
                o = early[key]
                await record_early(
                    conn, partition, [(OutboxRow(0, channel, key, payload), o or Outcome("pending", 0))]
                )
                continue
            rid = await conn.fetchval(
                "INSERT INTO notification_outbox (partition, channel, delivery_key, payload)"
                " VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT (delivery_key) DO NOTHING RETURNING id",
                partition,
                channel,
                key,
                json.dumps(payload),
            )
            if rid is not None:
                rows.append(OutboxRow(rid, channel, key, payload))
    return rows


async def load(conn: asyncpg.Connection, partition: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The saved alert state (``AlertState.to_dict`` shape) and health snapshot of a partition."""
    alerts = [json.loads(r["data"]) for r in await conn.fetch(
        "SELECT data FROM alerts WHERE partition = $1", partition)]  # fmt: skip
    incidents = [json.loads(r["data"]) for r in await conn.fetch(
        "SELECT data FROM incidents WHERE partition = $1 AND (closed_at IS NULL"
        " OR closed_at > now() - interval '1 day')", partition)]  # fmt: skip
    silences = [
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
    raw = await conn.fetchval("SELECT data FROM alert_engine_state WHERE partition = $1", partition)
    engine = json.loads(raw) if raw is not None else {}
    health = await conn.fetchval("SELECT data FROM health_state WHERE partition = $1", partition)
    state = {**engine, "alerts": alerts, "incidents": incidents, "silences": silences}
    return state, (json.loads(health) if health is not None else None)


async def pending(conn: asyncpg.Connection, partition: int) -> list[OutboxRow]:
    rows = await conn.fetch(
        "SELECT id, channel, delivery_key, payload FROM notification_outbox"
        " WHERE partition = $1 AND status = 'pending' ORDER BY id",
        partition,
    )
    return [OutboxRow(r["id"], r["channel"], r["delivery_key"], json.loads(r["payload"])) for r in rows]


async def save_health(conn: asyncpg.Connection, partition: int, data: Mapping[str, Any]) -> None:
    await conn.execute(
        "INSERT INTO health_state (partition, data, saved_at) VALUES ($1, $2::jsonb, now())"
        " ON CONFLICT (partition) DO UPDATE SET data = EXCLUDED.data, saved_at = now()",
        partition,
        json.dumps(data),
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


def _checks(checks: dict[str, CheckStatus], healthy_for: int) -> dict[str, Any]:
    """Only checks that are not healthy and quiet (the rest are recreated by the next sample)."""
    out = {}
    for name, c in checks.items():
        if c.status != HEALTHY or c.quiet < healthy_for:
            out[name] = {f: getattr(c, f) for f in CheckStatus.__slots__}
            out[name]["labels"] = dict(c.labels)
    return out


def _xid(x: XidRecord) -> dict[str, Any]:
    return {"code": x.code, "count": x.count, "first_at": x.first_at, "last_at": x.last_at}


def health_snapshot(state: HealthState, healthy_for: int) -> dict[str, Any]:
    """The health state in ``collector.health.codec`` form, lean: no last readings (rates
    start again one sample after a restart) and no healthy, quiet checks. At 500 hosts x 8
    GPUs the full codec form is ~30 MB and 1.5 s of CPU; this is a few hundred kB."""
    hosts = {}
    for name, hs in state.hosts.items():
        gpus = {}
        for i, gs in hs.gpus.items():
            gpus[str(i)] = {
                "index": gs.index, "uuid": gs.uuid, "labels": dict(gs.labels), "lost": gs.lost,
                "stale": gs.stale, "quiet": False, "throttle_since": gs.throttle_since,
                "event_reasons": gs.event_reasons,
                "xids": {str(c): _xid(x) for c, x in gs.xids.items()},
                "fatal_xids": list(gs.fatal_xids), "checks": _checks(gs.checks, healthy_for),
                "rma_until": gs.rma_until, "rma_summary": gs.rma_summary, "rma_evidence": gs.rma_evidence,
            }  # fmt: skip
        hosts[name] = {
            "host": hs.host, "provider": hs.provider, "labels": dict(hs.labels), "boot_id": hs.boot_id,
            "last_sample_seq": hs.last_sample_seq, "recent_events": list(hs.recent_events),
            "boot_events": {b: list(e) for b, e in hs.boot_events.items()},
            "boot_sample_seq": dict(hs.boot_sample_seq),
            "last_frame_at": hs.last_frame_at, "interval_s": hs.interval_s,
            "first_expected_at": hs.first_expected_at, "expected_gpus": hs.expected_gpus,
            "inventory_gpus": hs.inventory_gpus, "stale": hs.stale, "gpus": gpus,
            "nats_failed_since": hs.nats_failed_since, "nvml_error": hs.nvml_error,
            "checks": _checks(hs.checks, healthy_for),
        }  # fmt: skip
    return {"hosts": hosts}


class Deliverer:
    """One queue and one worker per channel (so a channel's notifications keep their order);
    retries with exponential backoff (tenacity), then the dead-letter table."""

    def __init__(
        self, pool: asyncpg.Pool, channels: Iterable[Channel], early: EarlyCallback | None = None
    ) -> None:
        self.pool = pool
        self.early = early  # told the outcome of rows with id 0 (not in PostgreSQL yet)
        self.channels = {c.name: c for c in channels}
        self.stats = {c.name: ChannelStats(c.kind) for c in self.channels.values()}
        self._queues: dict[str, asyncio.Queue[OutboxRow]] = {n: asyncio.Queue() for n in self.channels}
        self._tasks: list[asyncio.Task[None]] = []
        self.dead_letters = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(n), name=f"notify-{n}") for n in self.channels]

    def submit(self, rows: Sequence[OutboxRow]) -> None:
        for r in rows:
            q = self._queues.get(r.channel)
            if q is None:
                log.warning("outbox row %d for unknown channel %r left pending", r.id, r.channel)
                continue
            q.put_nowait(r)

    def backlog(self) -> int:
        return sum(q.qsize() for q in self._queues.values())

    async def idle(self) -> None:
        for q in self._queues.values():
            await q.join()

    async def close(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []
        for c in self.channels.values():
            await c.close()

    async def _worker(self, name: str) -> None:
        q = self._queues[name]
        while True:
            row = await q.get()
            try:
                await self._deliver(self.channels[name], row)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                log.warning("notification %d on %s: could not record the outcome: %s", row.id, name, e)
            except (KeyError, TypeError, ValueError) as e:  # a malformed row: keep the worker alive
                self.stats[name].failed += 1
                log.error(
                    "notification %d on %s cannot be rendered, left pending: %s",
                    row.id,
                    name,
                    redact(repr(e)),
                )
            finally:
                q.task_done()

    async def _deliver(self, ch: Channel, row: OutboxRow) -> None:
        st = self.stats[ch.name]
        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(DeliveryError),
                wait=wait_exponential(multiplier=ch.backoff, max=ch.max_backoff),
                stop=stop_after_attempt(ch.retries + 1),
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    try:
                        await ch.deliver(row.payload, row.key)
                    except DeliveryError:
                        st.errors += 1
                        raise
        except DeliveryError as e:
            st.failed += 1
            st.last_failed_at = time.time()
            self.dead_letters += 1
            log.warning("notification %s on %s failed after %d attempts: %s", row.key, ch.name, attempts, e)
            if row.id == 0:
                if self.early is not None:
                    self.early(row, Outcome("failed", attempts, str(e), time.time()))
                return
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE notification_outbox SET status = 'failed', attempts = $2, last_error = $3"
                    " WHERE id = $1",
                    row.id, attempts, str(e),
                )  # fmt: skip
                await conn.execute(
                    "INSERT INTO notification_dead_letter (outbox_id, channel, payload, error, attempts)"
                    " VALUES ($1, $2, $3::jsonb, $4, $5)",
                    row.id, ch.name, json.dumps(row.payload), str(e), attempts,
                )  # fmt: skip
            return
        st.observe(float(row.payload.get("at") or time.time()))
        if row.id == 0:  # early (PostgreSQL was down): recorded by the alerting, later
            if self.early is not None:
                self.early(row, Outcome("sent", attempts, None, time.time()))
            return
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE notification_outbox SET status = 'sent', attempts = $2, sent_at = now()"
                " WHERE id = $1",
                row.id,
                attempts,
            )
