"""Connections to PostgreSQL: DSN, TLS options and the errors that mean "try again later".

A DSN may name several servers (``postgresql://u@pg-1:5432,pg-2:5432/gpuwarden?
target_session_attrs=read-write``): each new connection tries them in order and keeps the
first that accepts writes, so after a standby's promotion the next connection (the writer's
after a failed batch, the pool's after a broken one) finds the new primary. Until one accepts
writes, connecting fails with an error :func:`is_transient` calls transient, and the caller
retries with its backoff (``docs/operations.md``).
"""

from __future__ import annotations

import ssl
from typing import Any, Final

import asyncpg

from collector.config import PostgresSection
from shared.errors import ConfigError

# Errors after which the same work can succeed once the server is back: connection lost,
# server shutting down or starting, too many connections, no server of a multi-host DSN
# accepting writes yet (a standby being promoted: ``target_session_attrs=read-write``).
# Anything else is about the data.
TRANSIENT: Final[tuple[type[BaseException], ...]] = (
    OSError,
    asyncpg.TargetServerAttributeNotMatched,
    asyncpg.ReadOnlySQLTransactionError,  # a write reached a server in recovery (or demoted)
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
)


# Anything a PostgreSQL call can raise when the server is down or the call failed there: what a
# loop that tries again later catches (the one definition; ``is_transient`` decides retries).
ERRORS: Final[tuple[type[BaseException], ...]] = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the server or connection failed, not the data we sent."""
    if isinstance(exc, asyncpg.DataError | ValueError | TypeError):
        return False  # asyncpg's client-side DataError derives from InterfaceError
    if isinstance(exc, TRANSIENT):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in ("08", "40", "53", "57", "58")


def connect_kwargs(
    cfg: PostgresSection,
    dsn: str | None = None,
    *,
    statement_timeout: float | None = None,
    idle_in_transaction: float | None = None,
    application_name: str = "gpuwarden-collector",
) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect``/``create_pool`` from ``[postgres]``;
    ``statement_timeout`` (seconds) makes the server cancel any longer statement,
    ``idle_in_transaction`` (seconds) end the session of a transaction left open that long
    between statements (a process stopped inside it keeps its locks otherwise)."""
    settings = {"timezone": "UTC", "application_name": application_name}
    if statement_timeout is not None:
        settings["statement_timeout"] = str(max(1, round(statement_timeout * 1000)))  # milliseconds
    if idle_in_transaction is not None:
        settings["idle_in_transaction_session_timeout"] = str(max(1, round(idle_in_transaction * 1000)))
    kwargs: dict[str, Any] = {
        "dsn": dsn if dsn is not None else cfg.dsn.reveal(),
        "timeout": cfg.connect_timeout,
        "server_settings": settings,
    }
    ssl_arg = _ssl(cfg)
    if ssl_arg is not None:
        kwargs["ssl"] = ssl_arg
    return kwargs


def _ssl(cfg: PostgresSection) -> ssl.SSLContext | str | None:
    mode = cfg.sslmode
    if mode is None and cfg.sslrootcert is None and cfg.sslcert is None:
        return None  # whatever the DSN says (asyncpg reads sslmode= from it)
    if mode in ("disable", "allow", "prefer") and cfg.sslcert is None:
        return mode
    if mode is None and cfg.sslrootcert is not None:
        mode = "verify-full"  # a CA is configured: check the server's name too, not just its chain
    verify = mode in ("verify-ca", "verify-full")
    try:
        ctx = ssl.create_default_context(cafile=cfg.sslrootcert) if verify else _no_verify()
        if cfg.sslcert is not None:
            ctx.load_cert_chain(cfg.sslcert, cfg.sslkey)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("postgres.sslrootcert", f"cannot load TLS files: {e}") from e
    ctx.check_hostname = mode == "verify-full"
    return ctx


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def connect(cfg: PostgresSection, dsn: str | None = None) -> asyncpg.Connection:
    return await asyncpg.connect(**connect_kwargs(cfg, dsn))


async def create_pool(
    cfg: PostgresSection,
    dsn: str | None = None,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    statement_timeout: float | None = None,
    idle_in_transaction: float | None = None,
    application_name: str = "gpuwarden-collector",
) -> asyncpg.Pool:
    """A pool of ``[postgres] pool_min..pool_max`` connections (or ``min_size..max_size``)."""
    kwargs = connect_kwargs(
        cfg, dsn, statement_timeout=statement_timeout, idle_in_transaction=idle_in_transaction,
        application_name=application_name,
    )  # fmt: skip
    pool = await asyncpg.create_pool(
        **kwargs,
        min_size=cfg.pool_min if min_size is None else min_size,
        max_size=cfg.pool_max if max_size is None else max_size,
    )
    assert pool is not None
    return pool
