"""Frame building and the deadline-based tick schedule.

One :class:`Sequencer` per agent run (or per simulated host in ``gpuwarden fleet``) owns the
frame identity: host, provider, a fresh random ``boot_id`` and a ``seq`` strictly increasing
across every frame kind. The builders are pure apart from reading the wall clock when no
``ts`` is given.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.gpu.base import GpuEvent, Inventory
from shared import subjects
from shared.frames import (
    AgentStats,
    CheckResult,
    EventFrame,
    GpuSample,
    HostFacts,
    InventoryFrame,
    PublishOutage,
    SampleFrame,
    SystemSample,
    replace,
    static_facts,
    with_static,
)

INVENTORY_EVERY_S = 300.0
"""The inventory is sent again at least this often, even unchanged: a collector that restarted
(or a tap that just subscribed) has every host's static GPU facts within this time."""


def new_boot_id() -> str:
    """A fresh random id for one run of an agent (16 hex characters)."""
    return uuid.uuid4().hex[:16]


@dataclass(slots=True)
class Sequencer:
    """Identity and numbering of the frames of one agent run."""

    host: str
    provider: str
    boot_id: str = field(default_factory=new_boot_id)
    seq: int = 0  # the last number handed out; the first frame gets 1
    subjects: tuple[str, str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Fails early (SubjectError) on a host or provider that cannot form a subject. The
        # frames carry the names exactly as the subject tokens (the collector's identity).
        self.host = subjects.sanitize_token(self.host)
        self.provider = subjects.sanitize_token(self.provider)
        self.subjects = (
            subjects.sample_subject(self.provider, self.host),
            subjects.event_subject(self.provider, self.host),
            subjects.inventory_subject(self.provider, self.host),
        )

    def next(self) -> int:
        self.seq += 1
        return self.seq

    def subject(self, kind: str) -> str:
        """Subject of a frame of ``kind`` (``sample``, ``event`` or ``inventory``) of this host."""
        return self.subjects[("sample", "event", "inventory").index(kind)]


def build_sample(
    seqr: Sequencer,
    *,
    interval_s: float,
    gpus: Sequence[GpuSample],
    system: SystemSample | None = None,
    checks: Sequence[CheckResult] = (),
    agent: AgentStats | None = None,
    ts: float | None = None,
    outage: PublishOutage | None = None,
) -> SampleFrame:
    return SampleFrame(
        host=seqr.host,
        provider=seqr.provider,
        boot_id=seqr.boot_id,
        seq=seqr.next(),
        ts=time.time() if ts is None else ts,
        interval_s=interval_s,
        gpus=tuple(gpus),
        system=system,
        checks=tuple(checks),
        agent=agent,
        outage=outage,
    )


def build_inventory(
    seqr: Sequencer, inventory: Inventory, host_facts: HostFacts | None = None, ts: float | None = None
) -> InventoryFrame:
    return InventoryFrame(
        host=seqr.host,
        provider=seqr.provider,
        boot_id=seqr.boot_id,
        seq=seqr.next(),
        ts=time.time() if ts is None else ts,
        backend=inventory.backend,
        driver_version=inventory.driver_version,
        cuda_version=inventory.cuda_version,
        nvml_version=inventory.nvml_version,
        gpus=inventory.gpus,
        host_facts=host_facts,
        nvml_error=inventory.nvml_error,
    )


def build_event(seqr: Sequencer, ev: GpuEvent, count: int | None) -> EventFrame:
    return EventFrame(
        host=seqr.host,
        provider=seqr.provider,
        boot_id=seqr.boot_id,
        seq=seqr.next(),
        ts=ev.ts,
        type=ev.type,
        source=ev.source,
        gpu_index=ev.gpu_index,
        gpu_uuid=ev.gpu_uuid,
        xid=ev.xid,
        count=count,
        value=ev.value,
        message=ev.message,
    )


class InventorySchedule:
    """When the agent sends its inventory: at start, whenever it changes (the GPUs' static facts,
    which samples of schema v2 leave out, included) and every ``every`` seconds.

    :meth:`due` is called before each sample with the backend's inventory and the GPUs just read;
    it returns the inventory to send (its GPUs carrying their static facts) or ``None``."""

    def __init__(self, every: float = INVENTORY_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._static: dict[int, GpuSample] = {}  # the last reading of each GPU that was not lost
        self._key: tuple[Any, ...] | None = None  # what the last inventory sent was made of
        self._full: Inventory | None = None
        self._sent_at = -math.inf

    def due(
        self, inventory: Inventory, gpus: Sequence[GpuSample], *, force: bool = False
    ) -> Inventory | None:
        for g in gpus:
            if not g.lost:
                self._static[g.index] = g
        key = (inventory, tuple(static_facts(g) for g in self._static.values()))
        now = self._clock()
        if not force and key == self._key and now - self._sent_at < self.every:
            return None
        if key != self._key or self._full is None:
            infos = tuple(
                with_static(info, self._static[info.index]) if info.index in self._static else info
                for info in inventory.gpus
            )
            self._full = replace(inventory, gpus=infos)
            self._key = key
        self._sent_at = now
        return self._full


class Deadlines:
    """A drift-free tick schedule: each deadline is the previous one plus the interval.

    When a tick overran one or more later deadlines, those ticks are skipped (counted in
    :attr:`missed`) and the schedule stays on its original grid.
    """

    def __init__(
        self, interval_s: float, start: float | None = None, clock: Callable[[], float] = time.monotonic
    ):
        if interval_s <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval_s
        self.clock = clock
        self.next = clock() if start is None else start
        self.missed = 0

    def advance(self, now: float | None = None) -> float:
        """Move to the next deadline after ``now`` on the grid and return it."""
        now = self.clock() if now is None else now
        self.next += self.interval
        if self.next <= now:
            skip = math.floor((now - self.next) / self.interval) + 1
            self.next += skip * self.interval
            self.missed += skip
        return self.next

    async def wait(self, stop: asyncio.Event) -> bool:
        """Sleep until the current deadline; True if ``stop`` was set first."""
        delay = self.next - self.clock()
        if delay <= 0:
            return stop.is_set()
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            return False
        return True
