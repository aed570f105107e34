"""The simulated GPU backend: determinism, realism, every fault's effect, events and waking."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from agent.faults import FaultSchedule
from agent.gpu.auto import make_backend
from agent.gpu.base import GpuBackend
from agent.gpu.simmodel import (
    GPU_IDLE,
    HW_POWER_BRAKE,
    HW_SLOWDOWN,
    HW_THERMAL,
    SW_POWER_CAP,
    SW_THERMAL,
    TEMP_SLOWDOWN_C,
)
from agent.gpu.simulated import SimulatedBackend
from shared.errors import ConfigError
from shared.frames import GpuSample, InventoryFrame, SampleFrame, decode, encode, fields


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(gpus: int = 8, *, host: str = "h1", seed: int = 0, faults: list[str] | None = None):
    clock = FakeClock()
    b = SimulatedBackend(gpus, host=host, seed=seed, faults=FaultSchedule.parse(faults or []), clock=clock)
    b.open()
    return b, clock


def at(b: SimulatedBackend, clock: FakeClock, t: float) -> list[GpuSample]:
    clock.now = 1000.0 + t
    return b.sample()


def run(b: SimulatedBackend, clock: FakeClock, until: float, step: float = 5.0) -> list[list[GpuSample]]:
    out, t = [], 0.0
    while t <= until:
        out.append(at(b, clock, t))
        t += step
    return out


def test_implements_protocol() -> None:
    b, _ = make(2)
    assert isinstance(b, GpuBackend)
    assert b.name == "simulated"


def test_sample_before_open_raises() -> None:
    b = SimulatedBackend(2, host="h")
    with pytest.raises(RuntimeError, match="open"):
        b.sample()
    with pytest.raises(RuntimeError, match="open"):
        b.elapsed()
    assert b.poll_events() == []


def test_deterministic_for_seed_and_host() -> None:
    faults = ["gpu1:ecc_sbe=30@20s", "gpu2:temp=95@30s+60s", "gpu3:lost@100s+50s"]
    a, ca = make(seed=7, faults=faults)
    b, cb = make(seed=7, faults=faults)
    ra, rb = run(a, ca, 900, 3.0), run(b, cb, 900, 3.0)
    assert ra == rb
    assert a.inventory() == b.inventory()
    c, cc = make(seed=8, faults=faults)
    rc = run(c, cc, 900, 3.0)
    assert rc != ra
    assert {g.uuid for g in c.inventory().gpus}.isdisjoint({g.uuid for g in a.inventory().gpus})
    d, cd = make(seed=7, host="h2", faults=faults)
    assert run(d, cd, 900, 3.0) != ra


def test_inventory_is_h100_like_and_round_trips() -> None:
    b, _ = make(8)
    inv = b.inventory()
    assert inv.backend == "simulated"
    assert inv.driver_version
    assert inv.cuda_version
    assert len(inv.gpus) == 8
    assert len({g.uuid for g in inv.gpus}) == 8
    assert len({g.pci_bus_id for g in inv.gpus}) == 8
    assert len({g.serial for g in inv.gpus}) == 8
    for i, g in enumerate(inv.gpus):
        assert g.index == i
        assert g.uuid.startswith("GPU-")
        assert g.name == "NVIDIA H100 80GB HBM3"
        assert g.architecture == "Hopper"
        assert g.mem_total_bytes is not None
        assert 80e9 < g.mem_total_bytes < 90e9
        assert (g.pcie_link_gen_max, g.pcie_link_width_max, g.nvlink_links_total) == (5, 16, 18)
        assert g.power_limit_default_w == 700.0
        assert g.persistence_mode is True
        assert g.unsupported == ("fan_pct",)
    frame = InventoryFrame(host="h1", provider="p", boot_id="b", seq=1, ts=time.time(), gpus=inv.gpus)
    assert decode(encode(frame)) == frame


def test_other_models() -> None:
    b = SimulatedBackend(1, host="h", model="NVIDIA A100-SXM4-40GB")
    g = b.inventory().gpus[0]
    assert (g.architecture, g.pcie_link_gen_max, g.nvlink_links_total, g.power_limit_default_w) == (
        "Ampere",
        4,
        12,
        400.0,
    )
    assert g.mem_total_bytes is not None
    assert 40e9 < g.mem_total_bytes < 45e9


def test_values_in_frame_ranges_and_round_trip() -> None:
    faults = [
        "gpu0:temp=120@10s+20s",
        "gpu1:ecc_sbe=600@0s",
        "gpu2:lost@50s+20s",
        "gpu3:nvlink_err=5000@0s",
        "gpu4:power=1500@0s+100s",
        "gpu5:pcie_replay=100@0s",
        "gpu6:throttle=power_brake@0s",
        "gpu7:ecc_dbe@20s+30s",
        "xid=13@5s",
    ]
    b, clock = make(faults=faults)
    for seq, samples in enumerate(run(b, clock, 3600, 7.0)):
        frame = SampleFrame(
            host="h1", provider="p", boot_id="b", seq=seq, ts=time.time(), gpus=tuple(samples)
        )
        assert decode(encode(frame)) == frame  # decode validates every range


def test_idle_and_busy_phases_look_real() -> None:
    b, clock = make(8, seed=3)
    ticks = run(b, clock, 4 * 3600, 10.0)
    busy_seen = idle_seen = 0
    for samples in ticks:
        for s in samples:
            assert s.temp_c is not None
            assert s.power_w is not None
            assert s.util_gpu_pct is not None
            assert s.mem_used_bytes is not None
            assert s.mem_total_bytes is not None
            assert 20 <= s.temp_c < TEMP_SLOWDOWN_C
            assert 0 < s.power_w <= 700
            assert s.mem_used_bytes <= s.mem_total_bytes
            assert s.ecc_enabled is True
            assert s.persistence_mode is True
            assert s.ecc_dbe_volatile == 0
            assert s.remap_failure is False
            assert (s.pcie_link_width, s.nvlink_links_up, s.nvlink_down_links) == (16, 18, ())
            assert (s.fabric_state, s.fabric_status, s.temp_mem_max_c) == (3, 0, 95.0)
            # a busy GPU runs its PCIe link at its maximum generation; an idle one lowers it (not a fault)
            assert s.pcie_link_gen == (5 if s.processes else 1)
            assert s.clock_event_reasons is not None
            assert s.fan_pct is None  # an SXM board has no fan: not supported, not a sentinel
            if s.processes:
                busy_seen += 1
                assert s.util_gpu_pct > 50
                assert s.power_w > 200
                assert s.clock_event_reasons & GPU_IDLE == 0
                assert 1 <= len(s.processes) <= 2
                assert sum(p.used_mem_bytes or 0 for p in s.processes) <= s.mem_used_bytes
                assert all(p.pid > 0 and p.name and p.container for p in s.processes)
            else:
                idle_seen += 1
                assert s.util_gpu_pct == 0
                assert s.power_w == pytest.approx(70.0)
                assert s.clock_event_reasons == GPU_IDLE
                assert s.mem_used_bytes < 100 << 20
    assert busy_seen > 0.2 * 8 * len(ticks)
    assert idle_seen > 0.1 * 8 * len(ticks)
    # every GPU starts and stops jobs over four hours
    for i in range(8):
        states = [bool(samples[i].processes) for samples in ticks]
        assert sum(a != c for a, c in zip(states, states[1:], strict=False)) >= 2


def test_temperature_follows_power_with_lag() -> None:
    b, clock = make(1, faults=["power=650@100s+300s"])
    ref, rclock = make(1)
    times = [99, 101, *range(110, 400, 10), 700]
    temps = [at(b, clock, t)[0].temp_c or 0.0 for t in times]
    natural = [at(ref, rclock, t)[0].temp_c or 0.0 for t in times]
    assert at(b, clock, 101)[0].power_w == 650
    assert temps[0] == natural[0]
    assert temps[1] - natural[1] < 5  # thermal lag: not at once
    rise = [x - y for x, y in zip(temps[1:-1], natural[1:-1], strict=True)]
    assert min(rise) >= 0
    assert temps[-2] > 60  # a GPU held at 650 W runs hot
    assert abs(temps[-1] - natural[-1]) <= 1  # 300 s after the fault: back to its own temperature


def test_energy_and_counters_monotonic() -> None:
    faults = [
        "gpu0:ecc_sbe=90@30s+100s",
        "gpu0:ecc_sbe=30@60s",
        "gpu0:pcie_replay=45@10s+200s",
        "gpu0:nvlink_err@100s+50s",
        "gpu0:throttle=hw_thermal@0s+20s",
        "gpu0:throttle=sw_power@40s+20s",
        "gpu0:ecc_dbe@200s",
        "gpu0:lost@300s+30s",
    ]
    b, clock = make(1, faults=faults)
    names = [
        "energy_j",
        "ecc_sbe_aggregate",
        "ecc_dbe_aggregate",
        "pcie_replay_count",
        "nvlink_crc_errors",
        "nvlink_replay_errors",
        "throttle_thermal_ns",
        "throttle_power_ns",
        "remapped_rows_uncorrectable",
    ]
    last = dict.fromkeys(names, -1.0)
    grew = set()
    for (s,) in run(b, clock, 900, 1.5):
        if s.lost:
            continue
        for n in names:
            v = getattr(s, n)
            assert v is not None, n
            assert v >= last[n], n
            if last[n] >= 0 and v > last[n]:
                grew.add(n)
            last[n] = v
    assert grew == set(names)


# ----------------------------------------------------------------------------- fault effects
# Each fault is on GPU 1 from 10 s to 20 s; checks see GPU 1 at 5 s (before), 15 s (during)
# and 30 s (after), and GPU 0 during (unaffected).

Check = Callable[[GpuSample, GpuSample, GpuSample], None]


def _temp(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert d.temp_c == 95.0
    assert d.clock_event_reasons is not None
    assert d.clock_event_reasons & (HW_THERMAL | HW_SLOWDOWN)
    assert d.throttle_thermal_ns == 5_000_000_000
    assert a.temp_c is not None
    assert a.temp_c < TEMP_SLOWDOWN_C
    assert a.clock_event_reasons is not None
    assert not a.clock_event_reasons & HW_THERMAL
    assert a.throttle_thermal_ns == 10_000_000_000  # stops growing at the end


def _ecc_dbe(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert (b.ecc_dbe_volatile, b.ecc_dbe_aggregate) == (0, 0)
    assert (d.ecc_dbe_volatile, d.ecc_dbe_aggregate) == (1, 1)
    assert d.remapped_rows_uncorrectable == 1
    assert (a.ecc_dbe_volatile, a.ecc_dbe_aggregate) == (0, 1)  # the reset clears volatile only


def _ecc_sbe(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    base = b.ecc_sbe_aggregate or 0
    assert b.ecc_sbe_volatile == 0
    assert d.ecc_sbe_volatile == 50
    assert d.ecc_sbe_aggregate == base + 50
    assert a.ecc_sbe_volatile == 100
    assert a.ecc_sbe_aggregate == base + 100


def _throttle(bits: int, policy: str) -> Check:
    def check(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
        assert d.clock_event_reasons is not None
        assert d.clock_event_reasons & bits == bits
        assert a.clock_event_reasons is not None
        assert a.clock_event_reasons & bits == 0
        assert getattr(d, f"throttle_{policy}_ns") == 5_000_000_000
        assert getattr(a, f"throttle_{policy}_ns") == 10_000_000_000
        assert d.clock_sm_mhz is not None
        assert b.clock_sm_mhz is not None
        if b.processes:  # a busy GPU's clock drops while throttled
            assert d.clock_sm_mhz < b.clock_sm_mhz

    return check


def _lost(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert not b.lost
    assert not a.lost
    assert d.lost
    assert all(
        getattr(d, f.name) == (() if isinstance(f.default, tuple) else None)
        for f in fields(GpuSample)
        if f.name not in {"index", "uuid", "lost"}
    )
    assert d.processes == ()
    assert d.uuid == b.uuid
    assert d.index == 1
    assert a.temp_c is not None


def _power(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert d.power_w == 900.0
    assert d.throttle_power_ns == 5_000_000_000
    assert a.power_w is not None
    assert a.power_w <= 700


def _pcie(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert (b.pcie_replay_count, d.pcie_replay_count, a.pcie_replay_count) == (0, 5, 10)


def _nvlink_err(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert b.nvlink_crc_errors == 0
    assert d.nvlink_crc_errors == 1250  # 250/s: over DCGM's 100/s failure rate
    assert d.nvlink_crc_by_link == (1250,) + (0,) * 17  # attributed to its link
    assert b.nvlink_crc_by_link == (0,) * 18
    assert a.nvlink_crc_errors == 2500
    assert d.nvlink_replay_errors is not None
    assert d.nvlink_replay_errors > 0


def _nvlink_down(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert (b.nvlink_links_up, d.nvlink_links_up, a.nvlink_links_up) == (18, 15, 18)
    assert d.nvlink_links_total == 18
    assert (b.nvlink_down_links, d.nvlink_down_links, a.nvlink_down_links) == ((), (15, 16, 17), ())


def _pcie_width(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert (b.pcie_link_width, d.pcie_link_width, a.pcie_link_width) == (16, 4, 16)
    assert d.pcie_link_width_max == 16


def _hbm_temp(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert d.mem_temp_c == 101.0
    assert d.temp_mem_max_c == 95.0
    assert b.mem_temp_c is not None
    assert b.mem_temp_c < 90
    assert a.mem_temp_c is not None
    assert a.mem_temp_c < 90


def _fabric(state: int, status: int, mask: int) -> Check:
    def check(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
        assert (b.fabric_state, b.fabric_status, b.fabric_health_mask) == (3, 0, 0)
        assert (d.fabric_state, d.fabric_status, d.fabric_health_mask) == (state, status, mask)
        assert (a.fabric_state, a.fabric_status, a.fabric_health_mask) == (3, 0, 0)

    return check


def _flag(name: str) -> Check:
    def check(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
        assert (getattr(b, name), getattr(d, name), getattr(a, name)) == (False, True, False)

    return check


def _remap_pending(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    _flag("remap_pending")(b, d, a)
    assert d.remapped_rows_correctable == (b.remapped_rows_correctable or 0) + 1


def _retired(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert (b.retired_pages_dbe, d.retired_pages_dbe, a.retired_pages_dbe) == (
        0,
        70,
        70,
    )  # pages stay retired
    assert (b.retired_pages_pending, d.retired_pages_pending, a.retired_pages_pending) == (False, True, False)


def _recovery(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert (b.recovery_action, d.recovery_action, a.recovery_action) == (0, 2, 0)


def _mem_full(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert d.mem_used_bytes is not None
    assert d.mem_total_bytes is not None
    assert d.mem_used_bytes >= 0.98 * d.mem_total_bytes
    assert a.mem_used_bytes is not None
    assert a.mem_used_bytes < 0.95 * d.mem_total_bytes


def _persistence(b: GpuSample, d: GpuSample, a: GpuSample) -> None:
    assert (b.persistence_mode, d.persistence_mode, a.persistence_mode) == (True, False, True)


EFFECTS: list[tuple[str, Check]] = [
    ("temp=95", _temp),
    ("ecc_dbe", _ecc_dbe),
    ("ecc_sbe=600", _ecc_sbe),
    ("throttle=hw_slowdown", _throttle(HW_SLOWDOWN, "thermal")),
    ("throttle=hw_thermal", _throttle(HW_THERMAL | HW_SLOWDOWN, "thermal")),
    ("throttle=sw_thermal", _throttle(SW_THERMAL, "thermal")),
    ("throttle=power_brake", _throttle(HW_POWER_BRAKE | HW_SLOWDOWN, "power")),
    ("throttle=sw_power", _throttle(SW_POWER_CAP, "power")),
    ("lost", _lost),
    ("power=900", _power),
    ("pcie_replay=60", _pcie),
    ("nvlink_err", _nvlink_err),
    ("nvlink_down=3", _nvlink_down),
    ("row_remap_fail", _flag("remap_failure")),
    ("remap_pending", _remap_pending),
    ("retired_pages=70", _retired),
    ("recovery_action=2", _recovery),
    ("mem_full", _mem_full),
    ("persistence_off", _persistence),
    ("pcie_width=4", _pcie_width),
    ("hbm_temp=101", _hbm_temp),
    ("fabric=not_started", _fabric(1, 0, 0)),
    ("fabric=in_progress", _fabric(2, 0, 0)),
    ("fabric=failed", _fabric(3, 999, 0)),
    ("fabric=degraded", _fabric(3, 0, 1)),
]


@pytest.mark.parametrize(("kind", "check"), EFFECTS, ids=[e[0] for e in EFFECTS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fault_effect_and_end(kind: str, check: Check, seed: int) -> None:
    b, clock = make(2, seed=seed, faults=[f"h1/gpu1:{kind}@10s+10s"])
    ref, rclock = make(2, seed=seed)
    before = at(b, clock, 5)
    during = at(b, clock, 15)
    after = at(b, clock, 30)
    check(before[1], during[1], after[1])
    # GPU 0 sees nothing of it: same readings as a backend without faults
    assert [at(ref, rclock, t)[0] for t in (5, 15, 30)] == [before[0], during[0], after[0]]


def test_fault_for_another_host_has_no_effect() -> None:
    b, clock = make(2, faults=["other/gpu1:lost@0s", "other:temp=99@0s"])
    ref, rclock = make(2)
    assert run(b, clock, 60) == run(ref, rclock, 60)


def test_fault_without_gpu_hits_every_gpu() -> None:
    b, clock = make(4, faults=["*:mem_full@0s"])
    assert all(
        s.mem_used_bytes and s.mem_total_bytes and s.mem_used_bytes > 0.98 * s.mem_total_bytes
        for s in at(b, clock, 1)
    )


def test_persistence_off_changes_inventory() -> None:
    b, clock = make(2, faults=["gpu1:persistence_off@10s+10s"])
    clock.now = 1005.0
    assert [g.persistence_mode for g in b.inventory().gpus] == [True, True]
    clock.now = 1015.0
    assert [g.persistence_mode for g in b.inventory().gpus] == [True, False]


# ----------------------------------------------------------------------------- events


def _kinds(events: list) -> list[tuple]:
    return [(e.type, e.gpu_index, e.xid, e.value) for e in events]


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("gpu1:xid=79@10s", [("xid", 1, 79, None)], []),
        ("gpu1:ecc_dbe@10s+5s", [("ecc_dbe", 1, None, 1), ("xid", 1, 48, None)], []),
        (
            "gpu1:lost@10s+5s",
            [("xid", 1, 79, None), ("gpu_lost", 1, None, None)],
            [("gpu_recovered", 1, None, None)],
        ),
        ("gpu1:recovery_action=4@10s+5s", [("recovery_action", 1, None, 4)], []),
        ("gpu1:row_remap_fail@10s+5s", [("page_retirement", 1, None, 1), ("xid", 1, 64, None)], []),
        ("gpu1:remap_pending@10s+5s", [("page_retirement", 1, None, 0), ("xid", 1, 63, None)], []),
        ("gpu1:retired_pages=5@10s+5s", [("page_retirement", 1, None, 0)], []),
        ("gpu1:temp=99@10s+5s", [("throttle_start", 1, None, 0x48)], [("throttle_stop", 1, None, 0)]),
        ("gpu1:temp=80@10s+5s", [], []),
        (
            "gpu1:throttle=power_brake@10s+5s",
            [("throttle_start", 1, None, 0x88)],
            [("throttle_stop", 1, None, 0)],
        ),
        ("gpu1:throttle=sw_thermal@10s", [("throttle_start", 1, None, 0x20)], []),
        ("gpu1:power=900@10s+5s", [], []),
        ("xid=13@10s+5s", [("xid", 0, 13, None), ("xid", 1, 13, None)], []),
    ],
)
def test_fault_events(spec: str, start: list, end: list) -> None:
    b, clock = make(2, faults=[spec])
    wall0 = time.time()
    clock.now = 1009.99
    assert b.poll_events() == []
    clock.now = 1010.0
    got = b.poll_events()
    assert sorted(_kinds(got), key=str) == sorted(start, key=str)
    assert b.poll_events() == []  # each event once
    clock.now = 1016.0
    assert _kinds(b.poll_events()) == end
    uuids = {g.index: g.uuid for g in b.inventory().gpus}
    for e in got:
        assert e.source == "simulated"
        assert e.gpu_uuid == uuids[e.gpu_index]
        assert e.ts == pytest.approx(wall0 + 10.0, abs=1.0)
        assert e.message
        assert spec in e.message


def test_throttle_stop_reports_the_bits_still_set() -> None:
    b, clock = make(1, faults=["throttle=sw_power@10s+5s", "throttle=hw_slowdown@12s+10s"])
    clock.now = 1100.0
    got = [(e.type, e.value) for e in b.poll_events()]
    assert got == [
        ("throttle_start", SW_POWER_CAP),
        ("throttle_start", SW_POWER_CAP | HW_SLOWDOWN),
        ("throttle_stop", HW_SLOWDOWN),
        ("throttle_stop", 0),
    ]


def test_events_in_time_order_across_gpus() -> None:
    b, clock = make(4, faults=["gpu3:xid=31@3s", "gpu0:xid=43@1s", "gpu2:xid=13@2s"])
    clock.now = 1100.0
    assert [e.xid for e in b.poll_events()] == [43, 13, 31]


def test_wait_events_wakes_on_time() -> None:
    b = SimulatedBackend(2, host="h", faults=FaultSchedule.parse(["gpu1:xid=79@300ms", "gpu0:xid=13@600ms"]))
    t0 = time.monotonic()  # before open(), which starts the fault clock: nothing can come earlier
    b.open()
    first = b.wait_events(5.0)
    woke = time.monotonic() - t0
    assert [e.xid for e in first] == [79]
    # never before the fault's start; woken by it, not by the 5 s timeout (how soon after it is
    # a latency, measured by bench/alert_latency.py, not asserted on a loaded machine)
    assert 0.3 <= woke < 5.0
    second = b.wait_events(5.0)
    assert [e.xid for e in second] == [13]
    assert 0.6 <= time.monotonic() - t0 < woke + 5.0
    b.close()


def test_wait_events_times_out_empty() -> None:
    b = SimulatedBackend(1, host="h", faults=FaultSchedule.parse(["gpu0:xid=79@1h"]))
    b.open()
    t0 = time.monotonic()
    assert b.wait_events(0.1) == []
    assert time.monotonic() - t0 >= 0.1
    assert b.wait_events(0) == []
    b.close()


def test_close_wakes_waiter() -> None:
    b = SimulatedBackend(1, host="h")
    b.open()
    result: list = []
    th = threading.Thread(target=lambda: result.append(b.wait_events(30.0)))
    th.start()
    time.sleep(0.05)
    b.close()
    th.join(2.0)
    assert not th.is_alive()
    assert result == [[]]
    b.close()  # idempotent
    assert b.wait_events(1.0) == []


# ----------------------------------------------------------------------------- backend picker


@pytest.mark.parametrize(("kind", "gpus"), [("simulated", 4), ("auto", 4), ("nvml", 4)])
def test_make_backend_simulated(kind: str, gpus: int) -> None:
    faults = FaultSchedule.parse(["h9/gpu1:lost@0s", "other/gpu0:lost@0s"])
    b = make_backend(kind, simulate_gpus=gpus, host="h9", seed=5, faults=faults)
    assert isinstance(b, SimulatedBackend)
    assert isinstance(b, GpuBackend)
    b.open()
    assert [s.lost for s in b.sample()] == [False, True, False, False]
    assert b.inventory().gpus == SimulatedBackend(gpus, host="h9", seed=5).inventory().gpus
    b.close()


def test_make_backend_model() -> None:
    b = make_backend(
        "simulated", simulate_gpus=1, host="h", seed=0, faults=FaultSchedule(), model="NVIDIA A100 80GB"
    )
    assert b.inventory().gpus[0].architecture == "Ampere"


@pytest.mark.parametrize(
    ("kind", "gpus", "faults", "key", "message"),
    [
        ("cuda", 0, [], "agent.backend", "unknown backend 'cuda' (expected one of: auto, nvml, simulated)"),
        ("", 2, [], "agent.backend", "unknown backend ''"),
        ("simulated", 0, [], "simulate.gpus", "needs simulate.gpus > 0"),
        ("auto", -1, [], "simulate.gpus", "must not be negative"),
        ("nvml", 0, ["gpu0:xid=79@1s"], "fault", "simulated GPUs only"),
        ("auto", 0, ["host_down@1s"], "fault", "simulated GPUs only"),
    ],
)
def test_make_backend_errors(kind: str, gpus: int, faults: list[str], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_backend(kind, simulate_gpus=gpus, host="h", seed=0, faults=FaultSchedule.parse(faults))
    assert info.value.key == key
    assert message in str(info.value)


@pytest.mark.parametrize("kind", ["nvml", "auto"])
def test_make_backend_nvml(kind: str) -> None:
    nvml = pytest.importorskip("agent.gpu.nvml")
    b = make_backend(
        kind,
        simulate_gpus=0,
        host="h",
        seed=0,
        faults=FaultSchedule(),
        proc_root="/tmp/proc",
        processes=False,
    )
    assert type(b) is nvml.NvmlBackend
    assert b.name == "nvml"


def test_positional_construction_matches_field_order() -> None:
    from agent.gpu import simulated

    names = tuple(f.name for f in fields(GpuSample))
    assert simulated._POSITIONAL, f"GpuSample fields moved: update _ORDER ({names})"
    b, clock = make(2, faults=["gpu1:throttle=sw_power@0s", "gpu0:ecc_sbe=60@0s"])
    for s in at(b, clock, 30):
        values = [getattr(s, n) for n in simulated._ORDER]
        assert simulated._keyword_sample(values) == s


def test_nvml_init_fail_fails_open_until_the_window_ends() -> None:
    """``nvml_init_fail`` makes ``open`` fail as NVML would (NVML's text as detail); the clock
    keeps running from the first open, so a retry after the window opens, and events that were
    due during the failure are not delivered late."""
    from shared.errors import NvmlUnavailableError

    clock = FakeClock()
    faults = FaultSchedule.parse(["nvml_init_fail@0s+30s", "gpu1:xid=79@10s", "gpu1:xid=13@40s"])
    b = SimulatedBackend(2, host="h1", faults=faults, clock=clock)
    with pytest.raises(NvmlUnavailableError) as info:
        b.open()
    assert info.value.detail == "Driver Not Loaded"
    clock.now = 1029.0
    with pytest.raises(NvmlUnavailableError):
        b.open()
    clock.now = 1030.0
    b.open()
    assert b.elapsed() == 30.0
    assert b.poll_events() == []  # the XID 79 at 10 s happened while NVML was down
    clock.now = 1040.0
    assert [(e.type, e.xid) for e in b.poll_events()] == [("xid", 13)]
    assert len(b.sample()) == 2
