"""Daily range partitions of the sample tables, created ahead and dropped after retention.

Partition names are generated from dates only (``gpu_samples_p20261127``), never from input;
bounds are UTC midnights. Creation takes a transaction-level advisory lock so that several
collectors creating the same day do not race in the catalogue.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Final

import asyncpg

SAMPLE_TABLES: Final = ("gpu_samples", "host_samples")
_LOCK_KEY: Final = 0x67707570  # "gpup"
_PART = re.compile(r"^(gpu_samples|host_samples)_p(\d{8})$")


def partition_name(table: str, day: date) -> str:
    if table not in SAMPLE_TABLES:
        raise ValueError(f"not a partitioned sample table: {table}")
    return f"{table}_p{day:%Y%m%d}"


def day_of(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def _bound(day: date) -> str:
    return f"{day.isoformat()} 00:00:00+00"


async def existing_days(conn: asyncpg.Connection) -> dict[str, set[date]]:
    """Days that have a partition, per sample table."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ANY($1::text[])",
        list(SAMPLE_TABLES),
    )
    out: dict[str, set[date]] = {t: set() for t in SAMPLE_TABLES}
    for r in rows:
        m = _PART.match(r["relname"])
        if m:
            out[m.group(1)].add(datetime.strptime(m.group(2), "%Y%m%d").replace(tzinfo=UTC).date())
    return out


async def ensure_partitions(conn: asyncpg.Connection, days: Iterable[date]) -> list[str]:
    """Create the partitions of ``days`` that are missing; return the names created."""
    wanted = sorted(set(days))
    if not wanted:
        return []
    created: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        have = await existing_days(conn)
        for table in SAMPLE_TABLES:
            for day in wanted:
                if day in have[table]:
                    continue
                name = partition_name(table, day)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table}"  # noqa: S608 (date-made name)
                    f" FOR VALUES FROM ('{_bound(day)}') TO ('{_bound(day + timedelta(days=1))}')"
                )
                created.append(name)
    return created


def days_ahead(today: date, ahead: int) -> list[date]:
    return [today + timedelta(days=i) for i in range(ahead + 1)]


async def drop_before(conn: asyncpg.Connection, cutoff: date) -> list[str]:
    """Drop every sample partition of a day before ``cutoff``; return the names dropped."""
    dropped: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        for table, days in (await existing_days(conn)).items():
            for day in sorted(days):
                if day < cutoff:
                    name = partition_name(table, day)
                    await conn.execute(f"DROP TABLE IF EXISTS {name}")
                    dropped.append(name)
    return dropped


async def apply_retention(
    conn: asyncpg.Connection, now: float, retention_days: int, rollup_retention_days: int
) -> list[str]:
    """Drop sample partitions older than ``retention_days`` full days; trim rollups and logs.

    The GPU facts of the dropped days go with them. Rollups, events and inventory reports are
    kept ``rollup_retention_days``; rejected frames ``retention_days``. Returns the partitions dropped.
    """
    cutoff = day_of(now) - timedelta(days=retention_days)
    dropped = await drop_before(conn, cutoff)
    await conn.execute("DELETE FROM gpu_facts WHERE day < $1", cutoff)  # facts of the dropped days
    long_cut = datetime.fromtimestamp(now, UTC) - timedelta(days=rollup_retention_days)
    short_cut = datetime.fromtimestamp(now, UTC) - timedelta(days=retention_days)
    await conn.execute("DELETE FROM gpu_rollup_1m WHERE minute < $1", long_cut)
    await conn.execute("DELETE FROM events WHERE ts < $1", long_cut)
    await conn.execute("DELETE FROM inventory_reports WHERE ts < $1", long_cut)
    await conn.execute("DELETE FROM rejected_frames WHERE received < $1", short_cut)
    await conn.execute("DELETE FROM gpu_rollup_pending WHERE minute < $1", short_cut)  # samples gone
    return dropped
