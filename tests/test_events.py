"""EventTracker: bus-id mapping, NVML/kmsg deduplication and running counts (pure, time passed in)."""

from __future__ import annotations

import pytest

from agent.events import MAX_KEYS, EventTracker, normalize_bus_id
from agent.gpu.base import GpuEvent
from shared.frames import GpuInfo

GPUS = (
    GpuInfo(index=0, uuid="GPU-a", pci_bus_id="00000000:18:00.0"),
    GpuInfo(index=1, uuid="GPU-b", pci_bus_id="00000000:3B:00.0"),
    GpuInfo(index=2, uuid="GPU-c", pci_bus_id=None),
)


def nvml(xid: int | None = 79, gpu: int = 1, type: str = "xid") -> GpuEvent:
    return GpuEvent(type=type, ts=0.0, source="nvml", gpu_index=gpu, gpu_uuid=GPUS[gpu].uuid, xid=xid)


def kmsg(xid: int | None = 79, bus: str = "0000:3b:00", type: str = "xid") -> GpuEvent:
    return GpuEvent(type=type, ts=0.0, source="kmsg", pci_bus_id=bus, xid=xid)


@pytest.fixture
def tracker() -> EventTracker:
    t = EventTracker(window_s=10.0)
    t.set_inventory(GPUS)
    return t


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("00000000:3B:00.0", "0000:3b:00"),
        ("0000:3b:00", "0000:3b:00"),
        ("PCI:0000:3b:00", "0000:3b:00"),
        ("3b:00.0", "0000:3b:00"),
        ("0001:9A:1f.3", "0001:9a:1f"),
        (" 00000000:18:00.0 ", "0000:18:00"),
        ("not a bus id", None),
        ("", None),
    ],
)
def test_normalize_bus_id(raw: str, expected: str | None) -> None:
    assert normalize_bus_id(raw) == expected


def test_kmsg_event_gets_gpu_from_bus_id(tracker: EventTracker) -> None:
    got = tracker.accept(kmsg(bus="0000:18:00"), now=100.0)
    assert got is not None
    ev, count = got
    assert (ev.gpu_index, ev.gpu_uuid, ev.pci_bus_id, count) == (0, "GPU-a", "0000:18:00", 1)


def test_unknown_bus_id_is_kept_unmapped(tracker: EventTracker) -> None:
    got = tracker.accept(kmsg(bus="0000:99:00"), now=1.0)
    assert got is not None
    assert (got[0].gpu_index, got[0].gpu_uuid, got[1]) == (None, None, 1)


def test_index_and_uuid_fill_each_other(tracker: EventTracker) -> None:
    ev = tracker.resolve(GpuEvent(type="xid", ts=0.0, source="simulated", gpu_index=2, xid=13))
    assert ev.gpu_uuid == "GPU-c"
    ev = tracker.resolve(GpuEvent(type="xid", ts=0.0, source="simulated", gpu_uuid="GPU-b", xid=13))
    assert ev.gpu_index == 1


@pytest.mark.parametrize("first_nvml", [True, False])
def test_same_xid_from_both_sources_is_one_event(tracker: EventTracker, first_nvml: bool) -> None:
    a, b = (nvml(), kmsg()) if first_nvml else (kmsg(), nvml())
    got = tracker.accept(a, now=100.0)
    assert got is not None
    assert got[1] == 1
    assert tracker.accept(b, now=100.4) is None
    assert tracker.duplicates == 1
    assert tracker.count(nvml()) == 1


def test_two_real_occurrences_from_both_sources_count_two(tracker: EventTracker) -> None:
    counts = []
    for now, ev in [(100.0, nvml()), (100.1, nvml()), (100.2, kmsg()), (100.3, kmsg())]:
        got = tracker.accept(ev, now)
        counts.append(None if got is None else got[1])
    assert counts == [1, 2, None, None]
    got = tracker.accept(kmsg(), now=100.5)  # a third, seen by kmsg only so far
    assert got is not None
    assert got[1] == 3
    assert tracker.accept(nvml(), now=100.6) is None


def test_same_source_repeats_are_not_duplicates(tracker: EventTracker) -> None:
    counts = [tracker.accept(nvml(), now=100.0 + i) for i in range(3)]
    assert [c[1] for c in counts if c is not None] == [1, 2, 3]


def test_outside_window_is_a_new_event(tracker: EventTracker) -> None:
    assert tracker.accept(nvml(), now=100.0) is not None
    got = tracker.accept(kmsg(), now=110.5)
    assert got is not None
    assert got[1] == 2


@pytest.mark.parametrize(
    "other",
    [
        nvml(xid=13),  # another code
        nvml(gpu=0),  # another GPU
        nvml(type="gpu_lost"),  # another type
    ],
)
def test_different_key_is_not_deduplicated(tracker: EventTracker, other: GpuEvent) -> None:
    assert tracker.accept(kmsg(), now=100.0) is not None
    got = tracker.accept(other, now=100.1)
    assert got is not None
    assert got[1] == 1


def test_gpu_lost_from_kmsg_and_nvml_dedup(tracker: EventTracker) -> None:
    assert tracker.accept(nvml(type="gpu_lost", xid=None), now=5.0) is not None
    assert tracker.accept(kmsg(type="gpu_lost", xid=None, bus="0000:3b:00.0"), now=5.2) is None


def test_counts_survive_many_keys_bounded(tracker: EventTracker) -> None:
    for i in range(MAX_KEYS + 100):
        tracker.accept(GpuEvent(type="xid", ts=0.0, source="simulated", gpu_index=0, xid=i), now=float(i))
    assert len(tracker._entries) == MAX_KEYS
    assert tracker.count(GpuEvent(type="xid", ts=0.0, source="simulated", gpu_index=0, xid=0)) == 0  # evicted
    last = GpuEvent(type="xid", ts=0.0, source="simulated", gpu_index=0, xid=MAX_KEYS + 99)
    assert tracker.count(last) == 1


def test_pending_per_key_is_bounded(tracker: EventTracker) -> None:
    for i in range(1000):
        tracker.accept(nvml(), now=100.0 + i * 0.001)
    entry = next(iter(tracker._entries.values()))
    assert all(len(q) <= 64 for q in entry.pending.values())
    assert tracker.count(nvml()) == 1000


def test_inventory_change_remaps(tracker: EventTracker) -> None:
    tracker.set_inventory([GpuInfo(index=5, uuid="GPU-z", pci_bus_id="0000:3b:00.0")])
    got = tracker.accept(kmsg(), now=1.0)
    assert got is not None
    assert (got[0].gpu_index, got[0].gpu_uuid) == (5, "GPU-z")
