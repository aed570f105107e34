"""A fresh PostgreSQL database per test or module."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator

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
