"""The collector process: one service object with ``startup / run / shutdown``.

Startup: PostgreSQL pool, migrations, partitions ahead, retention, fleet state rebuilt from
PostgreSQL, NATS connection, stream and durable consumer, first load of the expected
inventory. Run: the ingest loop plus periodic maintenance and inventory refresh. Shutdown
(SIGTERM/SIGINT set a flag): stop fetching, finish the batch in hand (written, acked), cancel
the periodic tasks, drain NATS, close PostgreSQL.

Hook points for the health/alert engine and the API (added by their own modules):
``hooks`` are awaited with every committed batch of new frames, after ``state`` has them;
``startup_hooks`` / ``shutdown_hooks`` are awaited with the service once it is started / as it
stops (e.g. to start and stop the HTTP server on ``config.collector.listen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from collector.alerting import Alerting
from collector.config import CollectorConfig
from collector.health import health_config_from
from collector.ingest import Hook, Ingest
from collector.inventory import ExpectedInventory, InventoryDiff
from collector.state import FleetState, load_state
from collector.store import db, migrate, partitions
from collector.store.writer import Writer
from shared.config import NatsConfig
from shared.errors import ServiceUnavailableError
from shared.frames import Frame
from shared.natsconf import connect_options
from shared.redact import redact
from shared.tasks import cancel_all, stop_on_signals

log = logging.getLogger(__name__)
ServiceHook = Callable[["CollectorService"], Awaitable[None]]
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*db.TRANSIENT, nats.errors.Error)


def nats_options(cfg: NatsConfig, name: str) -> dict[str, Any]:
    """``shared.natsconf.connect_options`` with the collector's rate-limited error callback."""
    return {**connect_options(cfg, name), "error_cb": _nats_error}


_last_nats_error = [0.0]


async def _nats_error(e: Exception) -> None:
    """One line per NATS client error, at most every 10 s (the default logs a traceback)."""
    now = time.monotonic()
    if now - _last_nats_error[0] >= 10.0:
        _last_nats_error[0] = now
        log.warning("NATS: %s", redact(str(e)) or type(e).__name__)


class CollectorService:
    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.max_skew = health_config_from(config.raw).health.max_clock_skew
        self.state = FleetState(self.max_skew)
        self.writer = Writer(config.postgres, max_skew=self.max_skew)
        self.ingest = Ingest(config, self.writer, hooks=[self._apply_state])
        self.hooks: list[Hook] = self.ingest.hooks  # after the state hook
        self.startup_hooks: list[ServiceHook] = []
        self.shutdown_hooks: list[ServiceHook] = []
        self.expected = ExpectedInventory(
            config.inventory.source, config.inventory.refresh, config.inventory.timeout
        )
        self.pool: asyncpg.Pool | None = None
        self.nc: NatsClient | None = None
        self.should_exit = asyncio.Event()
        self.started = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.alerting = Alerting(self)  # health and alerts: registers its hooks (docs/alerts.md)

    async def _apply_state(self, frames: Sequence[Frame]) -> None:
        self.state.apply(frames)

    def inventory_diff(self) -> InventoryDiff:
        """Hosts expected but silent, and hosts short of GPUs, against the current state."""
        return self.expected.diff(self.state.hosts)

    def ready(self) -> bool:
        """Started, connected to NATS, and the last PostgreSQL write did not fail (``/readyz``)."""
        return (
            self.started.is_set()
            and self.nc is not None
            and self.nc.is_connected
            and self.pool is not None
            and self.ingest.stats.db_up
        )

    def request_stop(self) -> None:
        self.should_exit.set()
        self.ingest.stop()

    async def startup(self) -> None:
        cfg = self.config
        self.pool = await _with_retry(lambda: db.create_pool(cfg.postgres), "PostgreSQL")
        async with self.pool.acquire() as conn:
            applied = await migrate.migrate(conn)
            if applied:
                log.info("applied schema migrations %s", applied)
            await self._maintain(conn)
            self.state = await load_state(conn, max_skew=self.max_skew)
        log.info("fleet state rebuilt: %d hosts", len(self.state))
        opts = nats_options(cfg.nats, f"gpuwarden-collector-{cfg.collector.partition}")
        # the client retries an unreachable server forever; at start that is a clear error instead
        self.nc = await _with_retry(
            lambda: asyncio.wait_for(nats.connect(**opts), cfg.nats.connect_timeout * 2 + 1), "NATS"
        )
        await self.ingest.setup(self.nc)
        await self.expected.reload()
        self._tasks = [
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
            asyncio.create_task(self.expected.run(self.should_exit), name="inventory"),
        ]
        for hook in self.startup_hooks:
            await hook(self)
        self.started.set()
        log.info("collector partition %d/%d consuming", cfg.collector.partition, cfg.collector.partitions)

    async def run(self) -> None:
        await self.ingest.run()

    async def shutdown(self) -> None:
        self.request_stop()
        for hook in self.shutdown_hooks:
            try:
                await hook(self)
            except (OSError, RuntimeError) as e:
                log.warning("shutdown hook failed: %s", e)
        await cancel_all(self._tasks)
        self._tasks = []
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await self.nc.drain()
        await self.writer.close()
        if self.pool is not None:
            await self.pool.close()

    async def serve(self) -> None:
        """Start, consume until SIGTERM/SIGINT (or :meth:`request_stop`), stop cleanly."""
        with stop_on_signals(self.request_stop):
            try:
                await self.startup()
                await self.run()
            finally:
                await self.shutdown()

    async def _maintain(self, conn: asyncpg.Connection) -> None:
        pg = self.config.postgres
        now = time.time()
        created = await partitions.ensure_partitions(
            conn, partitions.days_ahead(partitions.day_of(now), pg.partitions_ahead)
        )
        dropped = await partitions.apply_retention(conn, now, pg.retention_days, pg.rollup_retention_days)
        if created or dropped:
            log.info("partitions created %s, dropped %s", created, dropped)

    async def _maintenance_loop(self) -> None:
        interval = self.config.postgres.maintenance_interval
        while not self.should_exit.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.should_exit.wait(), interval)
            if self.should_exit.is_set() or self.pool is None:
                return
            try:
                async with self.pool.acquire() as conn:
                    await self._maintain(conn)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                log.warning("partition maintenance failed, will retry: %s", e)


def tune_gc() -> None:
    """Collect cyclic garbage less often: ingest allocates many short-lived tuples and frames,
    which the default thresholds (700 allocations) scan over and over; measured 10-15% more
    throughput. Called by ``gpuwarden collector run`` (a process-wide setting)."""
    gc.freeze()  # what startup built lives as long as the process
    gc.set_threshold(100_000, 50, 100)


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
