"""Versioned, idempotent schema migrations (``migrations/NNNN_name.sql``).

Each file is applied once, in order, in its own transaction, under an advisory lock so that
two collectors starting together do not race; ``schema_migrations`` records what ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

import asyncpg

_LOCK_KEY: Final = 0x67707577  # "gpuw": advisory lock held while migrating
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with this build, in version order."""
    found = []
    for entry in resources.files("collector.store").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    twice = [
        f"{m.version:04d}_{m.name}" for i, m in enumerate(found) if i and found[i - 1].version == m.version
    ]
    if twice:  # the second of a version would never be applied (schema_migrations has the first)
        raise RuntimeError(f"migrations share a version number with another: {', '.join(twice)}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; return the versions applied now (empty when up to date)."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for m in migrations():
            if m.version in done:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name
                )
            applied_now.append(m.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    version: int | None = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    return version or 0
