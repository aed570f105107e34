"""The agent service: ``startup / run / shutdown`` (one object per process).

``startup`` opens the sources and the NATS connection and publishes the inventory; ``run``
samples on a drift-free schedule until :meth:`AgentService.stop` (SIGTERM/SIGINT) is called,
finishing the tick in progress; ``shutdown`` stops the event threads, flushes the buffer
(bounded) and drains NATS.

Blocking calls (GPU backend, psutil) run in worker threads via :func:`asyncio.to_thread`.
Events come from two threads (the backend's event set and the kernel log), are handed to the
loop with ``call_soon_threadsafe``, deduplicated and counted by :class:`EventTracker`, and
published at once, ahead of queued samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import nats.errors
import psutil
from nats.aio.msg import Msg

from agent.events import EventTracker
from agent.gpu.auto import make_sources
from agent.gpu.base import GpuBackend, GpuEvent, Inventory
from agent.kmsg import KmsgReader
from agent.network import nats_rtt_result, run_checks
from agent.node import NodeSource
from agent.publisher import Publisher
from agent.sampler import Deadlines, InventorySchedule, Sequencer, build_event, build_inventory, build_sample
from agent.sdnotify import SdNotifier
from agent.system import SystemSource, agent_version
from shared.config import AgentConfig
from shared.errors import GpuwardenError, NvmlUnavailableError
from shared.frames import (
    AgentStats,
    CheckResult,
    HostFacts,
    InventoryFrame,
    PublishOutage,
    SampleFrame,
    encode,
)
from shared.subjects import inbox_prefix, poll_subject
from shared.tasks import cancel_all, stop_on_signals

log = logging.getLogger(__name__)

EVENT_WAIT_S = 0.5  # how long an event thread blocks before checking for shutdown
# XIDs whose kernel-log line carries details the collector decodes (XID 74: the NVLink and its
# registers). NVML's copy of one has no details; while the kernel log is read it waits this
# long, so that the log's copy, if it comes, is the one published (the other is its duplicate).
DETAIL_XIDS = frozenset({74})
XID_DETAIL_WAIT_S = 0.3


def _wants_detail(e: GpuEvent) -> bool:
    return e.source == "nvml" and e.type == "xid" and e.xid in DETAIL_XIDS


FLUSH_ON_EXIT_S = 5.0
NVML_RETRY_FIRST_S = 5.0  # NVML cannot initialise: first retry after this, then doubling ...
NVML_RETRY_MAX_S = 300.0  # ... up to this


class AgentService:
    """One agent: samples, events, inventory and poll replies for one host."""

    def __init__(
        self,
        config: AgentConfig,
        backend: GpuBackend | None = None,
        system: SystemSource | None = None,
        *,
        notifier: SdNotifier | None = None,
    ) -> None:
        self.config = config
        a = config.agent
        self.interval = a.interval
        if backend is None or system is None:
            b, s = make_sources(config)
            backend, system = backend or b, system or s
        self.backend = backend
        self.system = system
        self.seqr = Sequencer(host=a.host, provider=a.provider)
        self.publisher = Publisher(
            config.nats, name=f"gpuwarden-agent {a.host}", inbox_prefix=inbox_prefix(a.host)
        )
        self.tracker = EventTracker()
        self.notifier = notifier or SdNotifier()
        self.kmsg: KmsgReader | None = None
        self.fatal: GpuwardenError | None = None
        self.ticks = 0
        self.events_published = 0
        self._stop = asyncio.Event()
        self._threads_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: tuple[CheckResult, ...] = ()
        self._checks_task: asyncio.Task[None] | None = None
        self._nats_measured = False  # a NATS round trip has succeeded once in this run
        self._inventory: Inventory | None = None
        self._host_facts: HostFacts | None = None
        self._proc = psutil.Process()
        self._version = agent_version() or "0+unknown"
        self._t0 = time.monotonic()
        self._outages_told = 0  # publisher outage reports already attached to a sample
        self._last_tick_s = 0.0
        self._read_lock = asyncio.Lock()
        self._inventory_sent = False
        self.inventory_schedule = InventorySchedule()  # on change (static GPU facts too), and every 5 min
        self.nvml_error: str | None = None  # NVML cannot initialise: the agent runs without GPUs
        self.nvml_retries = 0
        self.nvml_retry = (NVML_RETRY_FIRST_S, NVML_RETRY_MAX_S)  # first and longest retry delay
        self._nvml_delay = NVML_RETRY_FIRST_S
        self._nvml_retry_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the service to stop after the tick in progress (signal-handler safe on the loop)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def startup(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._nvml_delay = self.nvml_retry[0]
        self._t0 = time.monotonic()  # uptime; a simulated backend's fault times count from its open
        opened = await self._open_backend()
        self.system.open()
        inv, self._host_facts = await asyncio.to_thread(self._read_inventory)
        self._inventory = inv
        self.tracker.set_inventory(inv.gpus)
        await self.publisher.start(wait=False)
        self._tasks.append(asyncio.create_task(self._watch_publisher(), name="agent-publisher-watch"))
        if self.config.agent.poll:
            self._tasks.append(asyncio.create_task(self._serve_polls(), name="agent-poll"))
        if not self.host_down():
            # with the GPUs' static facts (thresholds, limits), read from one sample
            gpus = await asyncio.to_thread(self.backend.sample) if self.nvml_error is None else []
            self._publish_inventory(self.inventory_schedule.due(inv, gpus, force=True) or inv)
        if opened:
            self._start_thread("agent-gpu-events", self.backend.wait_events, loop)
        if self.config.agent.kmsg and self.backend.kernel_log:
            self.kmsg = KmsgReader(self.config.agent.kmsg_path)
            self.kmsg.open()
            if self.kmsg.enabled:
                self._start_thread("agent-kmsg", self.kmsg.wait_events, loop)
                node = getattr(self.system, "node", None)
                if isinstance(node, NodeSource):
                    node.kmsg_counts = self.kmsg.counts  # kernel-log classes go in the samples
        wd = self.notifier.watchdog_s
        if wd is not None and self.interval > wd / 2:
            log.warning(
                "interval %gs is more than half the systemd watchdog (%gs): raise WatchdogSec",
                self.interval,
                wd,
            )
        why = f" (NVML cannot initialise: {self.nvml_error})" if self.nvml_error else ""
        self.notifier.ready(f"publishing {len(inv.gpus)} GPUs every {self.interval:g}s{why}")
        log.info(
            "agent %s (%s) started: %d %s GPUs, interval %gs, boot id %s%s",
            self.seqr.host,
            self.seqr.provider,
            len(inv.gpus),
            self.backend.name,
            self.interval,
            self.seqr.boot_id,
            why,
        )

    async def _open_backend(self) -> bool:
        """Open the GPU backend; when NVML cannot initialise, note why and when to retry.

        A broken driver is not a dead host: the agent keeps publishing host telemetry and an
        inventory without GPUs that carries the NVML error, and retries with doubling delays
        (``nvml_retry``: first, longest).
        """
        try:
            await asyncio.to_thread(self.backend.open)
        except NvmlUnavailableError as e:
            first = self.nvml_error is None
            self.nvml_error = e.detail
            delay = self._nvml_delay
            self._nvml_retry_at = time.monotonic() + delay
            self._nvml_delay = min(delay * 2.0, self.nvml_retry[1])
            log.log(
                logging.ERROR if first else logging.WARNING,
                "%s; running without GPUs, retrying NVML in %.0fs",
                e,
                delay,
            )
            return False
        if self.nvml_error is not None:
            log.warning("NVML initialised after %d retries; was: %s", self.nvml_retries, self.nvml_error)
        self.nvml_error = None
        self._nvml_delay = self.nvml_retry[0]
        return True

    async def _retry_nvml(self) -> None:
        """Retry NVML when due; on success start its event thread (the next read sends the
        new inventory)."""
        if self.nvml_error is None or time.monotonic() < self._nvml_retry_at:
            return
        self.nvml_retries += 1
        async with self._read_lock:
            opened = await self._open_backend()
        if opened and self._loop is not None and not self._threads_stop.is_set():
            self._start_thread("agent-gpu-events", self.backend.wait_events, self._loop)

    async def run(self) -> None:
        deadlines = Deadlines(self.interval)
        while not self._stop.is_set():
            if await deadlines.wait(self._stop):
                break
            try:
                await self.tick()
            except GpuwardenError as e:  # one bad reading must not stop the agent; systemd sees no watchdog
                log.error("tick failed: %s", e)
            deadlines.advance()
        if deadlines.missed:
            log.info("%d ticks skipped because a tick overran the interval", deadlines.missed)

    async def shutdown(self) -> None:
        self.notifier.stopping()
        self._threads_stop.set()
        with contextlib.suppress(GpuwardenError):
            self.backend.close()
        if self.kmsg is not None:
            self.kmsg.close()
        for th in self._threads:
            await asyncio.to_thread(th.join, EVENT_WAIT_S * 4)
        await cancel_all([*self._tasks, *([self._checks_task] if self._checks_task else [])])
        await self.publisher.close(flush_timeout=FLUSH_ON_EXIT_S)
        self.notifier.close()
        s = self.publisher.stats
        log.info(
            "agent stopped: %d frames published, %d dropped, %d left unsent",
            s.published,
            s.dropped,
            self.publisher.buffered,
        )

    async def serve(self, *, signals: bool = True) -> None:
        """startup, run until SIGTERM/SIGINT (or :meth:`stop`), shutdown; re-raise a fatal error."""
        with stop_on_signals(self.stop, signals):
            try:
                await self.startup()
                await self.run()
            finally:
                await self.shutdown()
        if self.fatal is not None:
            raise self.fatal

    # ------------------------------------------------------------------ ticks

    def host_down(self) -> bool:
        """The backend says the host is down (a simulated fault): publish nothing."""
        return self.backend.host_down()

    async def tick(self) -> SampleFrame | None:
        """One sampling tick: publish the inventory if it changed, then a sample."""
        started = time.perf_counter()
        if self._checks_task is None or self._checks_task.done():
            self._checks_task = asyncio.create_task(self._refresh_checks(), name="agent-checks")
        await self._retry_nvml()
        frame = await self.fresh_sample()
        if frame is not None:
            self.ticks += 1
            self.notifier.watchdog()
        self._last_tick_s = time.perf_counter() - started
        return frame

    async def fresh_sample(self) -> SampleFrame | None:
        """Read everything now, publish the sample (and the inventory when it changed)."""
        async with self._read_lock:  # a poll and a tick must not read the sources at once
            gpus, system, inv = await asyncio.to_thread(self._read)
        if self.host_down():
            return None
        changed = inv != self._inventory or not self._inventory_sent
        full = self.inventory_schedule.due(inv, gpus, force=changed)
        if changed:
            self._inventory = inv
            self.tracker.set_inventory(inv.gpus)
        if full is not None:
            self._publish_inventory(full)
        frame = build_sample(
            self.seqr,
            interval_s=self.interval,
            gpus=gpus,
            system=system,
            checks=self._checks,
            agent=self.stats(),
            outage=self._outage(),
        )
        self.publisher.publish(self.seqr.subjects[0], encode(frame, static=False))  # static: in the inventory
        return frame

    def _outage(self) -> PublishOutage | None:
        """The publisher's newest outage report, once (on the first sample after it)."""
        p = self.publisher
        if p.outages == self._outages_told:
            return None
        self._outages_told = p.outages
        return p.last_outage

    def _read(self) -> tuple[Any, Any, Inventory]:
        if self.nvml_error is not None:
            return [], self.system.sample(), self._no_gpus(self.nvml_error)
        return self.backend.sample(), self.system.sample(), self.backend.inventory()

    def _read_inventory(self) -> tuple[Inventory, HostFacts]:
        if self.nvml_error is not None:
            return self._no_gpus(self.nvml_error), self.system.host_facts()
        return self.backend.inventory(), self.system.host_facts()

    def _no_gpus(self, error: str) -> Inventory:
        return Inventory(self.backend.name, None, None, None, (), nvml_error=error)

    def _publish_inventory(self, inv: Inventory) -> InventoryFrame:
        self._inventory_sent = True
        frame = build_inventory(self.seqr, inv, self._host_facts)
        self.publisher.publish(self.seqr.subjects[2], encode(frame))
        return frame

    def stats(self) -> AgentStats:
        cpu = self._proc.cpu_times()
        s = self.publisher.stats
        return AgentStats(
            version=self._version,
            backend=self.backend.name,
            uptime_s=max(0.0, time.monotonic() - self._t0),
            cpu_s=cpu.user + cpu.system,
            rss_bytes=self._proc.memory_info().rss,
            tick_s=self._last_tick_s,
            buffered_frames=self.publisher.buffered,
            dropped_frames=s.dropped,
            published_frames=s.published,
            publish_errors=s.publish_errors + s.permission_errors,
            nvml_errors=int(getattr(self.backend, "nvml_errors", 0)),
        )

    async def _refresh_checks(self) -> None:
        net = self.config.network
        limit = min(net.timeout, max(0.1, self.interval * 0.8))
        results: list[CheckResult] = []
        if net.targets:
            results.extend(await run_checks(net.targets, limit))
        if net.nats_rtt and (self._nats_measured or self.publisher.connected):
            # Unmeasured is not failed: until one round trip has succeeded (the connection
            # is still being made at start) the check is left out of the frames.
            try:
                results.append(nats_rtt_result(await self.publisher.rtt(limit)))
                self._nats_measured = True
            except (nats.errors.Error, TimeoutError, OSError) as e:
                if self._nats_measured:
                    results.append(nats_rtt_result(None, str(e) or type(e).__name__))
        self._checks = tuple(results)

    # ------------------------------------------------------------------ events

    def _start_thread(
        self, name: str, wait: Callable[[float], list[GpuEvent]], loop: asyncio.AbstractEventLoop
    ) -> None:
        th = threading.Thread(target=self._event_loop, args=(wait, loop), name=name, daemon=True)
        th.start()
        self._threads.append(th)

    def _event_loop(self, wait: Callable[[float], list[GpuEvent]], loop: asyncio.AbstractEventLoop) -> None:
        while not self._threads_stop.is_set():
            events = wait(EVENT_WAIT_S)
            kmsg = self.kmsg
            if events and kmsg is not None and kmsg.enabled:
                held = [e for e in events if _wants_detail(e)]
                if held:
                    now = [e for e in events if not _wants_detail(e)]
                    if now and not self._post(loop, now):
                        return
                    self._threads_stop.wait(XID_DETAIL_WAIT_S)
                    events = held
            if events and not self._threads_stop.is_set() and not self._post(loop, events):
                return

    def _post(self, loop: asyncio.AbstractEventLoop, events: list[GpuEvent]) -> bool:
        """Hand ``events`` to :meth:`on_events` on the loop; ``False`` when the loop has closed."""
        try:
            loop.call_soon_threadsafe(self.on_events, events)
        except RuntimeError:  # the loop closed under us: we are shutting down
            return False
        return True

    def on_events(self, events: list[GpuEvent]) -> None:
        """Deduplicate, count and publish events at once (on the loop)."""
        now = time.monotonic()
        down = self.host_down()
        for ev in events:
            accepted = self.tracker.accept(ev, now)
            if accepted is None or down:
                continue
            resolved, count = accepted
            frame = build_event(self.seqr, resolved, count)
            self.publisher.publish(self.seqr.subjects[1], encode(frame), urgent=True)
            self.events_published += 1
            log.info(
                "event %s gpu=%s xid=%s count=%d", resolved.type, resolved.gpu_index, resolved.xid, count
            )

    # ------------------------------------------------------------------ NATS side tasks

    async def _watch_publisher(self) -> None:
        await self.publisher.failed_event.wait()
        if isinstance(self.publisher.failed, GpuwardenError):
            self.fatal = self.publisher.failed
        self.stop()

    async def _serve_polls(self) -> None:
        await self.publisher.wait_connected()
        await self.publisher.nc.subscribe(poll_subject(self.seqr.host), cb=self._on_poll)

    async def _on_poll(self, msg: Msg) -> None:
        if not msg.reply or self._stop.is_set():
            return
        frame = await self.fresh_sample()
        if frame is not None:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(encode(frame))
