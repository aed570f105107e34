"""The batch writer: one transaction per batch, COPY into staging, idempotent inserts.

Per batch: host and provider ids are resolved (own committed transaction, cached), daily
partitions are made to exist, the ``gpu_facts`` id of each GPU's rarely changing values is
found (cached; new sets upserted in their own committed transaction), then in one
transaction: host rows are COPYed to a staging table and inserted with ``ON CONFLICT DO
NOTHING RETURNING`` (the key is host, boot id, sequence); only the GPU rows of frames that were
new are COPYed, and their (host, minute) marked for the one-minute rollups. Events and
inventory reports are deduplicated on the same key. Rejected frames go in the same transaction.
The caller acknowledges after commit.

Connection failures propagate (the caller retries with backoff); data a PostgreSQL column
refuses is isolated frame by frame and rejected as ``unstorable``, never retried forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final

import asyncpg

from collector.config import PostgresSection
from collector.store import db, partitions
from collector.store.rows import (
    FACT_COLUMNS,
    GPU_COLUMNS,
    HOST_COLUMNS,
    HOST_STAGE_COLUMNS,
    ROLLUP_METRICS,
    FrameKey,
    dumps,
    event_row,
    fact_values,
    host_row,
    storage_problem,
    utc,
)
from collector.store.rows import gpu_rows as make_gpu_rows
from shared.frames import EventFrame, Frame, InventoryFrame, SampleFrame, to_wire

log = logging.getLogger(__name__)
LAST_SEEN_EVERY: Final = 30.0  # seconds between hosts/gpus.last_seen updates per host
# a batch's rows are built and encoded for COPY in slices, between turns of the event loop: a
# batch of 1,000 frames is ~30 ms of CPU per table, which the fast event path (an XID) and the
# API would otherwise wait for (each slice ~1-2 ms)
FRAMES_PER_TURN: Final = 64
ROWS_PER_TURN: Final = 512

EVENT_COLUMNS: Final = (
    "ts",
    "host_id",
    "boot_id",
    "seq",
    "type",
    "source",
    "gpu_index",
    "gpu_uuid",
    "xid",
    "count",
    "value",
    "message",
)


def _samples_sql(types: Mapping[str, str]) -> str:
    """One statement for a batch's host rows, sent as one array per column (``types``: each
    column's SQL type): insert those that are new (the idempotence key is host, boot id,
    sequence) and return their numbers; the GPU rows of exactly those frames are then COPYed
    straight into ``gpu_samples``. Rollups are not touched here (:meth:`Writer.flush_rollups`).
    No staging table: a commit that touched a temporary table truncates the session's ``ON
    COMMIT DELETE ROWS`` tables, which cost PostgreSQL more CPU than the rows (docs/storage.md)."""
    hcols = ", ".join(HOST_COLUMNS)
    arrays = ", ".join(f"${i}::{types[c]}[]" for i, c in enumerate(HOST_STAGE_COLUMNS, 1))
    # identifiers and types come from constants and the catalog, never from input
    return (
        f"WITH s AS (SELECT * FROM unnest({arrays}) AS s({', '.join(HOST_STAGE_COLUMNS)})),"  # noqa: S608
        f" new AS (INSERT INTO host_samples ({hcols}) SELECT {hcols} FROM s"
        " ON CONFLICT DO NOTHING RETURNING host_id, boot_id, seq)"
        " SELECT s.n FROM s JOIN new USING (host_id, boot_id, seq)"
    )


def _rollup_sql() -> str:
    """Recompute the one-minute rollups of the given (host, minute) pairs from the stored samples
    (overwriting: running it twice, or after more rows came, gives the right figures)."""
    cols, aggs, sets = [], [], ["n = EXCLUDED.n"]
    for m in ROLLUP_METRICS:
        for part, agg in (("min", "min"), ("max", "max"), ("sum", "sum"), ("n", "count")):
            cols.append(f"{m}_{part}")
            aggs.append(f"{agg}(s.{m}::float8)" if part == "sum" else f"{agg}(s.{m})")  # real sums in float8
            sets.append(f"{m}_{part} = EXCLUDED.{m}_{part}")
    return (
        f"INSERT INTO gpu_rollup_1m AS r (host_id, gpu_index, minute, n, {', '.join(cols)})"  # noqa: S608
        " SELECT p.host_id, s.* FROM unnest($1::int[], $2::timestamptz[]) AS p(host_id, minute)"
        f" CROSS JOIN LATERAL (SELECT s.gpu_index, p.minute, count(*), {', '.join(aggs)} FROM gpu_samples s"
        "  WHERE s.host_id = p.host_id AND s.ts >= p.minute AND s.ts < p.minute + interval '1 minute'"
        "  GROUP BY s.gpu_index) s"
        f" ON CONFLICT (host_id, gpu_index, minute) DO UPDATE SET {', '.join(sets)}"
    )


ROLLUP_SQL: Final = _rollup_sql()
MARK_SQL: Final = (
    "INSERT INTO gpu_rollup_pending (host_id, minute)"
    " SELECT * FROM unnest($1::int[], $2::timestamptz[]) ON CONFLICT DO NOTHING"
)
# the marks first: a batch committing meanwhile either sees its mark kept, or its rows counted
UNMARK_SQL: Final = (
    "DELETE FROM gpu_rollup_pending p USING unnest($1::int[], $2::timestamptz[]) AS v(host_id, minute)"
    " WHERE p.host_id = v.host_id AND p.minute = v.minute"
)
ROLLUP_SLACK: Final = 5.0  # a host's minute is rolled up once it sent a sample this long after it
ROLLUP_MAX_WAIT: Final = 90.0  # ... or, if it fell silent, this long after it was marked
_FACTS_SQL: Final = (
    f"WITH ins AS (INSERT INTO gpu_facts ({', '.join(FACT_COLUMNS)})"  # noqa: S608 (constant names)
    f" SELECT {', '.join(FACT_COLUMNS)} FROM stage_facts ON CONFLICT DO NOTHING"
    " RETURNING id, day, host_id, gpu_index, key)"
    " SELECT s.n, coalesce(i.id, f.id) FROM stage_facts s"
    " LEFT JOIN ins i USING (day, host_id, gpu_index, key)"
    " LEFT JOIN gpu_facts f USING (day, host_id, gpu_index, key)"
)
_STAGE_FACTS: Final = ("n", *FACT_COLUMNS)
FactsKey = tuple[date, int, int, tuple[Any, ...]]  # (day, host_id, GPU index, fact values)
# Staging tables of what is written now and then (a batch's host rows go as arrays instead): they
# keep their rows and are emptied (TRUNCATE) by the transaction that used them. ON COMMIT DELETE
# ROWS would have PostgreSQL truncate them at every commit that touched a temporary table (about
# 0.4 ms of the backend's CPU per table and commit, measured).
_STAGING: Final = (
    f"CREATE TEMP TABLE IF NOT EXISTS stage_facts ON COMMIT PRESERVE ROWS AS"  # noqa: S608 (constant)
    f" SELECT 0 AS n, {', '.join(FACT_COLUMNS)} FROM gpu_facts WITH NO DATA",
    f"CREATE TEMP TABLE IF NOT EXISTS stage_event ON COMMIT PRESERVE ROWS AS"  # noqa: S608 (constant)
    f" SELECT {', '.join(EVENT_COLUMNS)} FROM events WITH NO DATA",
)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A decoded frame that passed every check, with where it came from."""

    frame: Frame
    subject: str = ""
    stream_seq: int | None = None
    size: int = 0  # bytes on the wire
    head: bytes = b""  # the first bytes, kept if the frame is rejected later
    dropped_gpus: tuple[tuple[str, str | None], ...] = ()  # GPU entries refused: (reason, field)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A frame that will not be stored as data: why, and its first bytes."""

    subject: str
    reason: str
    field: str | None
    size: int
    head: bytes
    stream_seq: int | None = None
    message: str = ""


