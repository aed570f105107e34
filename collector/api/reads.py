"""The API's own PostgreSQL pool, so that no request can delay alerting (docs/api.md).

Alert persistence, the outbox and ingest use the service's pool (``[postgres] pool_max``);
API reads use this one: at most ``[api] db_pool_max`` connections, each of whose statements
the server cancels after ``[api] statement_timeout``. Heavy queries (``/history``) are
admitted ``[api] max_heavy_queries`` at a time, fewer than the pool's connections so a light
read (``/readyz``) always finds one; one more is refused at once with 503 and ``Retry-After``
instead of queueing behind the others.

The pool is opened on first use (a collector whose API is never asked for history holds no
extra connection) and closed with the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Final

import asyncpg
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collector.api.errors import ApiError
from collector.config import CollectorConfig, PostgresSection
from collector.store import db

log = logging.getLogger(__name__)
RETRY_AFTER: Final = "2"  # seconds


class ReadPool:
    """The API's read pool and its heavy-query gate."""

    def __init__(
        self,
        config: CollectorConfig,
        *,
        postgres: PostgresSection | None = None,
        max_size: int | None = None,
        statement_timeout: float | None = None,
        max_heavy: int | None = None,
    ) -> None:
        """``[api]`` and ``[postgres]`` of ``config``, or what the keywords say."""
        api = config.api
        self.postgres = config.postgres if postgres is None else postgres
        self.max_size = api.db_pool_max if max_size is None else max_size
        self.statement_timeout = api.statement_timeout if statement_timeout is None else statement_timeout
        self.max_heavy = api.max_heavy_queries if max_heavy is None else max_heavy
        self.heavy_running = 0
        self.refused = 0  # heavy queries refused because max_heavy were running
        self.timeouts = 0  # statements cancelled by the statement timeout
        self.pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        """The pool, opened on first use; 503 while PostgreSQL cannot be reached."""
        if self.pool is not None:
            return self.pool
        async with self._opening:
            if self.pool is None:
                try:
                    self.pool = await db.create_pool(
                        self.postgres,
                        min_size=0,
                        max_size=self.max_size,
                        statement_timeout=self.statement_timeout,
                        application_name="gpuwarden-api",
                    )
                except db.ERRORS as e:
                    log.warning("API read pool: cannot connect to PostgreSQL: %s", type(e).__name__)
                    raise unavailable("PostgreSQL is not reachable") from None
            return self.pool

    @contextlib.asynccontextmanager
    async def heavy(self) -> AsyncIterator[asyncpg.Pool]:
        """Admit one heavy query, or refuse it at once (503, ``Retry-After``)."""
        if self.heavy_running >= self.max_heavy:
            self.refused += 1
            raise ApiError(
                503,
                "busy",
                f"{self.heavy_running} history queries are running (at most [api] max_heavy_queries ="
                f" {self.max_heavy}); retry later",
                None,
                {"Retry-After": RETRY_AFTER},
            )
        self.heavy_running += 1
        try:
            yield await self.get()
        finally:
            self.heavy_running -= 1

    def query_error(self, e: BaseException) -> ApiError:
        """The reply to a failed read: 503, the statement timeout named, no server text."""
        if isinstance(e, asyncpg.QueryCanceledError):
            self.timeouts += 1
            return unavailable(
                f"the query ran longer than [api] statement_timeout ({self.statement_timeout:g} s);"
                " ask for a shorter range or a larger step"
            )
        return unavailable(f"PostgreSQL: {type(e).__name__}")

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), 5.0)
        except (OSError, asyncpg.InterfaceError, TimeoutError):
            pool.terminate()  # a statement still running: the server cancels it with the connection


def unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message, None, {"Retry-After": RETRY_AFTER})


READS: Final = web.AppKey("read_pool", ReadPool)


class ReadPoolCollector(Collector):
    """``/metrics`` families of the API's reads: heavy queries running and refused, timeouts."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        r = self.app[READS]
        yield GaugeMetricFamily(
            "gpuwarden_api_history_running", "History queries running.", value=float(r.heavy_running)
        )
        yield CounterMetricFamily(
            "gpuwarden_api_history_refused",
            "History queries refused (503) because [api] max_heavy_queries were running.",
            value=float(r.refused),
        )
        yield CounterMetricFamily(
            "gpuwarden_api_statement_timeouts",
            "API queries cancelled by [api] statement_timeout.",
            value=float(r.timeouts),
        )


async def lifetime(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: close the read pool with the application."""
    yield
    await app[READS].close()
