"""Read queries for the API and for rebuilding the fleet state at start.

Metric names are checked against the columns of the sample tables (the fields of
:class:`shared.frames.GpuSample` and :class:`shared.frames.SystemSample`); only those names
ever reach SQL text, values are always parameters. Times are Unix seconds (float, UTC).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeAlias

import asyncpg

from collector.store.rows import GPU_FIELDS, ROLLUP_METRICS, SYSTEM_FIELDS, detail_to_wire, utc
from shared import SCHEMA_VERSION
from shared.errors import FrameDecodeError, GpuwardenError
from shared.frames import EventFrame, GpuSample, InventoryFrame, SampleFrame, SystemSample, fields, from_wire

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool
GPU_METRICS: Final = frozenset(
    f.name for f in fields(GpuSample) if f.name in GPU_FIELDS and "bool" not in str(f.type)
)
HOST_METRICS: Final = frozenset(f.name for f in fields(SystemSample) if f.name in SYSTEM_FIELDS)
MAX_POINTS: Final = 100_000  # buckets one aggregated query may return
MAX_PAGE: Final = 10_000


class QueryError(GpuwardenError):
    """A query's arguments are invalid (unknown metric, bad range, bad cursor)."""


class UnknownHostError(QueryError):
    """No host of that name has ever reported."""


@dataclass(frozen=True, slots=True)
class Point:
    """One history point: a raw sample (min = max = value, count 1) or an aggregated bucket."""

    ts: float  # the sample time, or the bucket's start
    gpu: int | None  # GPU index; None for host metrics
    value: float | None  # the sample, or the bucket's mean
    min: float | None
    max: float | None
    count: int  # samples with a value in the bucket


@dataclass(frozen=True, slots=True)
class HistoryPage:
    points: list[Point]
    next_cursor: str | None  # pass back as ``cursor`` for the next page (raw history only)
    source: str  # "raw", "raw_agg" or "rollup_1m"


async def host_id(conn: Conn, host: str) -> int:
    hid: int | None = await conn.fetchval("SELECT id FROM hosts WHERE name = $1", host)
    if hid is None:
        raise UnknownHostError(f"unknown host {host!r}")
    return hid


async def history(
    conn: Conn,
    host: str,
    metric: str,
    since: float,
    until: float,
    *,
    step: float | None = None,
    gpu: int | None = None,
    cursor: str | None = None,
    limit: int = 1000,
) -> HistoryPage:
    """History of ``metric`` for ``host`` (every GPU, or GPU index ``gpu``) over [since, until).

    Without ``step``: every stored sample in (ts, gpu) order, ``limit`` per page, continued
    with ``cursor``. With ``step`` (seconds): one point per bucket and GPU with mean, min, max
    and count, from the one-minute rollups when ``step`` is a multiple of 60 and the metric
    has rollups, else aggregated from the raw samples. Raises :class:`QueryError`.
    """
    if metric in GPU_METRICS:
        table, is_gpu = "gpu_readings", True  # gpu_samples with its facts (docs/storage.md)
    elif metric in HOST_METRICS:
        table, is_gpu = "host_samples", False
        if gpu is not None:
            raise QueryError(f"{metric} is a host metric; do not give a GPU")
    else:
        raise QueryError(f"unknown metric {metric!r}")
    if not until > since:
        raise QueryError("until must be after since")
    hid = await host_id(conn, host)
    if step is None:
        return await _raw(conn, table, is_gpu, hid, metric, since, until, gpu, cursor, limit)
    if step <= 0 or (until - since) / step > MAX_POINTS:
        raise QueryError(f"step must be positive and give at most {MAX_POINTS} points")
    if is_gpu and metric in ROLLUP_METRICS and step % 60 == 0:
        return await _rollup(conn, hid, metric, since, until, step, gpu)
    return await _aggregate(conn, table, is_gpu, hid, metric, since, until, step, gpu)


