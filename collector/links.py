"""The collector's two connections as parts with a lifecycle: :class:`Postgres` (pool,
migrations, partitions, the fleet state rebuilt at start, periodic maintenance) and
:class:`Nats` (the client). Other parts are handed these objects and read ``pool`` / ``nc``
once started (``None`` before)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from collector.config import CollectorConfig, PostgresSection
from collector.state import FleetState, load_state
from collector.store import db, migrate, partitions
from shared.config import NatsConfig
from shared.errors import ServiceUnavailableError
from shared.natsconf import connect_options
from shared.ratelog import RateLimitedLog
from shared.redact import redact
from shared.tasks import cancel_all

log = logging.getLogger(__name__)
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*db.TRANSIENT, nats.errors.Error)
_nats_log = RateLimitedLog(log)


def nats_options(cfg: NatsConfig, name: str) -> dict[str, Any]:
    """``shared.natsconf.connect_options`` with the collector's rate-limited error callback."""
    return {**connect_options(cfg, name), "error_cb": _nats_error}


async def _nats_error(e: Exception) -> None:
    """One line per NATS client error, at most every 10 s (the default logs a traceback)."""
    _nats_log.warning("nats", "NATS: %s", redact(str(e)) or type(e).__name__)


class Postgres:
    """The service's pool. Start: connect (retrying briefly), migrate, create the partitions
    ahead, apply retention, rebuild ``state`` from the stored frames; then maintain the
    partitions every ``[postgres] maintenance_interval``. ``idle_in_transaction`` (seconds): the
    server ends a session whose transaction stays open that long between statements (a group
    member's: docs/operations.md, "Fencing")."""

    def __init__(
        self, cfg: PostgresSection, state: FleetState, idle_in_transaction: float | None = None
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.idle_in_transaction = idle_in_transaction
        self.pool: asyncpg.Pool | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.pool = pool = await _with_retry(
            lambda: db.create_pool(self.cfg, idle_in_transaction=self.idle_in_transaction), "PostgreSQL"
        )
        async with pool.acquire() as conn:
            applied = await migrate.migrate(conn)
            if applied:
                log.info("applied schema migrations %s", applied)
            await self._maintain(conn)
            self.state.replace(await load_state(conn, max_skew=self.state.max_skew))
        log.info("fleet state rebuilt: %d hosts", len(self.state))
        self._stop.clear()
        self._task = asyncio.create_task(self._maintenance_loop(), name="maintenance")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()

    async def _maintain(self, conn: asyncpg.Connection) -> None:
        pg = self.cfg
        now = time.time()
        created = await partitions.ensure_partitions(
            conn, partitions.days_ahead(partitions.day_of(now), pg.partitions_ahead)
        )
        dropped = await partitions.apply_retention(conn, now, pg.retention_days, pg.rollup_retention_days)
        if created or dropped:
            log.info("partitions created %s, dropped %s", created, dropped)

    async def _maintenance_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.maintenance_interval)
            if self._stop.is_set() or self.pool is None:
                return
            try:
                async with self.pool.acquire() as conn:
                    await self._maintain(conn)
            except db.ERRORS as e:
                log.warning("partition maintenance failed, will retry: %s", e)


class Nats:
    """The service's NATS client: connected at start (an unreachable server is a clear error
    within seconds, not the client's endless retries), drained at stop."""

    def __init__(self, config: CollectorConfig, role: str = "") -> None:
        self.cfg = config.nats
        self.name = f"gpuwarden-collector-{config.collector.partition}" + (f"-{role}" if role else "")
        self.nc: NatsClient | None = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def start(self) -> None:
        opts = nats_options(self.cfg, self.name)
        timeout = self.cfg.connect_timeout * 2 + 1
        self.nc = await _with_retry(lambda: asyncio.wait_for(nats.connect(**opts), timeout), "NATS")

    async def stop(self) -> None:
        nc = self.nc
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await nc.drain()


async def _with_retry(connect: Callable[[], Awaitable[Any]], what: str, within: float = 15.0) -> Any:
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(lambda e: db.is_transient(e) or isinstance(e, nats.errors.Error)),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            stop=stop_after_delay(within),
            reraise=True,
        ):
            with attempt:
                return await connect()
    except _CONNECT_ERRORS as e:
        raise ServiceUnavailableError(f"cannot reach {what}: {redact(str(e)) or type(e).__name__}") from e
    raise AssertionError("unreachable")
