"""A fresh PostgreSQL database per test or module; one value read on a connection of its own."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg

from gpuwarden.servers import PostgresServer


@contextlib.contextmanager
def fresh_database(pg_server: PostgresServer) -> Iterator[str]:
    """The DSN of a new, empty database on ``pg_server``, dropped on leaving."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    psql = str(pg_server.bindir / "psql") if (pg_server.bindir / "psql").exists() else "psql"
    subprocess.run([psql, pg_server.dsn(), "-qc", f'CREATE DATABASE "{name}"'], check=True)
    yield pg_server.dsn(name)
    subprocess.run(
        [psql, pg_server.dsn(), "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'], check=False
    )


async def fetchval(dsn: str, query: str, *args: object) -> Any:
    """The first value of ``query`` on a connection opened for it and closed after."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()