@dataclass(slots=True)
class WriteResult:
    new: list[Frame] = field(default_factory=list)  # committed now, in batch order
    duplicates: int = 0  # already stored (redelivery)
    rejected: list[Rejection] = field(default_factory=list)  # stored in rejected_frames
    gpu_rows: int = 0
    seconds: float = 0.0


class Writer:
    """Writes batches over one dedicated connection (reconnected after a failure)."""

    def __init__(self, cfg: PostgresSection, dsn: str | None = None, max_skew: float = 30.0) -> None:
        self._cfg = cfg
        self._dsn = dsn
        # frames dated beyond this allowance ahead of our clock ([health] max_clock_skew) are
        # stored, but never move a host's last_seen or current inventory into the future
        self.max_skew = max_skew
        self._conn: asyncpg.Connection | None = None
        self._hosts: dict[str, tuple[int, str]] = {}  # host -> (id, provider)
        self._providers: dict[str, int] = {}
        self._days: set[date] = set()
        self._gpus: dict[tuple[int, int], str] = {}  # (host_id, index) -> uuid stored
        # (host_id, index) -> (day, values, id): the gpu_facts row of the GPU's newest facts
        self._facts: dict[tuple[int, int], tuple[date, tuple[Any, ...], int]] = {}
        self._seen_written: dict[int, float] = {}  # host_id -> monotonic time of last update
        # (host_id, minute start) -> monotonic time marked: minutes whose rollups are to be written
        self._pending: dict[tuple[int, float], float] = {}
        self._newest: dict[int, float] = {}  # host_id -> newest sample time stored
        self._samples_sql = ""  # per connection: its column types are read from the catalog

    async def connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await db.connect(self._cfg, self._dsn)
            # acknowledging after commit needs the commit durable, whatever the server default
            await conn.execute("SET synchronous_commit = on")
            for sql in _STAGING:
                await conn.execute(sql)
            types = await conn.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = 'host_samples'::regclass AND attnum > 0 AND NOT attisdropped"
            )
            self._samples_sql = _samples_sql({"n": "integer", **{r[0]: r[1] for r in types}})
            now = time.monotonic()  # marks left by a crash, or by a batch whose commit we did not see
            marks = await conn.fetch("SELECT host_id, minute FROM gpu_rollup_pending")
            self._pending = {(r[0], r[1].timestamp()): now for r in marks}
            self._conn = conn
            self._days = set()
        return self._conn

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
        self._conn = None

    def _forget(self) -> None:
        """Drop the id caches (the database may have lost or changed rows, e.g. a crash)."""
        self._hosts.clear()
        self._providers.clear()
        self._gpus.clear()
        self._facts.clear()
        self._days.clear()

    async def reset(self) -> None:
        """Forget the connection after a failure (the next write reconnects)."""
        self._forget()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def write(self, accepted: Sequence[Accepted], rejected: Sequence[Rejection] = ()) -> WriteResult:
        """Store one batch; return what was new. Raises only on connection/server failure."""
        t0 = time.perf_counter()
        try:
            result = await self._write(accepted, rejected)
        except Exception as e:
            if db.is_transient(e):
                raise
            log.warning("batch refused (%s: %s); isolating frames", type(e).__name__, e)
            self._forget()
            result = await self._isolate(accepted, rejected)
        result.seconds = time.perf_counter() - t0
        return result

    async def _isolate(self, accepted: Sequence[Accepted], rejected: Sequence[Rejection]) -> WriteResult:
        rejects = list(rejected)
        good: list[Accepted] = []
        for a in accepted:
            try:
                p = storage_problem(a.frame)
            except Exception as e:  # noqa: BLE001
                rejects.append(_reject(a, "store_error", None, f"{type(e).__name__}: {e}"[:500]))
                continue
            if p is None:
                good.append(a)
            else:
                rejects.append(_reject(a, "unstorable", p.field, p.message))
        try:
            return await self._write(good, rejects)
        except Exception as e:
            if db.is_transient(e):
                raise
        self._forget()
        total = WriteResult()
        for a in good:  # the slow path: one frame per transaction
            try:
                one = await self._write([a], [])
            except Exception as e:
                if db.is_transient(e):
                    raise
                self._forget()
                reason = "unstorable" if isinstance(e, _REFUSED) else "store_error"
                rejects.append(_reject(a, reason, None, f"{type(e).__name__}: {e}"[:500]))
                continue
            total.new += one.new
            total.duplicates += one.duplicates
            total.gpu_rows += one.gpu_rows
        total.rejected = await self._write_rejections(rejects)
        return total

    async def _write_rejections(self, rejects: list[Rejection]) -> list[Rejection]:
        """Store rejections, all at once or one by one; one that cannot be stored is only returned
        (counted by the caller), never retried forever."""
        try:
            return (await self._write([], rejects)).rejected
        except Exception as e:
            if db.is_transient(e):
                raise
        for r in rejects:
            try:
                await self._write([], [r])
            except Exception as e:
                if db.is_transient(e):
                    raise
                log.warning("rejection of message %s not stored: %s: %s", r.stream_seq, type(e).__name__, e)
        return rejects

    async def _write(self, accepted: Sequence[Accepted], rejected: Sequence[Rejection]) -> WriteResult:
        conn = await self.connection()
        frames = [a.frame for a in accepted]
        await self._resolve_hosts(conn, frames)
        days = {partitions.day_of(f.ts) for f in frames if type(f) is SampleFrame}
        if not days <= self._days:
            await partitions.ensure_partitions(conn, days - self._days)
            self._days |= days
        result = WriteResult()
        new_gpus: dict[tuple[int, int], str] = {}
        marks: list[tuple[int, float]] = []
        samples = [f for f in frames if type(f) is SampleFrame]
        facts = await self._resolve_facts(conn, samples) if samples else []
        async with conn.transaction():
            events = [f for f in frames if type(f) is EventFrame]
            inventories = [f for f in frames if type(f) is InventoryFrame]
            new_keys: set[FrameKey] = set()
            if samples:
                new_keys |= await self._write_samples(conn, samples, facts, result, new_gpus, marks)
            if events:
                new_keys |= await self._write_events(conn, events)
            for inv in inventories:
                if await self._write_inventory(conn, inv):
                    new_keys.add(self._key(inv))
            if rejected:
                await conn.executemany(
                    "INSERT INTO rejected_frames (stream_seq, subject, reason, field, size, head)"
                    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (stream_seq) DO NOTHING",
                    [
                        (r.stream_seq, _text(r.subject), r.reason, _text(r.field), r.size, r.head)
                        for r in rejected
                    ],
                )
            await self._touch_last_seen(conn, frames)
        self._gpus.update(new_gpus)
        now = time.monotonic()
        for mark in marks:
            self._pending.setdefault(mark, now)
        for f in frames:
            if self._key(f) in new_keys:
                result.new.append(f)
                new_keys.discard(self._key(f))  # a frame twice in one batch counts once
            else:
                result.duplicates += 1
        result.rejected = list(rejected)
        return result

    def _key(self, f: Frame) -> FrameKey:
        return (self._hosts[f.host][0], f.boot_id, f.seq)

    async def _resolve_hosts(self, conn: asyncpg.Connection, frames: Sequence[Frame]) -> None:
        """The ``hosts`` id of every host of ``frames`` not in memory (or whose provider changed):
        upserted, with their new providers, in one transaction of two statements whatever their
        number (a collector restarted with a backlog, or a new fleet, meets hundreds at once: one
        transaction each made one commit, one WAL flush, each). Names go in sorted order, so two
        collectors upserting the same hosts lock their rows in the same order."""
        missing = {
            f.host: f for f in frames if f.host not in self._hosts or self._hosts[f.host][1] != f.provider
        }
        if not missing:
            return
        names = sorted(missing)
        providers = dict(self._providers)
        async with conn.transaction():
            new_providers = sorted({missing[h].provider for h in names} - providers.keys())
            if new_providers:
                found = await conn.fetch(
                    "INSERT INTO providers (name) SELECT * FROM unnest($1::text[])"
                    " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id, name",
                    new_providers,
                )
                providers.update({name: pid for pid, name in found})
            newest = time.time() + self.max_skew
            rows = await conn.fetch(
                "INSERT INTO hosts (name, provider_id, first_seen, last_seen, boot_id)"
                " SELECT n, p, t, t, b FROM unnest($1::text[], $2::int[], $3::timestamptz[], $4::text[])"
                " AS v(n, p, t, b)"
                " ON CONFLICT (name) DO UPDATE SET provider_id = EXCLUDED.provider_id RETURNING id, name",
                names,
                [providers[missing[h].provider] for h in names],
                [utc(min(missing[h].ts, newest)) for h in names],
                [missing[h].boot_id for h in names],
            )
        self._providers = providers
        for hid, name in rows:
            self._hosts[name] = (hid, missing[name].provider)

    async def _resolve_facts(self, conn: asyncpg.Connection, samples: list[SampleFrame]) -> list[list[int]]:
        """The ``gpu_facts`` id of each GPU of each sample (in order): from memory when the GPU's
        facts are those it had last, else looked up or inserted (ON CONFLICT DO NOTHING) in a
        transaction of their own, committed before the batch's (an id in memory always names a
        committed row; a batch that fails leaves at most unreferenced facts rows)."""
        known = self._facts
        out: list[list[int]] = []
        missing: dict[FactsKey, list[tuple[list[int], int]]] = {}
        for n, f in enumerate(samples):
            if n % FRAMES_PER_TURN == FRAMES_PER_TURN - 1:
                await asyncio.sleep(0)
            hid = self._hosts[f.host][0]
            day = partitions.day_of(f.ts)
            ids: list[int] = []
            for g in f.gpus:
                values = fact_values(g)
                have = known.get((hid, g.index))
                if have is not None and have[0] == day and have[1] == values:
                    ids.append(have[2])
                else:
                    missing.setdefault((day, hid, g.index, values), []).append((ids, len(ids)))
                    ids.append(0)
            out.append(ids)
        if missing:
            found = await self._store_facts(conn, list(missing))
            for (day, hid, index, values), places in missing.items():
                fid = found[(day, hid, index, values)]
                for ids, i in places:
                    ids[i] = fid
                known[(hid, index)] = (day, values, fid)
        return out

    async def _store_facts(self, conn: asyncpg.Connection, keys: list[FactsKey]) -> dict[FactsKey, int]:
        rows = {n: (n, day, h, i, dumps(values), *values) for n, (day, h, i, values) in enumerate(keys)}
        found: dict[FactsKey, int] = {}
        for _ in range(3):  # a row another collector inserted after this statement began: seen next time
            async with conn.transaction():
                stage = list(rows.values())
                await conn.copy_records_to_table("stage_facts", records=stage, columns=_STAGE_FACTS)
                for n, fid in await conn.fetch(_FACTS_SQL):
                    if fid is not None:
                        found[keys[n]] = fid
                        del rows[n]
                await conn.execute("TRUNCATE stage_facts")
            if not rows:
                return found
        raise RuntimeError(f"{len(rows)} gpu_facts rows neither inserted nor found")

    async def _write_samples(
        self,
        conn: asyncpg.Connection,
        samples: list[SampleFrame],
        facts: list[list[int]],
        result: WriteResult,
        new_gpus: dict[tuple[int, int], str],
        marks: list[tuple[int, float]],
    ) -> set[FrameKey]:
        host_rows: list[tuple[Any, ...]] = []
        numbered: list[tuple[FrameKey, SampleFrame, datetime, list[int]]] = []
        keys: set[FrameKey] = set()
        for n, (f, ids) in enumerate(zip(samples, facts, strict=True)):
            if n % FRAMES_PER_TURN == FRAMES_PER_TURN - 1:
                await asyncio.sleep(0)
            hid = self._hosts[f.host][0]
            key = (hid, f.boot_id, f.seq)
            if key in keys:
                continue
            keys.add(key)
            ts = utc(f.ts)
            host_rows.append(host_row(f, hid, ts, len(numbered)))
            numbered.append((key, f, ts, ids))
        fresh = await conn.fetch(self._samples_sql, *(list(c) for c in zip(*host_rows, strict=True)))
        new_keys: set[FrameKey] = set()
        fresh_marks: set[tuple[int, float]] = set()
        gpu_rows: list[tuple[Any, ...]] = []
        for n, r in enumerate(fresh):
            if n % FRAMES_PER_TURN == FRAMES_PER_TURN - 1:
                await asyncio.sleep(0)
            key, f, ts, ids = numbered[r[0]]
            new_keys.add(key)
            gpu_rows += make_gpu_rows(f, key[0], ts, ids)  # only the new frames' rows are built and sent
            result.gpu_rows += len(f.gpus)
            if f.gpus:
                mark = (key[0], f.ts - f.ts % 60)
                if mark not in self._pending:
                    fresh_marks.add(mark)
                if f.ts > self._newest.get(key[0], 0.0):
                    self._newest[key[0]] = f.ts
            for g in f.gpus:
                if g.uuid and self._gpus.get((key[0], g.index)) != g.uuid:  # "": no inventory yet
                    new_gpus[(key[0], g.index)] = g.uuid
        if gpu_rows:
            await conn.copy_records_to_table("gpu_samples", records=_paced(gpu_rows), columns=GPU_COLUMNS)
        if fresh_marks:
            marks.extend(fresh_marks)
            await conn.execute(MARK_SQL, [m[0] for m in fresh_marks], [utc(m[1]) for m in fresh_marks])
        if new_gpus:
            await self._upsert_gpus_seen(conn, new_gpus, {k: f for k, f, _, _ in numbered}, new_keys)
        return new_keys

    def rollups_due(self, everything: bool = False) -> list[tuple[int, float]]:
        """Marked (host, minute) pairs whose rollups can be written now: the host has sent a
        sample ``ROLLUP_SLACK`` after the minute, or the mark is ``ROLLUP_MAX_WAIT`` old."""
        if not self._pending:
            return []
        # only hosts this writer stores (partitioned collectors each write their own hosts' marks;
        # a mark of a host not seen since a restart waits for it, and history reads it raw meanwhile)
        mine = {h for h, _ in self._hosts.values()}
        now = time.monotonic()
        newest = self._newest
        return [
            (hid, minute)
            for (hid, minute), marked in self._pending.items()
            if hid in mine
            and (
                everything
                or newest.get(hid, 0.0) >= minute + 60.0 + ROLLUP_SLACK
                or now - marked >= ROLLUP_MAX_WAIT
            )
        ]

    async def flush_rollups(self, everything: bool = False) -> int:
        """Write the rollups that are due (all marked ones with ``everything``), once each, in one
        transaction with the removal of their marks; returns the (host, minute) pairs written.
        Raises on connection failure (the marks stay, in memory and in PostgreSQL)."""
        due = self.rollups_due(everything)
        if not due:
            return 0
        conn = await self.connection()
        ids, minutes = [d[0] for d in due], [utc(d[1]) for d in due]
        async with conn.transaction():
            await conn.execute(UNMARK_SQL, ids, minutes)
            await conn.execute(ROLLUP_SQL, ids, minutes)
        for d in due:
            self._pending.pop(d, None)
        return len(due)

    async def _upsert_gpus_seen(
        self,
        conn: asyncpg.Connection,
        new_gpus: dict[tuple[int, int], str],
        per_frame: dict[FrameKey, SampleFrame],
        new_keys: set[FrameKey],
    ) -> None:
        last: dict[int, datetime] = {}
        limit = time.time() + self.max_skew
        for key in new_keys:
            ts = utc(min(per_frame[key].ts, limit))
            if key[0] not in last or ts > last[key[0]]:
                last[key[0]] = ts
        await conn.executemany(
            "INSERT INTO gpus (host_id, uuid, idx, first_seen, last_seen) VALUES ($1, $2, $3, $4, $4)"
            " ON CONFLICT (host_id, uuid) DO UPDATE SET idx = EXCLUDED.idx, present = true,"
            " last_seen = greatest(gpus.last_seen, EXCLUDED.last_seen)",
            [(hid, uuid, idx, last[hid]) for (hid, idx), uuid in new_gpus.items() if hid in last],
        )

    async def _write_events(self, conn: asyncpg.Connection, events: list[EventFrame]) -> set[FrameKey]:
        rows = [event_row(f, self._hosts[f.host][0]) for f in events]
        await conn.copy_records_to_table("stage_event", records=rows, columns=EVENT_COLUMNS)
        cols = ", ".join(EVENT_COLUMNS)
        inserted = await conn.fetch(
            f"INSERT INTO events ({cols}) SELECT DISTINCT ON (host_id, boot_id, seq) {cols}"  # noqa: S608
            " FROM stage_event ON CONFLICT DO NOTHING RETURNING host_id, boot_id, seq"
        )
        await conn.execute("TRUNCATE stage_event")
        return {(r[0], r[1], r[2]) for r in inserted}

    async def _write_inventory(self, conn: asyncpg.Connection, f: InventoryFrame) -> bool:
        hid = self._hosts[f.host][0]
        ts = utc(f.ts)
        new = await conn.fetchval(
            "INSERT INTO inventory_reports (host_id, boot_id, seq, ts, data) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT DO NOTHING RETURNING true",
            hid,
            f.boot_id,
            f.seq,
            ts,
            dumps(to_wire(f)),
        )
        if not new:
            return False
        limit = time.time() + self.max_skew
        if f.ts > limit:  # stored; the host's current inventory stays the newest within the allowance
            return True
        newest = await conn.fetchval(
            "UPDATE hosts SET boot_id = $2, backend = $3, driver_version = $4, cuda_version = $5,"
            " nvml_version = $6, facts = $7, inventory_ts = $8,"
            " last_seen = CASE WHEN last_seen > $9 THEN $8 ELSE greatest(last_seen, $8) END"
            " WHERE id = $1 AND (inventory_ts IS NULL OR inventory_ts <= $8 OR inventory_ts > $9)"
            " RETURNING true",
            hid,
            f.boot_id,
            f.backend,
            f.driver_version,
            f.cuda_version,
            f.nvml_version,
            dumps(to_wire(f.host_facts)) if f.host_facts is not None else None,
            ts,
            utc(limit),
        )
        if newest:
            await _reconcile_gpus(conn, hid, f, ts)
            for h, idx in [k for k in self._gpus if k[0] == hid]:
                del self._gpus[(h, idx)]
        return True

    async def _touch_last_seen(self, conn: asyncpg.Connection, frames: Sequence[Frame]) -> None:
        now = time.monotonic()
        limit = time.time() + self.max_skew
        latest: dict[int, float] = {}
        for f in frames:
            hid = self._hosts[f.host][0]
            if f.ts > limit:  # a clock ahead: not a sign of life dated in the future
                continue
            if now - self._seen_written.get(hid, -1e9) >= LAST_SEEN_EVERY and f.ts > latest.get(hid, 0.0):
                latest[hid] = f.ts
        if not latest:
            return
        ids, stamps = list(latest), [utc(latest[h]) for h in latest]
        # a last_seen pushed ahead of the allowance (before this bound existed) is taken back
        await conn.execute(
            "UPDATE hosts h SET last_seen"
            " = CASE WHEN h.last_seen > $3 THEN v.ts ELSE greatest(h.last_seen, v.ts) END"
            " FROM unnest($1::int[], $2::timestamptz[]) AS v(id, ts) WHERE h.id = v.id",
            ids,
            stamps,
            utc(limit),
        )
        await conn.execute(
            "UPDATE gpus g SET last_seen"
            " = CASE WHEN g.last_seen > $3 THEN v.ts ELSE greatest(g.last_seen, v.ts) END"
            " FROM unnest($1::int[], $2::timestamptz[]) AS v(id, ts) WHERE g.host_id = v.id AND g.present",
            ids,
            stamps,
            utc(limit),
        )
        for h in ids:
            self._seen_written[h] = now


