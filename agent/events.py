"""Event bookkeeping: map kernel-log events to GPUs, drop NVML/kmsg duplicates, count per GPU and code.

The same XID usually arrives twice, once from the NVML event set and once from the kernel log,
a few milliseconds apart and in either order. :class:`EventTracker` keeps, per (GPU, type, xid),
the recent occurrences not yet matched by the other source; an event that matches one of them
within ``window_s`` is the same occurrence and is dropped. Everything else is counted and
returned with its running count for this agent run.

Pure: the time is passed in, nothing is logged, memory is bounded.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Final

from agent.gpu.base import GpuEvent
from shared.frames import GpuInfo

MAX_KEYS: Final = 4096  # (GPU, type, xid) combinations remembered; the least recently seen go first
MAX_PENDING: Final = 64  # unmatched occurrences remembered per key and source

_BUS_RE: Final = re.compile(
    r"^(?:pci:)?(?:(?P<domain>[0-9a-f]{1,8}):)?(?P<bus>[0-9a-f]{1,2}):(?P<dev>[0-9a-f]{1,2})(?:\.[0-9a-f])?$"
)

Key = tuple[str, str, int | None]


def normalize_bus_id(bus_id: str) -> str | None:
    """``0000:3b:00`` for every spelling of one PCI device (``00000000:3B:00.0``, ``PCI:0000:3b:00``,
    ``3b:00.0``); ``None`` if ``bus_id`` is not a PCI address. The function number is dropped:
    the driver names a GPU by domain, bus and device.
    """
    m = _BUS_RE.match(bus_id.strip().lower())
    if not m:
        return None
    domain = int(m.group("domain") or "0", 16)
    return f"{domain:04x}:{int(m.group('bus'), 16):02x}:{int(m.group('dev'), 16):02x}"


class _Entry:
    __slots__ = ("count", "pending")

    def __init__(self) -> None:
        self.count = 0
        self.pending: dict[str, deque[float]] = {}


class EventTracker:
    """Deduplicates and counts :class:`GpuEvent` per (GPU, type, xid)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.duplicates = 0  # events dropped as the other source's copy
        self._by_bus: dict[str, tuple[int, str]] = {}
        self._by_index: dict[int, str] = {}
        self._by_uuid: dict[str, int] = {}
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()

    def set_inventory(self, gpus: Sequence[GpuInfo]) -> None:
        """Learn the GPUs: PCI bus id -> (index, UUID), and index <-> UUID."""
        self._by_bus = {}
        for g in gpus:
            bus = normalize_bus_id(g.pci_bus_id) if g.pci_bus_id else None
            if bus is not None:
                self._by_bus[bus] = (g.index, g.uuid)
        self._by_index = {g.index: g.uuid for g in gpus}
        self._by_uuid = {g.uuid: g.index for g in gpus}

    def resolve(self, ev: GpuEvent) -> GpuEvent:
        """``ev`` with ``gpu_index`` and ``gpu_uuid`` filled from what it carries, where known."""
        index, uuid = ev.gpu_index, ev.gpu_uuid
        if (index is None or uuid is None) and ev.pci_bus_id:
            bus = normalize_bus_id(ev.pci_bus_id)
            found = self._by_bus.get(bus) if bus else None
            if found:
                index = found[0] if index is None else index
                uuid = found[1] if uuid is None else uuid
        if index is None and uuid is not None:
            index = self._by_uuid.get(uuid)
        if uuid is None and index is not None:
            uuid = self._by_index.get(index)
        if index == ev.gpu_index and uuid == ev.gpu_uuid:
            return ev
        return replace(ev, gpu_index=index, gpu_uuid=uuid)

    def accept(self, ev: GpuEvent, now: float) -> tuple[GpuEvent, int] | None:
        """The resolved event and its running count, or ``None`` if it duplicates the other source's."""
        ev = self.resolve(ev)
        key = self._key(ev)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > MAX_KEYS:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        horizon = now - self.window_s
        for source, times in entry.pending.items():
            while times and times[0] < horizon:
                times.popleft()
            if source != ev.source and times:
                times.popleft()  # the other source already reported this occurrence
                self.duplicates += 1
                return None
        mine = entry.pending.get(ev.source)
        if mine is None:
            mine = entry.pending[ev.source] = deque(maxlen=MAX_PENDING)
        mine.append(now)
        entry.count += 1
        return ev, entry.count

    def count(self, ev: GpuEvent) -> int:
        """How many events like ``ev`` (same GPU, type and xid) were accepted so far."""
        entry = self._entries.get(self._key(self.resolve(ev)))
        return entry.count if entry else 0

    @staticmethod
    def _key(ev: GpuEvent) -> Key:
        if ev.gpu_uuid:
            gpu = ev.gpu_uuid
        elif ev.gpu_index is not None:
            gpu = f"#{ev.gpu_index}"
        elif ev.pci_bus_id:
            gpu = "pci:" + (normalize_bus_id(ev.pci_bus_id) or ev.pci_bus_id)
        else:
            gpu = "?"
        return gpu, ev.type, ev.xid