def _window(
    hid: int, since: float, until: float, arg4: Any, gpu: int | None, ts: str = "ts"
) -> tuple[list[Any], str]:
    """Arguments ``$1..$4`` (host, window, the query's own ``arg4``) and the WHERE clause over
    column ``ts``, with ``AND gpu_index = $5`` when one GPU is asked for."""
    args: list[Any] = [hid, utc(since), utc(until), arg4]
    where = f"host_id = $1 AND {ts} >= $2 AND {ts} < $3"
    if gpu is not None:
        args.append(gpu)
        where += f" AND gpu_index = ${len(args)}"
    return args, where


async def _raw(
    conn: Conn,
    table: str,
    is_gpu: bool,
    hid: int,
    metric: str,
    since: float,
    until: float,
    gpu: int | None,
    cursor: str | None,
    limit: int,
) -> HistoryPage:
    limit = max(1, min(limit, MAX_PAGE))
    after_ts, after_gpu = _parse_cursor(cursor) if cursor else (None, -1)
    idx = "gpu_index" if is_gpu else "-1"
    args, where = _window(hid, since, until, limit + 1, gpu)
    if after_ts is not None:
        args += [after_ts, after_gpu]
        where += f" AND (ts, {idx}) > (${len(args) - 1}, ${len(args)})"
    rows = await conn.fetch(
        f"SELECT ts, {idx} AS g, {metric}::float8 AS v FROM {table}"  # noqa: S608 (checked names)
        f" WHERE {where} ORDER BY ts, g LIMIT $4",
        *args,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    points = [
        Point(
            r["ts"].timestamp(), r["g"] if is_gpu else None, r["v"], r["v"], r["v"], int(r["v"] is not None)
        )
        for r in rows
    ]
    nxt = None
    if more and rows:
        last = rows[-1]
        nxt = f"{_us(last['ts'])}:{last['g']}"
    return HistoryPage(points, nxt, "raw")


async def _aggregate(
    conn: Conn,
    table: str,
    is_gpu: bool,
    hid: int,
    metric: str,
    since: float,
    until: float,
    step: float,
    gpu: int | None,
) -> HistoryPage:
    idx = "gpu_index" if is_gpu else "-1"
    args, where = _window(hid, since, until, float(step), gpu)
    rows = await conn.fetch(
        f"SELECT floor(extract(epoch FROM ts) / $4) * $4 AS b, {idx} AS g,"  # noqa: S608 (checked names)
        f" avg({metric})::float8 AS v, min({metric})::float8 AS lo, max({metric})::float8 AS hi,"
        f" count({metric}) AS n FROM {table} WHERE {where} GROUP BY 1, 2 ORDER BY 1, 2",
        *args,
    )
    return HistoryPage([_point(r, is_gpu) for r in rows], None, "raw_agg")


async def _rollup(
    conn: Conn, hid: int, metric: str, since: float, until: float, step: float, gpu: int | None
) -> HistoryPage:
    """From ``gpu_rollup_1m``; minutes still marked in ``gpu_rollup_pending`` (their rollups are
    written once the minute is over) are aggregated from the raw samples the same way."""
    args, where = _window(hid, since, until, float(step), gpu, ts="minute")
    m = metric
    one = f" AND s.gpu_index = ${len(args)}" if gpu is not None else ""
    rows = await conn.fetch(
        f"SELECT floor(extract(epoch FROM minute) / $4) * $4 AS b, g,"  # noqa: S608 (checked names)
        " (sum(t) / nullif(sum(c), 0))::float8 AS v, min(lo)::float8 AS lo, max(hi)::float8 AS hi,"
        " sum(c) AS n FROM ("
        f" SELECT minute, gpu_index AS g, {m}_sum AS t, {m}_n AS c, {m}_min AS lo, {m}_max AS hi"
        f" FROM gpu_rollup_1m r WHERE {where} AND NOT EXISTS (SELECT 1 FROM gpu_rollup_pending p"
        "  WHERE p.host_id = r.host_id AND p.minute = r.minute)"
        " UNION ALL SELECT p.minute, s.* FROM gpu_rollup_pending p CROSS JOIN LATERAL"
        f" (SELECT s.gpu_index, sum(s.{m}::float8), count(s.{m}), min(s.{m}), max(s.{m}) FROM gpu_samples s"
        f"  WHERE s.host_id = p.host_id AND s.ts >= p.minute AND s.ts < p.minute + interval '1 minute'{one}"
        "  GROUP BY 1) s"
        " WHERE p.host_id = $1 AND p.minute >= $2 AND p.minute < $3"
        ") x GROUP BY 1, 2 ORDER BY 1, 2",
        *args,
    )
    return HistoryPage([_point(r, True) for r in rows], None, "rollup_1m")


def _point(r: asyncpg.Record, is_gpu: bool) -> Point:
    return Point(float(r["b"]), r["g"] if is_gpu else None, r["v"], r["lo"], r["hi"], int(r["n"] or 0))


def _us(ts: datetime) -> int:
    return round(ts.timestamp() * 1_000_000)


CURSOR: Final = re.compile(r"([0-9]{1,17}):(-1|[0-9]{1,4})")  # microseconds below 1e17 : GPU index


def valid_cursor(cursor: str) -> bool:
    """A raw history page's cursor as :func:`history` makes it (``<microseconds>:<gpu>``)."""
    m = CURSOR.fullmatch(cursor)
    return m is not None and int(m[2]) <= 1023


def _parse_cursor(cursor: str) -> tuple[datetime, int]:
    if not valid_cursor(cursor):
        raise QueryError(f"bad cursor {cursor[:50]!r}")
    us, g = cursor.split(":")
    try:
        return utc(int(us) / 1_000_000), int(g)
    except (ValueError, OverflowError, OSError) as e:
        raise QueryError(f"bad cursor {cursor[:50]!r}") from e


# ----------------------------------------------------------------------------- latest state


@dataclass(frozen=True, slots=True)
class HostRow:
    name: str
    provider: str
    first_seen: float
    last_seen: float
    boot_id: str | None


async def hosts(conn: Conn, provider: str | None = None) -> list[HostRow]:
    """Every host that ever reported (optionally of one provider), by name."""
    rows = await conn.fetch(
        "SELECT h.name, p.name AS provider, h.first_seen, h.last_seen, h.boot_id FROM hosts h"
        " JOIN providers p ON p.id = h.provider_id WHERE $1::text IS NULL OR p.name = $1 ORDER BY h.name",
        provider,
    )
    return [
        HostRow(
            r["name"], r["provider"], r["first_seen"].timestamp(), r["last_seen"].timestamp(), r["boot_id"]
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class ProviderRow:
    name: str
    hosts: int
    last_seen: float | None


async def providers(conn: Conn) -> list[ProviderRow]:
    """Every provider with its number of hosts and its newest host's last-seen time."""
    rows = await conn.fetch(
        "SELECT p.name, count(h.id) AS hosts, max(h.last_seen) AS last_seen FROM providers p"
        " LEFT JOIN hosts h ON h.provider_id = p.id GROUP BY p.name ORDER BY p.name"
    )
    return [
        ProviderRow(r["name"], r["hosts"], r["last_seen"].timestamp() if r["last_seen"] else None)
        for r in rows
    ]


async def latest_samples(
    conn: Conn, since: float, host_names: Sequence[str] | None = None, until: float | None = None
) -> list[SampleFrame]:
    """The latest stored sample frame of each host (after ``since``, not after ``until``),
    rebuilt as frames."""
    rows = await conn.fetch(
        "SELECT h.name, p.name AS provider, s.* FROM hosts h JOIN providers p ON p.id = h.provider_id"
        " CROSS JOIN LATERAL (SELECT * FROM host_samples hs WHERE hs.host_id = h.id AND hs.ts >= $1"
        " AND ($3::timestamptz IS NULL OR hs.ts <= $3)"
        " ORDER BY hs.ts DESC LIMIT 1) s WHERE $2::text[] IS NULL OR h.name = ANY($2::text[])",
        utc(since),
        list(host_names) if host_names is not None else None,
        utc(until) if until is not None else None,
    )
    if not rows:
        return []
    gpu_rows = await conn.fetch(
        "SELECT g.*, u.uuid AS known_uuid FROM gpu_readings g"
        " JOIN unnest($1::int[], $2::timestamptz[]) AS k(h, t) ON g.host_id = k.h AND g.ts = k.t"
        " LEFT JOIN LATERAL (SELECT uuid FROM gpus"
        " WHERE gpus.host_id = g.host_id AND gpus.idx = g.gpu_index"
        " ORDER BY present DESC, last_seen DESC LIMIT 1) u ON true"
        " WHERE g.ts >= $3 ORDER BY g.host_id, g.gpu_index",
        [r["host_id"] for r in rows],
        [r["ts"] for r in rows],
        utc(since),
    )
    by_host: dict[int, list[asyncpg.Record]] = {}
    for g in gpu_rows:
        by_host.setdefault(g["host_id"], []).append(g)
    out = []
    for r in rows:
        frame = _sample_frame(r, by_host.get(r["host_id"], []))
        if frame is not None:
            out.append(frame)
    return out


def _sample_frame(r: asyncpg.Record, gpu_rows: list[asyncpg.Record]) -> SampleFrame | None:
    detail = detail_to_wire(json.loads(r["detail"]) if r["detail"] else {})
    gpus = []
    for g in gpu_rows:
        d: dict[str, Any] = {name: g[name] for name in GPU_FIELDS}
        d["index"] = g["gpu_index"]
        d["uuid"] = g["uuid"] or g["known_uuid"] or ""  # facts migrated from before 0010 have none
        d["processes"] = detail["procs"].get(g["gpu_index"], [])
        gpus.append(d)
    raw: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "kind": "sample",
        "host": r["name"],
        "provider": r["provider"],
        "boot_id": r["boot_id"],
        "seq": r["seq"],
        "ts": r["ts"].timestamp(),
        "interval_s": r["interval_s"],
        "gpus": gpus,
        "checks": detail["checks"],
        "agent": detail["agent"],
    }
    if detail["outage"] is not None:
        raw["outage"] = detail["outage"]
    if detail["system"]:
        system = {name: r[name] for name in SYSTEM_FIELDS}
        system["disks"] = detail["disks"]
        system["nics"] = detail["nics"]
        system.update(detail["node"])
        raw["system"] = system
    try:
        frame = from_wire(raw)
    except FrameDecodeError:
        return None
    return frame if type(frame) is SampleFrame else None


async def latest_inventories(conn: Conn, until: float | None = None) -> list[InventoryFrame]:
    """The latest inventory frame of each host (not dated after ``until``)."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (host_id) data FROM inventory_reports WHERE $1::timestamptz IS NULL OR ts <= $1"
        " ORDER BY host_id, ts DESC, seq DESC",
        utc(until) if until is not None else None,
    )
    out = []
    for r in rows:
        try:
            frame = from_wire(json.loads(r["data"]))
        except FrameDecodeError:
            continue
        if type(frame) is InventoryFrame:
            out.append(frame)
    return out


async def recent_events(
    conn: Conn, since: float, host: str | None = None, limit: int = 1000
) -> list[EventFrame]:
    """Events after ``since`` (oldest first), optionally of one host."""
    rows = await conn.fetch(
        "SELECT * FROM (SELECT e.*, h.name, p.name AS provider FROM events e JOIN hosts h ON h.id = e.host_id"
        " JOIN providers p ON p.id = h.provider_id WHERE e.ts >= $1 AND ($2::text IS NULL OR h.name = $2)"
        " ORDER BY e.ts DESC LIMIT $3) x ORDER BY ts",
        utc(since),
        host,
        limit,
    )
    return [
        EventFrame(
            host=r["name"],
            provider=r["provider"],
            boot_id=r["boot_id"],
            seq=r["seq"],
            ts=r["ts"].timestamp(),
            type=r["type"],
            source=r["source"],
            gpu_index=r["gpu_index"],
            gpu_uuid=r["gpu_uuid"],
            xid=r["xid"],
            count=r["count"],
            value=r["value"],
            message=r["message"],
        )
        for r in rows
    ]
