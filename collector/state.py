"""The fleet's latest state in memory: per provider, host and GPU.

Updated with each committed batch of frames (:meth:`FleetState.apply`) and rebuilt from
PostgreSQL at start (:func:`load_state`), so a restarted collector does not show an empty
fleet. Older frames never overwrite newer ones (redelivery, or a late event). A frame dated
more than ``max_skew`` ahead of the collector's clock (a host whose clock is wrong) is stored
but never becomes a current reading: otherwise it would stay "newest", and freeze the host's
readings, until wall time caught up with it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

import asyncpg

from collector.store import queries
from shared.frames import EventFrame, Frame, GpuInfo, GpuSample, InventoryFrame, PublishOutage, SampleFrame

RECENT_EVENTS: Final = 64  # per host
MAX_SKEW: Final = 30.0  # default clock-skew allowance, seconds ([health] max_clock_skew)


@dataclass(slots=True)
class FleetHost:
    """What the collector knows about one host now."""

    host: str
    provider: str
    last_seen: float = 0.0  # the newest frame's ts (any kind)
    boot_id: str | None = None
    sample: SampleFrame | None = None  # the newest sample frame
    inventory: InventoryFrame | None = None  # the newest inventory frame
    events: deque[EventFrame] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    ahead_frames: int = 0  # frames dated beyond the clock-skew allowance (stored, not shown)
    outage: PublishOutage | None = None  # the agent's newest report of a time it could not publish

    @property
    def gpus(self) -> tuple[GpuSample, ...]:
        return self.sample.gpus if self.sample is not None else ()

    @property
    def gpu_count(self) -> int:
        """GPUs the host reports: those of its newest sample, else of its inventory."""
        if self.sample is not None:
            return len(self.sample.gpus)
        return len(self.inventory.gpus) if self.inventory is not None else 0

    def gpu_info(self, index: int) -> GpuInfo | None:
        if self.inventory is not None:
            for g in self.inventory.gpus:
                if g.index == index:
                    return g
        return None


class FleetState:
    """Latest state of every host, grouped by provider."""

    def __init__(self, max_skew: float = MAX_SKEW) -> None:
        self.max_skew = max_skew
        self.hosts: dict[str, FleetHost] = {}
        self.providers: dict[str, set[str]] = {}
        self.updated = 0.0  # wall time of the last change

    def __len__(self) -> int:
        return len(self.hosts)

    def replace(self, other: FleetState) -> None:
        """Take ``other``'s hosts (the state rebuilt at start), keeping this object."""
        self.hosts, self.providers, self.updated = other.hosts, other.providers, other.updated

    def __iter__(self) -> Iterator[FleetHost]:
        return iter(self.hosts.values())

    def host(self, name: str) -> FleetHost | None:
        return self.hosts.get(name)

    def _host(self, f: Frame) -> FleetHost:
        h = self.hosts.get(f.host)
        if h is None:
            h = self.hosts[f.host] = FleetHost(f.host, f.provider)
            self.providers.setdefault(f.provider, set()).add(f.host)
        elif h.provider != f.provider:
            self.providers.get(h.provider, set()).discard(f.host)
            if not self.providers.get(h.provider):
                self.providers.pop(h.provider, None)
            h.provider = f.provider
            self.providers.setdefault(f.provider, set()).add(f.host)
        return h

    def forget(self, name: str) -> bool:
        """Drop host ``name`` (``forget-host``); ``False`` when it was not there."""
        h = self.hosts.pop(name, None)
        if h is None:
            return False
        members = self.providers.get(h.provider)
        if members is not None:
            members.discard(name)
            if not members:
                del self.providers[h.provider]
        self.updated = time.time()
        return True

    def apply(self, frames: Iterable[Frame], now: float | None = None) -> None:
        """Fold committed frames into the state (in any order): the newest dated within the
        clock-skew allowance of ``now`` wins; frames dated beyond it are only counted."""
        now = time.time() if now is None else now
        limit = now + self.max_skew
        for f in frames:
            h = self._host(f)
            if f.ts > limit:
                h.ahead_frames += 1
                continue
            if f.ts >= h.last_seen or h.last_seen > limit:
                h.last_seen = f.ts
                h.boot_id = f.boot_id
            if type(f) is SampleFrame:
                if h.sample is None or _newer(f, h.sample) or h.sample.ts > limit:
                    h.sample = f
                if f.outage is not None and (h.outage is None or f.outage.until >= h.outage.until):
                    h.outage = f.outage
            elif type(f) is EventFrame:
                _insert_event(h.events, f)
            elif type(f) is InventoryFrame and (
                h.inventory is None or _newer(f, h.inventory) or h.inventory.ts > limit
            ):
                h.inventory = f
        self.updated = time.time()


def _newer(a: Frame, b: Frame) -> bool:
    return (a.ts, a.seq) > (b.ts, b.seq)


def _insert_event(events: deque[EventFrame], e: EventFrame) -> None:
    key = (e.boot_id, e.seq)
    if any((x.boot_id, x.seq) == key for x in events):
        return
    if not events or events[-1].ts <= e.ts:
        events.append(e)
        return
    items = sorted([*events, e], key=lambda x: (x.ts, x.seq))[-RECENT_EVENTS:]
    events.clear()
    events.extend(items)


async def load_state(
    conn: asyncpg.Connection | asyncpg.Pool,
    now: float | None = None,
    lookback: float = 86_400.0,
    max_skew: float = MAX_SKEW,
) -> FleetState:
    """Rebuild the state from PostgreSQL: hosts, their newest sample, inventory, recent events
    (each dated within the clock-skew allowance)."""
    now = time.time() if now is None else now
    state = FleetState(max_skew)
    for row in await queries.hosts(conn):
        last_seen = min(row.last_seen, now + max_skew)  # a host's clock ahead pushed it forward
        h = FleetHost(row.name, row.provider, last_seen=last_seen, boot_id=row.boot_id)
        state.hosts[row.name] = h
        state.providers.setdefault(row.provider, set()).add(row.name)
    state.apply(await queries.latest_inventories(conn, until=now + max_skew), now)
    state.apply(await queries.latest_samples(conn, now - lookback, until=now + max_skew), now)
    events = await queries.recent_events(conn, now - lookback, limit=RECENT_EVENTS * max(1, len(state)))
    state.apply(events, now)
    return state
