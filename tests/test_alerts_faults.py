"""Both engines together, one row per fault kind of the fault grammar (agent/faults.py): a host
samples every 5 s, the fault starts at 60 s and clears at 300 s. Each fault gives exactly
the expected alert (rule, severity, subject, advice), notified once when it fires and once
when it resolves, and nothing else is notified."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agent.faults import FaultSchedule
from agent.gpu.simulated import XID74_DETAIL
from agent.system import SimulatedSystem
from collector.alerts import AlertEngine, AlertState, Notification, alert_config_from
from collector.health import HealthEngine, HealthState
from collector.health.config import GpuThresholds, HealthConfig, NodeThresholds
from shared.frames import (
    DiskUsage,
    EventFrame,
    GpuInfo,
    GpuSample,
    InventoryFrame,
    SampleFrame,
    SystemSample,
    replace,
)
from tests.support.fault_table import EXPECTED, NODE_EXPECTED
from tests.support.frame_fixtures import judged_gpu, xid_frame

T0 = 1_700_000_000.0
START, CLEAR, END, STEP = 60, 300, 900, 5
GIB = 1 << 30


def base_gpu(i: int, t: int) -> GpuSample:
    return judged_gpu(i, f"GPU-{i}")


def base_system() -> SystemSample:
    return SystemSample(
        cpu_pct=20.0,
        cpu_count=64,
        load_5=4.0,
        mem_total_bytes=512 * GIB,
        mem_available_bytes=400 * GIB,
        fds_open=1000,
        fds_max=1 << 20,
        disks=(DiskUsage("/", 1000, 300, 700),),
    )


RATE_RULES = ("gpu.ecc_sbe_rate", "gpu.pcie_replay", "gpu.nvlink")
GpuFault = Callable[[GpuSample, int], GpuSample]


def counter(per_min: float, t: int) -> int:
    return int(per_min * (min(t, CLEAR) - START) / 60) if t >= START else 0


GPU_FAULTS: dict[str, GpuFault] = {
    "temp=95": lambda g, t: replace(g, temp_c=95.0),
    "ecc_dbe": lambda g, t: replace(g, ecc_dbe_volatile=1),
    "ecc_sbe=120": lambda g, t: replace(g, ecc_sbe_volatile=counter(120, t)),
    "throttle=hw_slowdown": lambda g, t: replace(g, clock_event_reasons=0x8),
    "lost": lambda g, t: GpuSample(index=g.index, uuid=g.uuid, lost=True),
    "power=800": lambda g, t: replace(g, power_w=800.0),
    "pcie_replay=120": lambda g, t: replace(g, pcie_replay_count=counter(120, t)),
    "nvlink_err": lambda g, t: replace(g, nvlink_replay_errors=counter(12, t)),
    "row_remap_fail": lambda g, t: replace(g, remap_failure=True),
    "mem_full": lambda g, t: replace(g, mem_used_bytes=79 * GIB),
    "nvlink_down=2": lambda g, t: replace(g, nvlink_links_up=16, nvlink_down_links=(16, 17)),
    "pcie_width=8": lambda g, t: replace(g, pcie_link_width=8),
    "hbm_temp=100": lambda g, t: replace(g, mem_temp_c=100.0),
    "fabric=not_started": lambda g, t: replace(g, fabric_state=1),
    "fabric=in_progress": lambda g, t: replace(g, fabric_state=2),
    "fabric=failed": lambda g, t: replace(g, fabric_status=999),
    "fabric=degraded": lambda g, t: replace(g, fabric_health_mask=1),
}
SYSTEM_FAULTS: dict[str, Callable[[SystemSample], SystemSample]] = {
    "cpu=99": lambda s: replace(s, cpu_pct=99.0),
    "disk_full": lambda s: replace(s, disks=(DiskUsage("/", 1000, 990, 10),)),
}

WINDOW = CLEAR - START  # sticky checks (XIDs, SXids, kernel-log classes, IB flaps) last as long as a fault


def simulate(fault: str, n_gpus: int = 4) -> list[Notification]:
    health = HealthEngine(
        HealthConfig(
            gpu=GpuThresholds(xid_window=WINDOW, clock_event_sustained=3600.0),
            node=NodeThresholds(ib_flap_window=WINDOW, kmsg_window=WINDOW, sxid_window=WINDOW),
        )
    )
    clock = [0.0]
    node: SimulatedSystem | None = None
    if fault in NODE_EXPECTED or fault == "healthy node":
        specs = [f"{fault}@{START}s+{CLEAR - START}s"] if fault in NODE_EXPECTED else []
        node = SimulatedSystem(host="n1", faults=FaultSchedule.parse(specs), clock=lambda: clock[0])
    raw: dict[str, Any] = {"escalation": {"policy": [{"name": "all", "levels": [{"notify": ["ops"]}]}]}}
    alerts = AlertEngine(alert_config_from(raw, env={}))
    hs, st = HealthState(), AlertState()
    notes: list[Notification] = []
    for t in range(0, END, STEP):
        now = T0 + t
        clock[0] = float(t)
        on = START <= t < CLEAR
        frames: list[SampleFrame | EventFrame | InventoryFrame] = []
        if node is not None and t == 0:  # the GPU model sets the expected InfiniBand ports and rate
            gpus_info = tuple(
                GpuInfo(index=i, uuid=f"GPU-{i}", name="NVIDIA H100 80GB HBM3") for i in range(n_gpus)
            )
            frames.append(InventoryFrame(host="n1", provider="p", boot_id="b", seq=0, ts=now, gpus=gpus_info))
        if fault.startswith("xid=") and t == START:
            detail = XID74_DETAIL if fault == "xid=74" else None
            frames.append(xid_frame("n1", t, now, "p", "b", xid=int(fault[4:]), message=detail))
        if not (fault == "host_down" and on):
            counting = "=120" in fault or fault == "nvlink_err"  # counters keep their value after
            faulty = fault in GPU_FAULTS and (on or counting)
            gpus = tuple(
                GPU_FAULTS[fault](base_gpu(i, t), t) if faulty and i == 2 else base_gpu(i, t)
                for i in range(n_gpus)
            )
            system = SYSTEM_FAULTS[fault](base_system()) if on and fault in SYSTEM_FAULTS else base_system()
            if node is not None:
                system = node.sample()
            frames.append(
                SampleFrame(
                    host="n1",
                    provider="p",
                    boot_id="b",
                    seq=t,
                    ts=now,
                    interval_s=STEP,
                    gpus=gpus,
                    system=system,
                )
            )
        for f in frames:
            hs, obs = health.observe(hs, f, now)
            st, _, out = alerts.evaluate(st, obs, now)
            notes += out
        hs, obs = health.tick(hs, now)
        st, _, out = alerts.evaluate(st, obs, now)
        notes += out
    return notes


@pytest.mark.parametrize("fault", list(EXPECTED))
def test_fault_gives_its_alert_and_resolves(fault: str) -> None:
    rule, severity, subject, advice = EXPECTED[fault]
    notes = simulate(fault)
    assert [(n.kind, n.rule) for n in notes] == [("firing", rule), ("resolved", rule)]
    fired, resolved = notes
    assert fired.severity == severity
    assert fired.labels == {
        "provider": "p",
        "host": "n1",
        **subject,
        **({"uuid": "GPU-2"} if "gpu" in subject else {}),
    }
    assert advice.lower() in (fired.summary + " " + fired.advice).lower()
    assert fired.channels == resolved.channels == ("ops",)
    assert (
        START <= fired.at - T0 <= START + 30 + 2 * STEP + 15
    )  # `for` 30 s, rates need a sample, staleness 15 s
    # a counter rate is counted over rate_window (30 s): it clears once the window holds no fault
    window = GpuThresholds().rate_window if rule in RATE_RULES else 0
    assert CLEAR <= resolved.at - T0 <= CLEAR + window + 2 * STEP


def test_healthy_fleet_notifies_nothing() -> None:
    assert simulate("none") == []


def test_healthy_simulated_node_notifies_nothing() -> None:
    """The simulated DGX-like node (8 IB ports at 400 Gb/s, services, modules, clock) is healthy."""
    assert simulate("healthy node") == []


@pytest.mark.parametrize("n_gpus", [1, 8, 16])
def test_host_down_is_one_notification_whatever_its_gpus(n_gpus: int) -> None:
    notes = simulate("host_down", n_gpus)
    assert [(n.kind, n.rule) for n in notes] == [
        ("firing", "host.unreachable"),
        ("resolved", "host.unreachable"),
    ]