async def _reconcile_gpus(conn: asyncpg.Connection, hid: int, f: InventoryFrame, ts: datetime) -> None:
    """Make ``gpus`` match an inventory frame and record each difference as a change."""
    current = {
        r["uuid"]: r
        for r in await conn.fetch("SELECT uuid, idx, info, present FROM gpus WHERE host_id = $1", hid)
    }
    changes: list[tuple[Any, ...]] = []
    reported = set()
    for g in f.gpus:
        reported.add(g.uuid)
        info = to_wire(g)
        row = current.get(g.uuid)
        old = json.loads(row["info"]) if row is not None and row["info"] is not None else None
        if row is None or (old is None and row["present"]):  # new, or first inventory of it
            changes.append((hid, g.uuid, ts, "added", None, dumps(info)))
        elif old != info or not row["present"]:
            changes.append((hid, g.uuid, ts, "changed", dumps(old) if old else None, dumps(info)))
        await conn.execute(
            "INSERT INTO gpus (host_id, uuid, idx, name, serial, pci_bus_id, mem_total_bytes, vbios,"
            " mig_mode, info, present, first_seen, last_seen)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, true, $11, $11)"
            " ON CONFLICT (host_id, uuid) DO UPDATE SET idx = EXCLUDED.idx, name = EXCLUDED.name,"
            " serial = EXCLUDED.serial, pci_bus_id = EXCLUDED.pci_bus_id,"
            " mem_total_bytes = EXCLUDED.mem_total_bytes, vbios = EXCLUDED.vbios,"
            " mig_mode = EXCLUDED.mig_mode, info = EXCLUDED.info, present = true,"
            " last_seen = greatest(gpus.last_seen, EXCLUDED.last_seen)",
            hid,
            g.uuid,
            g.index,
            g.name,
            g.serial,
            g.pci_bus_id,
            g.mem_total_bytes,
            g.vbios,
            g.mig_mode,
            dumps(info),
            ts,
        )
    for uuid, row in current.items():
        if uuid not in reported and row["present"]:
            changes.append((hid, uuid, ts, "removed", row["info"], None))
            await conn.execute("UPDATE gpus SET present = false WHERE host_id = $1 AND uuid = $2", hid, uuid)
    if changes:
        await conn.executemany(
            "INSERT INTO gpu_inventory_changes (host_id, uuid, ts, change, old, new)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            changes,
        )


_REFUSED: Final = (asyncpg.PostgresError, ValueError, TypeError, OverflowError)  # data PostgreSQL refuses


def _text(value: str | None, limit: int = 1024) -> str | None:
    """A string PostgreSQL's text column takes: no NUL, valid UTF-8, bounded."""
    if value is None:
        return None
    return value[:limit].encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def _reject(a: Accepted, reason: str, field_: str | None, message: str) -> Rejection:
    return Rejection(a.subject, reason, field_, a.size, a.head, a.stream_seq, message)


async def _paced(rows: Sequence[tuple[Any, ...]]) -> AsyncIterator[tuple[Any, ...]]:
    """``rows`` for a COPY, with a turn of the event loop every ``ROWS_PER_TURN`` of them
    (asyncpg encodes a list in one go)."""
    for i in range(0, len(rows), ROWS_PER_TURN):
        if i:
            await asyncio.sleep(0)
        for row in rows[i : i + ROWS_PER_TURN]:
            yield row
