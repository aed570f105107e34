"""The collector process: the parts :func:`collector.wiring.build` makes, started and stopped.

:class:`CollectorService` owns the lifecycle only. Startup: each part of
``Parts.lifecycle`` is started in order (PostgreSQL and the fleet state rebuilt from it,
NATS, the ingest's stream and consumer, the expected inventory, the engine runner, the fast
event path, remediation, the HTTP API); when one fails to start, :meth:`shutdown` stops it
and those started before it. Run: the ingest loop. Shutdown (SIGTERM/SIGINT, or :meth:`request_stop`): stop
fetching, finish the batch in hand (written, acked), then stop the parts in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import asyncpg

from collector.config import CollectorConfig
from collector.wiring import Part, Parts, build  # noqa: TID251 (the service runs the wiring)
from shared.tasks import stop_on_signals

log = logging.getLogger(__name__)


class CollectorService:
    """``startup / run / shutdown`` (or :meth:`serve`) of a collector's parts. ``state``,
    ``ingest``, ``alerting``, ``expected``, ``api`` and ``pool`` are the parts callers (the CLI,
    tests) read most; every part is in ``parts``."""

    def __init__(self, config: CollectorConfig, *, api: bool = False) -> None:
        self.config = config
        self.parts: Parts = build(config, api=api)
        self.state = self.parts.state
        self.ingest = self.parts.ingest
        self.alerting = self.parts.alerting
        self.api = self.parts.api
        self.expected = self.parts.expected
        self.should_exit = asyncio.Event()
        self.started = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()

    @property
    def pool(self) -> asyncpg.Pool | None:
        """The service's PostgreSQL pool (``None`` until started)."""
        return self.parts.postgres.pool

    def ready(self) -> bool:
        """Started, connected to NATS, and the last PostgreSQL write did not fail (``/readyz``)."""
        p = self.parts
        return (
            self.started.is_set()
            and p.nats.connected
            and p.postgres.pool is not None
            and self.ingest.stats.db_up
        )

    def request_stop(self) -> None:
        self.should_exit.set()
        self.ingest.stop()

    async def startup(self) -> None:
        for part in self.parts.lifecycle:
            self._stack.push_async_callback(_stop, part)  # a part that fails to start cleans up too
            await part.start()
        self.started.set()
        c = self.config.collector
        log.info("collector partition %d/%d consuming", c.partition, c.partitions)

    async def run(self) -> None:
        await self.ingest.run()

    async def shutdown(self) -> None:
        self.request_stop()
        self.started.clear()
        await self._stack.aclose()

    async def serve(self) -> None:
        """Start, consume until SIGTERM/SIGINT (or :meth:`request_stop`), stop cleanly."""
        with stop_on_signals(self.request_stop):
            try:
                await self.startup()
                await self.run()
            finally:
                await self.shutdown()


async def _stop(part: Part) -> None:
    try:
        await part.stop()
    except (OSError, RuntimeError) as e:
        log.warning("%s did not stop cleanly: %s", type(part).__name__, e)


def tune_gc() -> None:
    """Collect cyclic garbage less often: ingest allocates many short-lived tuples and frames,
    which the default thresholds (700 allocations) scan over and over; measured 10-15% more
    throughput. Called by ``gpuwarden collector run`` (a process-wide setting)."""
    gc.freeze()  # what startup built lives as long as the process
    gc.set_threshold(100_000, 50, 100)
