"""``gpuwarden fleet``: many simulated agents in one process over one NATS connection.

Each host has its own :class:`SimulatedBackend`, :class:`SimulatedSystem` and
:class:`Sequencer` (own boot id and sequence), exactly as a real agent would. Ticks are
spread evenly over the interval (host ``i`` of ``n`` ticks at ``i * interval / n`` into each
period); a tick that falls more than one interval behind is skipped and counted. Events of
hosts with faults are polled every ``event_poll_s`` (10 ms: a real agent waits on NVML
events and wakes within milliseconds) and published at once; a ``host_down`` fault silences
its host. Frames are queued on one :class:`Publisher` whose ``workers``
senders keep many acks in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.events import EventTracker
from agent.faults import FaultSchedule
from agent.gpu.base import Inventory
from agent.gpu.simulated import SimulatedBackend
from agent.publisher import Publisher
from agent.sampler import InventorySchedule, Sequencer, build_event, build_inventory, build_sample
from agent.system import SimulatedSystem
from shared.config import NatsConfig
from shared.errors import NvmlUnavailableError
from shared.frames import GpuSample, encode
from shared.tasks import stop_on_signals

log = logging.getLogger(__name__)


def host_name(i: int) -> str:
    return f"host-{i:04d}"


def provider_name(j: int) -> str:
    return f"provider-{j}"


@dataclass(slots=True)
class SimHost:
    seqr: Sequencer
    backend: SimulatedBackend
    system: SimulatedSystem
    faults: FaultSchedule
    tracker: EventTracker | None = None
    inventory_sent: bool = False
    inventory: InventorySchedule = field(default_factory=InventorySchedule)  # on change, every 5 min
    nvml_error: str | None = None  # an nvml_init_fail fault: NVML could not initialise, no GPUs
    outages_told: int = 0  # publisher outage reports already attached to a sample of this host


@dataclass(slots=True)
class FleetStats:
    samples: int = 0
    events: int = 0
    inventories: int = 0
    skipped_ticks: int = 0
    silent_ticks: int = 0  # ticks of hosts that were down
    started: float = field(default_factory=time.monotonic)
    cpu_started: float = field(default_factory=time.process_time)
    run_s: float = 0.0  # time spent ticking (without start-up and the final flush)


class Fleet:
    """``hosts`` simulated hosts of ``gpus`` GPUs each, spread over ``providers`` providers."""

    def __init__(
        self,
        nats: NatsConfig,
        *,
        hosts: int,
        gpus: int,
        providers: int = 1,
        interval: float = 5.0,
        faults: Sequence[str] = (),
        seed: int = 0,
        workers: int = 256,
        event_poll_s: float = 0.01,
    ) -> None:
        if hosts < 1 or providers < 1 or interval <= 0:
            raise ValueError("hosts and providers must be positive, interval > 0")
        schedule = FaultSchedule.parse(list(faults))  # FaultSpecError before anything starts
        self.interval = interval
        self.event_poll_s = event_poll_s
        self.stats = FleetStats()
        self.clock_started = 0.0  # set by start()
        self.publisher = Publisher(nats, name=f"gpuwarden-fleet {hosts}x{gpus}", workers=workers)
        self.hosts: list[SimHost] = []
        for i in range(hosts):
            name = host_name(i)
            mine = schedule.for_host(name)
            self.hosts.append(
                SimHost(
                    seqr=Sequencer(host=name, provider=provider_name(i % providers)),
                    backend=SimulatedBackend(gpus, host=name, seed=seed + i, faults=mine),
                    system=SimulatedSystem(host=name, seed=seed + i, faults=mine),
                    faults=mine,
                    tracker=EventTracker() if mine else None,
                )
            )
        self.faulty = [h for h in self.hosts if h.faults]
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        await self.publisher.start(wait=True)
        # Unix time just before the first host's fault clock starts (each host's faults count
        # from its own open, a little later on a busy machine): a test's scenario clock
        self.clock_started = time.time()
        for h in self.hosts:
            self.open_backend(h)
            h.system.open()
            if not self.down(h):  # with the GPUs' static facts, read from one sample (as the agent)
                self.send_inventory(h, h.backend.sample() if h.nvml_error is None else [])
        self.stats.started = time.monotonic()
        self.stats.cpu_started = time.process_time()

    def down(self, h: SimHost) -> bool:
        return h.backend.host_down()

    def open_backend(self, h: SimHost) -> bool:
        """Open a host's GPUs as its agent would; an ``nvml_init_fail`` fault leaves the host
        running without GPUs, its inventory carrying the error, until a later try succeeds."""
        try:
            h.backend.open()
        except NvmlUnavailableError as e:
            h.nvml_error = e.detail
            return False
        h.nvml_error = None
        if h.tracker is not None:
            h.tracker.set_inventory(h.backend.inventory().gpus)
        return True

    def send_inventory(self, h: SimHost, gpus: Sequence[GpuSample] = ()) -> None:
        inv = (
            h.backend.inventory()
            if h.nvml_error is None
            else Inventory(h.backend.name, None, None, None, (), nvml_error=h.nvml_error)
        )
        full = h.inventory.due(inv, gpus, force=True)
        assert full is not None
        self._publish_inventory(h, full)

    def _publish_inventory(self, h: SimHost, inv: Inventory) -> None:
        frame = build_inventory(h.seqr, inv, h.system.host_facts())
        self.publisher.publish(h.seqr.subjects[2], encode(frame))
        self.stats.inventories += 1
        h.inventory_sent = True

    def tick(self, h: SimHost) -> None:
        if self.down(h):
            self.stats.silent_ticks += 1
            return
        if h.nvml_error is not None and self.open_backend(h):
            h.inventory_sent = False  # NVML works again: the GPUs are the new inventory
        gpus = h.backend.sample() if h.nvml_error is None else []
        if not h.inventory_sent:
            self.send_inventory(h, gpus)
        elif h.nvml_error is None and (full := h.inventory.due(h.backend.inventory(), gpus)) is not None:
            self._publish_inventory(h, full)  # static GPU facts changed, or 5 minutes passed
        outage = None
        if h.outages_told != self.publisher.outages:  # the first sample after NATS came back
            h.outages_told = self.publisher.outages
            outage = self.publisher.last_outage
        frame = build_sample(
            h.seqr, interval_s=self.interval, gpus=gpus, system=h.system.sample(), outage=outage
        )
        self.publisher.publish(h.seqr.subjects[0], encode(frame, static=False))  # static: in the inventory
        self.stats.samples += 1

    def poll_events(self) -> None:
        now = time.monotonic()
        for h in self.faulty:
            if h.nvml_error is not None:
                continue
            events = h.backend.poll_events()
            if not events or h.tracker is None:
                continue
            down = self.down(h)
            for ev in events:
                accepted = h.tracker.accept(ev, now)
                if accepted is None or down:
                    continue
                frame = build_event(h.seqr, *accepted)
                self.publisher.publish(h.seqr.subjects[1], encode(frame), urgent=True)
                self.stats.events += 1

    async def run(self, duration: float | None = None) -> None:
        """Tick every host on its slot until :meth:`stop` or ``duration`` seconds."""
        t0 = time.monotonic()
        try:
            await self._loop(t0, math.inf if duration is None else t0 + duration)
        finally:
            self.stats.run_s += time.monotonic() - t0

    async def _loop(self, t0: float, end: float) -> None:
        n = len(self.hosts)
        slot = self.interval / n
        next_poll = t0
        g = 0  # global tick number: host g % n, period g // n, due at t0 + g * slot
        while not self._stop.is_set():
            now = time.monotonic()
            last = now >= end
            if last:  # woken late past the end (a starved loop): the ticks due before it are made
                now = end
            oldest = math.ceil((now - self.interval - t0) / slot)
            if g < oldest:
                self.stats.skipped_ticks += oldest - g
                g = oldest
            batch_end = math.inf if last else time.monotonic() + 0.05  # yield to the senders every 50 ms
            while t0 + g * slot < end and t0 + g * slot <= now and time.monotonic() < batch_end:
                self.tick(self.hosts[g % n])
                g += 1
            if last:
                break
            if now >= next_poll:
                self.poll_events()
                next_poll = now + self.event_poll_s
            wake = min(t0 + g * slot, next_poll, end)
            delay = wake - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            else:
                await asyncio.sleep(0)

    async def close(self, flush_timeout: float = 10.0) -> None:
        for h in self.hosts:
            h.backend.close()
        await self.publisher.close(flush_timeout)

    def summary(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self.stats.started)
        s = self.publisher.stats
        gpus = len(self.hosts[0].backend.inventory().gpus) if self.hosts else 0
        return {
            "hosts": len(self.hosts),
            "gpus_per_host": gpus,
            "interval_s": self.interval,
            "elapsed_s": round(elapsed, 3),
            "run_s": round(self.stats.run_s, 3),
            "cpu_s": round(time.process_time() - self.stats.cpu_started, 3),
            "samples": self.stats.samples,
            "events": self.stats.events,
            "inventories": self.stats.inventories,
            "skipped_ticks": self.stats.skipped_ticks,
            "silent_ticks": self.stats.silent_ticks,
            "published": s.published,
            "dropped": s.dropped,
            "publish_errors": s.publish_errors,
            "unsent": self.publisher.buffered,
            "samples_per_s": round(self.stats.samples / elapsed, 1),
            "gpu_samples_per_s": round(self.stats.samples * gpus / elapsed, 1),
        }


async def run_fleet(
    nats: NatsConfig,
    *,
    hosts: int,
    gpus: int,
    providers: int = 1,
    interval: float = 5.0,
    faults: Sequence[str] = (),
    duration: float | None = None,
    seed: int = 0,
    signals: bool = True,
) -> dict[str, Any]:
    """Run a fleet until SIGINT/SIGTERM or ``duration``; return its summary figures."""
    fleet = Fleet(
        nats, hosts=hosts, gpus=gpus, providers=providers, interval=interval, faults=faults, seed=seed
    )
    with stop_on_signals(fleet.stop, signals):
        try:
            await fleet.start()
            # the hosts' models live as long as this process: the garbage collector need not scan
            # them at every collection (a fleet in a process of its own: gpuwarden fleet)
            gc.freeze()
            log.info("fleet: %d hosts x %d GPUs, %d providers, every %gs", hosts, gpus, providers, interval)
            await fleet.run(duration)
        finally:
            await fleet.close()
    return fleet.summary()
