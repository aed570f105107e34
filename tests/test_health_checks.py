"""Every GPU and host check: below, at and above its threshold, unsupported (None) values,
counter resets and lost GPUs. The pure health engine, no servers needed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from collector.health import HealthEngine, HealthState, Observation, health_config_from
from collector.health.config import GpuThresholds, HealthConfig
from collector.health.gpu import pcie_expected_per_min
from shared.frames import CheckResult, DiskUsage, GpuSample, NicCounters, SampleFrame, SystemSample

T0 = 1_700_000_000.0


def frame(
    ts: float, gpu: dict[str, Any] | None = None, system: SystemSample | None = None, **kw: Any
) -> SampleFrame:
    gpus = (GpuSample(index=0, uuid="GPU-0", **gpu),) if gpu is not None else ()
    return SampleFrame(
        host="node-1",
        provider="acme",
        boot_id="b1",
        seq=int(ts),
        ts=ts,
        interval_s=5.0,
        gpus=gpus,
        system=system,
        **kw,
    )


def judge_gpu(
    check: str,
    cur: dict[str, Any],
    prev: dict[str, Any] | None = None,
    dt: float = 60.0,
    cfg: HealthConfig | None = None,
) -> tuple[str | None, list[Observation]]:
    """Status of ``check`` after ``cur`` (with ``prev`` one sample earlier), and its observations."""
    engine, state = HealthEngine(cfg), HealthState()
    out: list[Observation] = []
    if prev is not None:
        state, obs = engine.observe(state, frame(T0, prev), T0)
        out += obs
    state, obs = engine.observe(state, frame(T0 + dt, cur), T0 + dt)
    out += obs
    checks = state.hosts["node-1"].gpus[0].checks
    found = [cs for cs in checks.values() if cs.check == check]
    return (found[0].status if found else None), [o for o in out if o.check == check]


PCIE: dict[str, Any] = {
    "pcie_link_gen": 5,
    "pcie_link_gen_max": 5,
    "pcie_link_width": 16,
    "pcie_link_width_max": 16,
    "util_gpu_pct": 90.0,
}
SM: dict[str, Any] = {
    "clock_sm_app_mhz": 1980,
    "clock_sm_mhz": 1980,
    "util_gpu_pct": 90.0,
    "clock_event_reasons": 0,
}

GPU_TABLE: list[tuple[str, str, dict[str, Any], dict[str, Any] | None, str | None]] = [
    # temperature against configured thresholds (85 / 92)
    ("temp-below", "gpu.temperature", {"temp_c": 84.9}, None, "healthy"),
    ("temp-at-warning", "gpu.temperature", {"temp_c": 85.0}, None, "warning"),
    ("temp-below-critical", "gpu.temperature", {"temp_c": 91.9}, None, "warning"),
    ("temp-at-critical", "gpu.temperature", {"temp_c": 92.0}, None, "critical"),
    ("temp-above-critical", "gpu.temperature", {"temp_c": 105.0}, None, "critical"),
    ("temp-none", "gpu.temperature", {"temp_c": None}, None, None),
    # ... and NVML's slowdown / shutdown thresholds (margins 5 C)
    ("temp-near-slowdown", "gpu.temperature", {"temp_c": 80.0, "temp_slowdown_c": 84.0}, None, "warning"),
    (
        "temp-below-slowdown-margin",
        "gpu.temperature",
        {"temp_c": 78.9, "temp_slowdown_c": 84.0},
        None,
        "healthy",
    ),
    ("temp-at-slowdown", "gpu.temperature", {"temp_c": 84.0, "temp_slowdown_c": 84.0}, None, "critical"),
    ("temp-near-shutdown", "gpu.temperature", {"temp_c": 85.0, "temp_shutdown_c": 90.0}, None, "critical"),
    ("temp-below-shutdown", "gpu.temperature", {"temp_c": 84.0, "temp_shutdown_c": 90.0}, None, "healthy"),
    # ECC double-bit
    ("dbe-zero", "gpu.ecc_dbe", {"ecc_dbe_volatile": 0}, None, "healthy"),
    ("dbe-one", "gpu.ecc_dbe", {"ecc_dbe_volatile": 1}, None, "critical"),
    ("dbe-none", "gpu.ecc_dbe", {"ecc_dbe_volatile": None}, None, None),
    # ECC single-bit rate (10/min)
    ("sbe-at", "gpu.ecc_sbe_rate", {"ecc_sbe_volatile": 110}, {"ecc_sbe_volatile": 100}, "healthy"),
    ("sbe-above", "gpu.ecc_sbe_rate", {"ecc_sbe_volatile": 111}, {"ecc_sbe_volatile": 100}, "warning"),
    ("sbe-reset-low", "gpu.ecc_sbe_rate", {"ecc_sbe_volatile": 5}, {"ecc_sbe_volatile": 1000}, "healthy"),
    ("sbe-reset-high", "gpu.ecc_sbe_rate", {"ecc_sbe_volatile": 20}, {"ecc_sbe_volatile": 1000}, "warning"),
    ("sbe-first-sample", "gpu.ecc_sbe_rate", {"ecc_sbe_volatile": 500}, None, None),
    ("sbe-none", "gpu.ecc_sbe_rate", {"ecc_sbe_volatile": None}, {"ecc_sbe_volatile": None}, None),
    ("sbe-prev-none", "gpu.ecc_sbe_rate", {"ecc_sbe_volatile": 50}, {"ecc_sbe_volatile": None}, None),
    # retired pages (>= 63 critical, pending warning)
    ("retired-62", "gpu.retired_pages", {"retired_pages_sbe": 62, "retired_pages_dbe": 0}, None, "healthy"),
    ("retired-63", "gpu.retired_pages", {"retired_pages_sbe": 63, "retired_pages_dbe": 0}, None, "critical"),
    (
        "retired-sum",
        "gpu.retired_pages",
        {"retired_pages_sbe": 40, "retired_pages_dbe": 23},
        None,
        "critical",
    ),
    ("retired-dbe-only", "gpu.retired_pages", {"retired_pages_dbe": 63}, None, "critical"),
    (
        "retired-pending",
        "gpu.retired_pages",
        {"retired_pages_sbe": 1, "retired_pages_pending": True},
        None,
        "warning",
    ),
    ("retired-none", "gpu.retired_pages", {}, None, None),
    # row remapping
    ("remap-ok", "gpu.row_remap", {"remap_failure": False, "remap_pending": False}, None, "healthy"),
    ("remap-failure", "gpu.row_remap", {"remap_failure": True, "remap_pending": True}, None, "critical"),
    ("remap-pending", "gpu.row_remap", {"remap_failure": False, "remap_pending": True}, None, "warning"),
    ("remap-unc-511", "gpu.row_remap", {"remapped_rows_uncorrectable": 511}, None, "healthy"),
    ("remap-unc-512", "gpu.row_remap", {"remapped_rows_uncorrectable": 512}, None, "warning"),
    ("remap-none", "gpu.row_remap", {}, None, None),
    # clock-event reasons
    ("clocks-none-active", "gpu.clock_events", {"clock_event_reasons": 0}, None, "healthy"),
    ("clocks-idle", "gpu.clock_events", {"clock_event_reasons": 0x1}, None, "healthy"),
    ("clocks-sw-power-cap", "gpu.clock_events", {"clock_event_reasons": 0x4}, None, "healthy"),
    ("clocks-hw-slowdown", "gpu.clock_events", {"clock_event_reasons": 0x8}, None, "warning"),
    ("clocks-hw-thermal", "gpu.clock_events", {"clock_event_reasons": 0x40}, None, "warning"),
    ("clocks-power-brake", "gpu.clock_events", {"clock_event_reasons": 0x80}, None, "warning"),
    ("clocks-unsupported", "gpu.clock_events", {"clock_event_reasons": None}, None, None),
    (
        "clocks-sustained",
        "gpu.clock_events",
        {"clock_event_reasons": 0x8},
        {"clock_event_reasons": 0x8},
        "critical",
    ),
    (
        "clocks-thermal-violation",
        "gpu.clock_events",
        {"clock_event_reasons": 0, "throttle_thermal_ns": 2_000_000_000},
        {"clock_event_reasons": 0, "throttle_thermal_ns": 1_000_000_000},
        "warning",
    ),
    (
        "clocks-no-violation",
        "gpu.clock_events",
        {"clock_event_reasons": 0, "throttle_thermal_ns": 10},
        {"clock_event_reasons": 0, "throttle_thermal_ns": 10},
        "healthy",
    ),
    # PCIe replay rate vs expected for the link (Gen4 x16: 16/min, Gen5 x16: 31/min, Gen3 x8: 4/min)
    (
        "pcie-g4x16-at",
        "gpu.pcie_replay",
        {"pcie_replay_count": 16, "pcie_link_gen": 4, "pcie_link_width": 16},
        {"pcie_replay_count": 0},
        "healthy",
    ),
    (
        "pcie-g4x16-above",
        "gpu.pcie_replay",
        {"pcie_replay_count": 17, "pcie_link_gen": 4, "pcie_link_width": 16},
        {"pcie_replay_count": 0},
        "warning",
    ),
    (
        "pcie-g5x16-at",
        "gpu.pcie_replay",
        {"pcie_replay_count": 31, "pcie_link_gen": 5, "pcie_link_width": 16},
        {"pcie_replay_count": 0},
        "healthy",
    ),
    (
        "pcie-g5x16-above",
        "gpu.pcie_replay",
        {"pcie_replay_count": 32, "pcie_link_gen": 5, "pcie_link_width": 16},
        {"pcie_replay_count": 0},
        "warning",
    ),
    (
        "pcie-g3x8-above",
        "gpu.pcie_replay",
        {"pcie_replay_count": 5, "pcie_link_gen": 3, "pcie_link_width": 8},
        {"pcie_replay_count": 0},
        "warning",
    ),
    (
        "pcie-reset",
        "gpu.pcie_replay",
        {"pcie_replay_count": 10, "pcie_link_gen": 4, "pcie_link_width": 16},
        {"pcie_replay_count": 100_000},
        "healthy",
    ),
    (
        "pcie-unknown-link",
        "gpu.pcie_replay",
        {"pcie_replay_count": 900, "pcie_link_gen": None, "pcie_link_width": 16},
        {"pcie_replay_count": 0},
        None,
    ),
    (
        "pcie-first-sample",
        "gpu.pcie_replay",
        {"pcie_replay_count": 900, "pcie_link_gen": 4, "pcie_link_width": 16},
        None,
        None,
    ),
    # NVLink
    ("nvlink-all-up", "gpu.nvlink", {"nvlink_links_total": 18, "nvlink_links_up": 18}, None, "healthy"),
    ("nvlink-link-down", "gpu.nvlink", {"nvlink_links_total": 18, "nvlink_links_up": 17}, None, "critical"),
    (
        "nvlink-crc-100s",
        "gpu.nvlink",
        {"nvlink_links_total": 18, "nvlink_links_up": 18, "nvlink_crc_errors": 6000},
        {"nvlink_crc_errors": 0},
        "critical",
    ),
    (
        "nvlink-crc-below",
        "gpu.nvlink",
        {"nvlink_links_total": 18, "nvlink_links_up": 18, "nvlink_crc_errors": 5999},
        {"nvlink_crc_errors": 0},
        "warning",
    ),
    (
        "nvlink-replay",
        "gpu.nvlink",
        {"nvlink_links_total": 18, "nvlink_links_up": 18, "nvlink_replay_errors": 4},
        {"nvlink_replay_errors": 3},
        "warning",
    ),
    (
        "nvlink-steady",
        "gpu.nvlink",
        {"nvlink_links_total": 18, "nvlink_links_up": 18, "nvlink_crc_errors": 7},
        {"nvlink_crc_errors": 7},
        "healthy",
    ),
    ("nvlink-none", "gpu.nvlink", {"nvlink_links_total": 0}, None, None),
    ("nvlink-unsupported", "gpu.nvlink", {"nvlink_links_total": None}, None, None),
    # power over limit (2% margin)
    ("power-at-limit", "gpu.power", {"power_w": 700.0, "power_limit_w": 700.0}, None, "healthy"),
    ("power-at-margin", "gpu.power", {"power_w": 714.0, "power_limit_w": 700.0}, None, "healthy"),
    ("power-over", "gpu.power", {"power_w": 715.0, "power_limit_w": 700.0}, None, "warning"),
    ("power-no-limit", "gpu.power", {"power_w": 715.0, "power_limit_w": None}, None, None),
    # memory nearly full (95%)
    ("mem-below", "gpu.memory_full", {"mem_used_bytes": 949, "mem_total_bytes": 1000}, None, "healthy"),
    ("mem-at", "gpu.memory_full", {"mem_used_bytes": 950, "mem_total_bytes": 1000}, None, "warning"),
    ("mem-none", "gpu.memory_full", {"mem_used_bytes": None, "mem_total_bytes": 1000}, None, None),
    # recovery action requested by the driver
    ("recovery-none", "gpu.recovery_action", {"recovery_action": 0}, None, "healthy"),
    ("recovery-gpu-reset", "gpu.recovery_action", {"recovery_action": 1}, None, "critical"),
    ("recovery-node-reboot", "gpu.recovery_action", {"recovery_action": 2}, None, "critical"),
    ("recovery-drain-p2p", "gpu.recovery_action", {"recovery_action": 3}, None, "warning"),
    ("recovery-drain-reset", "gpu.recovery_action", {"recovery_action": 4}, None, "critical"),
    ("recovery-unsupported", "gpu.recovery_action", {"recovery_action": None}, None, None),
    # persistence mode
    ("persistence-on", "gpu.persistence", {"persistence_mode": True}, None, "healthy"),
    ("persistence-off", "gpu.persistence", {"persistence_mode": False}, None, "info"),
    ("persistence-unknown", "gpu.persistence", {"persistence_mode": None}, None, None),
    # lost
    ("lost", "gpu.lost", {"lost": True}, None, "critical"),
    ("not-lost", "gpu.lost", {}, None, "healthy"),
    # PCIe link against its maximum: width at any time, generation only while busy (50 %)
    ("pcie-link-full", "gpu.pcie_link", {**PCIE, "util_gpu_pct": 90.0}, None, "healthy"),
    ("pcie-link-narrow", "gpu.pcie_link", {**PCIE, "pcie_link_width": 8}, None, "warning"),
    (
        "pcie-link-narrow-idle",
        "gpu.pcie_link",
        {**PCIE, "pcie_link_width": 8, "util_gpu_pct": 0.0},
        None,
        "warning",
    ),
    ("pcie-gen-low-busy", "gpu.pcie_link", {**PCIE, "pcie_link_gen": 3}, None, "warning"),
    (
        "pcie-gen-low-at-busy",
        "gpu.pcie_link",
        {**PCIE, "pcie_link_gen": 3, "util_gpu_pct": 50.0},
        None,
        "warning",
    ),
    (
        "pcie-gen-low-idle",
        "gpu.pcie_link",
        {**PCIE, "pcie_link_gen": 1, "util_gpu_pct": 49.9},
        None,
        "healthy",
    ),
    (
        "pcie-gen-low-util-unknown",
        "gpu.pcie_link",
        {**PCIE, "pcie_link_gen": 1, "util_gpu_pct": None},
        None,
        "healthy",
    ),
    (
        "pcie-link-no-max",
        "gpu.pcie_link",
        {**PCIE, "pcie_link_width_max": None, "pcie_link_gen_max": None},
        None,
        None,
    ),
    ("pcie-link-unknown", "gpu.pcie_link", {"pcie_link_gen": None, "pcie_link_width": None}, None, None),
    # HBM temperature against NVML's memory limit (margin 5 C)
    ("hbm-below", "gpu.hbm_temp", {"mem_temp_c": 89.9, "temp_mem_max_c": 95.0}, None, "healthy"),
    ("hbm-near", "gpu.hbm_temp", {"mem_temp_c": 90.0, "temp_mem_max_c": 95.0}, None, "warning"),
    ("hbm-at-limit", "gpu.hbm_temp", {"mem_temp_c": 95.0, "temp_mem_max_c": 95.0}, None, "critical"),
    ("hbm-no-limit", "gpu.hbm_temp", {"mem_temp_c": 99.0, "temp_mem_max_c": None}, None, None),
    ("hbm-no-reading", "gpu.hbm_temp", {"mem_temp_c": None, "temp_mem_max_c": 95.0}, None, None),
    # lifetime memory-error trends (a rise warns for memory_trend_window)
    ("trend-flat", "gpu.memory_trend", {"ecc_dbe_aggregate": 2}, {"ecc_dbe_aggregate": 2}, "healthy"),
    ("trend-dbe-grew", "gpu.memory_trend", {"ecc_dbe_aggregate": 3}, {"ecc_dbe_aggregate": 2}, "warning"),
    ("trend-pages-grew", "gpu.memory_trend", {"retired_pages_dbe": 2}, {"retired_pages_dbe": 1}, "warning"),
    ("trend-backwards", "gpu.memory_trend", {"ecc_dbe_aggregate": 0}, {"ecc_dbe_aggregate": 2}, "healthy"),
    ("trend-unknown", "gpu.memory_trend", {"ecc_dbe_aggregate": None}, {"ecc_dbe_aggregate": None}, None),
    # SM clock under load, without a clock-event reason, against the application clock (50 %)
    ("sm-clock-normal", "gpu.sm_clock", {**SM, "clock_sm_mhz": 1980}, None, "healthy"),
    ("sm-clock-low", "gpu.sm_clock", {**SM, "clock_sm_mhz": 989}, None, "warning"),
    ("sm-clock-half", "gpu.sm_clock", {**SM, "clock_sm_mhz": 990}, None, "healthy"),
    (
        "sm-clock-low-throttled",
        "gpu.sm_clock",
        {**SM, "clock_sm_mhz": 600, "clock_event_reasons": 0x4},
        None,
        "healthy",
    ),
    ("sm-clock-low-idle", "gpu.sm_clock", {**SM, "clock_sm_mhz": 345, "util_gpu_pct": 0.0}, None, "healthy"),
    ("sm-clock-no-app", "gpu.sm_clock", {**SM, "clock_sm_app_mhz": None}, None, None),
    # fans, where the board has them
    ("fan-turning", "gpu.fan", {"fan_pct": 35.0, "temp_c": 70.0}, None, "healthy"),
    ("fan-stopped-hot", "gpu.fan", {"fan_pct": 0.0, "temp_c": 60.0}, None, "warning"),
    ("fan-stopped-cool", "gpu.fan", {"fan_pct": 0.0, "temp_c": 45.0}, None, "healthy"),
    ("fan-none", "gpu.fan", {"fan_pct": None, "temp_c": 80.0}, None, None),
    # NVSwitch fabric registration (NVML GPU fabric info)
    ("fabric-completed", "gpu.fabric", {"fabric_state": 3, "fabric_status": 0}, None, "healthy"),
    ("fabric-not-started", "gpu.fabric", {"fabric_state": 1, "fabric_status": 0}, None, "critical"),
    ("fabric-in-progress", "gpu.fabric", {"fabric_state": 2}, None, "warning"),
    ("fabric-failed", "gpu.fabric", {"fabric_state": 3, "fabric_status": 999}, None, "critical"),
    (
        "fabric-degraded-bw",
        "gpu.fabric",
        {"fabric_state": 3, "fabric_status": 0, "fabric_health_mask": 1},
        None,
        "warning",
    ),
    (
        "fabric-mask-all-false",
        "gpu.fabric",
        {"fabric_state": 3, "fabric_status": 0, "fabric_health_mask": 0xAA},
        None,
        "healthy",
    ),
    (
        "fabric-route-unhealthy",
        "gpu.fabric",
        {"fabric_state": 3, "fabric_status": 0, "fabric_health_mask": 0x10},
        None,
        "warning",
    ),
    ("fabric-not-supported", "gpu.fabric", {"fabric_state": 0}, None, None),
    ("fabric-absent", "gpu.fabric", {"fabric_state": None}, None, None),
]


@pytest.mark.parametrize(
    ("check", "cur", "prev", "expected"), [r[1:] for r in GPU_TABLE], ids=[r[0] for r in GPU_TABLE]
)
def test_gpu_check(
    check: str, cur: dict[str, Any], prev: dict[str, Any] | None, expected: str | None
) -> None:
    dt = 300.0 if check == "gpu.clock_events" and prev and prev.get("clock_event_reasons") else 60.0
    status, obs = judge_gpu(check, cur, prev, dt)
    assert status == expected
    if expected is None:
        assert obs == []  # not supported: never evaluated, never an alarm
        return
    last = obs[-1]
    assert last.status == expected
    assert last.labels == {"provider": "acme", "host": "node-1", "gpu": "0", "uuid": "GPU-0"}
    assert last.key.startswith(check + "{")
    if expected not in ("healthy",):
        assert last.summary
        assert last.advice


def test_clock_events_not_yet_sustained() -> None:
    status, _ = judge_gpu(
        "gpu.clock_events", {"clock_event_reasons": 0x8}, {"clock_event_reasons": 0x8}, dt=299.0
    )
    assert status == "warning"


def test_lost_gpu_skips_other_checks_and_keeps_stale_values() -> None:
    engine, state = HealthEngine(), HealthState()
    state, _ = engine.observe(state, frame(T0, {"temp_c": 95.0}), T0)
    state, obs = engine.observe(state, frame(T0 + 5, {"lost": True}), T0 + 5)
    assert [(o.check, o.status, o.immediate) for o in obs] == [("gpu.lost", "critical", True)]
    gs = state.hosts["node-1"].gpus[0]
    assert gs.lost
    assert gs.last is not None
    assert gs.last.temp_c == 95.0
    state, obs = engine.observe(state, frame(T0 + 10, {"temp_c": 50.0}), T0 + 10)
    assert ("gpu.lost", "healthy") in [(o.check, o.status) for o in obs]
    assert not state.hosts["node-1"].gpus[0].lost


def test_custom_thresholds() -> None:
    cfg = HealthConfig(gpu=GpuThresholds(temp_warning_c=70.0, temp_critical_c=75.0))
    assert judge_gpu("gpu.temperature", {"temp_c": 72.0}, cfg=cfg)[0] == "warning"
    assert judge_gpu("gpu.temperature", {"temp_c": 75.0}, cfg=cfg)[0] == "critical"


@pytest.mark.parametrize(
    ("gen", "width", "expected"),
    [
        (3, 16, 8),
        (4, 16, 16),
        (5, 16, 31),
        (6, 16, 62),
        (4, 8, 8),
        (5, 1, 2),
        (None, 16, None),
        (4, 0, None),
        (9, 16, None),
    ],
)
def test_pcie_expected_rate(gen: int | None, width: int, expected: float | None) -> None:
    assert pcie_expected_per_min(gen, width) == expected


# ----------------------------------------------------------------------------- host checks

GIB = 1 << 30


def judge_host(check: str, sys_cur: SystemSample, sys_prev: SystemSample | None = None) -> dict[str, str]:
    """Statuses of every ``check`` instance (by its local id) after the samples."""
    engine, state = HealthEngine(), HealthState()
    if sys_prev is not None:
        state, _ = engine.observe(state, frame(T0, system=sys_prev), T0)
    state, _ = engine.observe(state, frame(T0 + 60, system=sys_cur), T0 + 60)
    return {k: cs.status for k, cs in state.hosts["node-1"].checks.items() if cs.check == check}


def nic(errors: int = 0, drops: int = 0, up: bool | None = True) -> NicCounters:
    return NicCounters(name="eth0", up=up, rx_errors=errors, rx_drops=drops)


HOST_TABLE: list[tuple[str, str, SystemSample, SystemSample | None, dict[str, str]]] = [
    ("cpu-below", "host.cpu", SystemSample(cpu_pct=94.9), None, {"host.cpu": "healthy"}),
    ("cpu-at", "host.cpu", SystemSample(cpu_pct=95.0), None, {"host.cpu": "warning"}),
    ("cpu-none", "host.cpu", SystemSample(cpu_pct=None), None, {}),
    (
        "mem-ok",
        "host.memory",
        SystemSample(mem_total_bytes=100 * GIB, mem_available_bytes=11 * GIB),
        None,
        {"host.memory": "healthy"},
    ),
    (
        "mem-warn",
        "host.memory",
        SystemSample(mem_total_bytes=100 * GIB, mem_available_bytes=10 * GIB),
        None,
        {"host.memory": "warning"},
    ),
    (
        "mem-crit",
        "host.memory",
        SystemSample(mem_total_bytes=100 * GIB, mem_available_bytes=3 * GIB),
        None,
        {"host.memory": "critical"},
    ),
    ("swap-none", "host.swap", SystemSample(swap_total_bytes=0, swap_used_bytes=0), None, {}),
    (
        "swap-warn",
        "host.swap",
        SystemSample(swap_total_bytes=100, swap_used_bytes=50),
        None,
        {"host.swap": "warning"},
    ),
    (
        "swap-crit",
        "host.swap",
        SystemSample(swap_total_bytes=100, swap_used_bytes=95),
        None,
        {"host.swap": "critical"},
    ),
    (
        "disk-per-mount",
        "host.disk",
        SystemSample(
            disks=(
                DiskUsage("/", 100, 84, 16),
                DiskUsage("/data", 100, 85, 15),
                DiskUsage("/scratch", 100, 96, 4),
            )
        ),
        None,
        {"host.disk:/": "healthy", "host.disk:/data": "warning", "host.disk:/scratch": "critical"},
    ),
    ("disk-zero-size", "host.disk", SystemSample(disks=(DiskUsage("/proc", 0, 0, 0),)), None, {}),
    ("load-ok", "host.load", SystemSample(load_5=31.9, cpu_count=16), None, {"host.load": "healthy"}),
    ("load-warn", "host.load", SystemSample(load_5=32.0, cpu_count=16), None, {"host.load": "warning"}),
    ("load-crit", "host.load", SystemSample(load_5=64.0, cpu_count=16), None, {"host.load": "critical"}),
    ("load-no-cpus", "host.load", SystemSample(load_5=64.0, cpu_count=None), None, {}),
    ("fds-warn", "host.fds", SystemSample(fds_open=800, fds_max=1000), None, {"host.fds": "warning"}),
    ("fds-crit", "host.fds", SystemSample(fds_open=950, fds_max=1000), None, {"host.fds": "critical"}),
    ("fds-ok", "host.fds", SystemSample(fds_open=10, fds_max=1000), None, {"host.fds": "healthy"}),
    ("nic-down", "host.nic", SystemSample(nics=(nic(up=False),)), None, {"host.nic:eth0": "warning"}),
    (
        "nic-errors-at",
        "host.nic",
        SystemSample(nics=(nic(errors=110),)),
        SystemSample(nics=(nic(errors=100),)),
        {"host.nic:eth0": "healthy"},
    ),
    (
        "nic-errors-above",
        "host.nic",
        SystemSample(nics=(nic(errors=111),)),
        SystemSample(nics=(nic(errors=100),)),
        {"host.nic:eth0": "warning"},
    ),
    (
        "nic-drops-above",
        "host.nic",
        SystemSample(nics=(nic(drops=1001),)),
        SystemSample(nics=(nic(drops=0),)),
        {"host.nic:eth0": "warning"},
    ),
    (
        "nic-counter-reset",
        "host.nic",
        SystemSample(nics=(nic(errors=3),)),
        SystemSample(nics=(nic(errors=5000),)),
        {"host.nic:eth0": "healthy"},
    ),
]


@pytest.mark.parametrize(
    ("check", "cur", "prev", "expected"), [r[1:] for r in HOST_TABLE], ids=[r[0] for r in HOST_TABLE]
)
def test_host_check(
    check: str, cur: SystemSample, prev: SystemSample | None, expected: dict[str, str]
) -> None:
    assert judge_host(check, cur, prev) == expected


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (CheckResult(id="tcp:s1:22", kind="tcp", target="s1:22", ok=True, latency_ms=5.0), "healthy"),
        (CheckResult(id="tcp:s1:22", kind="tcp", target="s1:22", ok=True, latency_ms=100.0), "warning"),
        (CheckResult(id="tcp:s1:22", kind="tcp", target="s1:22", ok=True, latency_ms=1000.0), "critical"),
        (CheckResult(id="tcp:s1:22", kind="tcp", target="s1:22", ok=True, latency_ms=None), "healthy"),
        (CheckResult(id="tcp:s1:22", kind="tcp", target="s1:22", ok=False, error="refused"), "critical"),
    ],
)
def test_network_target(result: CheckResult, expected: str) -> None:
    engine, state = HealthEngine(), HealthState()
    state, obs = engine.observe(state, frame(T0, checks=(result,)), T0)
    (o,) = [o for o in obs if o.check == "net.target"]
    assert o.status == expected
    assert o.labels["target"] == "tcp:s1:22"
    if expected != "healthy":
        assert "s1:22" in o.summary


NATS_FAILED = CheckResult(id="nats_rtt", kind="nats_rtt", target="nats", ok=False, error="timeout")
NATS_OK = CheckResult(id="nats_rtt", kind="nats_rtt", target="nats", ok=True, latency_ms=0.5)


def nats_status(engine: HealthEngine, state: HealthState, ts: float, c: CheckResult) -> str | None:
    state, obs = engine.observe(state, frame(ts, checks=(c,)), ts)
    found = [o.status for o in obs if o.check == "net.target"]
    return found[-1] if found else None


def test_a_failed_nats_round_trip_alone_is_judged_only_when_sustained() -> None:
    """The frame that reports a failed NATS round trip came over NATS: not judged until it has
    failed in every frame for ``nats_sustained`` (1 min); a success clears the streak."""
    engine, state = HealthEngine(), HealthState()
    assert nats_status(engine, state, T0, NATS_FAILED) is None
    assert nats_status(engine, state, T0 + 30, NATS_FAILED) is None
    assert nats_status(engine, state, T0 + 35, NATS_OK) == "healthy"
    assert nats_status(engine, state, T0 + 40, NATS_FAILED) is None
    assert nats_status(engine, state, T0 + 99, NATS_FAILED) is None
    assert nats_status(engine, state, T0 + 100, NATS_FAILED) == "critical"
    (cs,) = [cs for cs in state.hosts["node-1"].checks.values() if cs.check == "net.target"]
    assert "NATS round trip failing for 60 s" in cs.summary
    assert nats_status(engine, state, T0 + 105, NATS_OK) == "healthy"
    # a TCP target is judged on the first failure
    tcp = CheckResult(id="tcp:s1:22", kind="tcp", target="s1:22", ok=False, error="refused")
    assert nats_status(engine, state, T0 + 110, tcp) == "critical"
    # configurable; 0 judges every failure
    cfg = health_config_from({"health": {"network": {"nats_sustained": "0s"}}}, env={})
    assert nats_status(HealthEngine(cfg), HealthState(), T0, NATS_FAILED) == "critical"


def test_the_nats_failure_streak_survives_a_state_round_trip() -> None:
    from collector.health.codec import state_from_dict
    from tests.support.health_dump import state_to_dict

    engine, state = HealthEngine(), HealthState()
    assert nats_status(engine, state, T0, NATS_FAILED) is None
    state = state_from_dict(json.loads(json.dumps(state_to_dict(state))))
    assert state.hosts["node-1"].nats_failed_since == T0
    assert nats_status(engine, state, T0 + 60, NATS_FAILED) == "critical"


def test_memory_trend_warns_for_its_window_then_clears() -> None:
    engine, state = HealthEngine(HealthConfig(gpu=GpuThresholds(memory_trend_window=3600.0))), HealthState()
    statuses = []
    for i, dbe in enumerate([1, 2, 2, 2]):  # grows once, between the first two samples
        t = T0 + (0, 60, 3000, 3700)[i]
        state, _ = engine.observe(state, frame(t, {"ecc_dbe_aggregate": dbe}), t)
        statuses.append(state.hosts["node-1"].gpus[0].checks["gpu.memory_trend"].status)
    # a volatile reset (GPU reset) does not clear it: the lifetime counter carries the trend
    assert statuses == ["healthy", "warning", "warning", "healthy"]


def test_nvlink_problems_name_their_links() -> None:
    total = {"nvlink_links_total": 18, "nvlink_crc_errors": 0, "nvlink_replay_errors": 0}
    links = (0,) * 18
    _, obs = judge_gpu(
        "gpu.nvlink",
        {**total, "nvlink_links_up": 16, "nvlink_down_links": (4, 11)},
        {**total, "nvlink_links_up": 18},
    )
    assert obs[-1].status == "critical"
    assert "2 of 18 links down (link 4, 11)" in obs[-1].summary
    crc = (0, 0, 0, 7, *links[4:])
    _, obs = judge_gpu(
        "gpu.nvlink",
        {**total, "nvlink_links_up": 18, "nvlink_crc_errors": 7, "nvlink_crc_by_link": crc},
        {**total, "nvlink_links_up": 18, "nvlink_crc_by_link": links},
    )
    assert obs[-1].status == "warning"
    assert "link 3: CRC +7" in obs[-1].summary
    # a driver with per-link counters only: their sum is the rate
    _, obs = judge_gpu(
        "gpu.nvlink",
        {"nvlink_links_total": 18, "nvlink_links_up": 18, "nvlink_replay_by_link": (2, *links[1:])},
        {"nvlink_links_total": 18, "nvlink_links_up": 18, "nvlink_replay_by_link": links},
    )
    assert obs[-1].status == "warning"
    assert "replay 2" in obs[-1].summary
    assert "link 0: replay +2" in obs[-1].summary
