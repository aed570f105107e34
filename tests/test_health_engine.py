"""Health engine beyond single checks: events (XID, lost, DBE, throttle, recovery), the RMA
escalation, staleness and HostUnreachable, GpuMissing, emission policy, rollups, config."""

from __future__ import annotations

from typing import Any

import pytest

from collector.health import ExpectedHost, HealthEngine, HealthState, Observation, rollup
from collector.health.config import HealthConfig, HealthSection, health_config_from
from shared.errors import ConfigError
from shared.frames import EventFrame, GpuInfo, GpuSample, InventoryFrame, SampleFrame
from tests.support.health_frames import sample

T0 = 1_700_000_000.0


def event(ts: float, type: str, gpu: int | None = 0, host: str = "node-1", **kw: Any) -> EventFrame:
    return EventFrame(
        host=host, provider="acme", boot_id="b1", seq=int(ts), ts=ts, type=type, gpu_index=gpu, **kw
    )


def by_check(obs: list[Observation], check: str) -> list[Observation]:
    return [o for o in obs if o.check == check]


@pytest.fixture
def engine() -> HealthEngine:
    return HealthEngine()


@pytest.mark.parametrize(
    ("code", "status", "fragment"),
    [
        (79, "critical", "reboot"),  # fell off the bus: fatal, reboot
        (48, "critical", "reset"),  # DBE: fatal, reset
        (13, "warning", "restart the application"),  # application fault
        (31, "warning", "restart the application"),
        (63, "warning", "track the trend"),  # ignore bucket: warning, trend
        (99999, "warning", "contact support"),  # not in the catalogue
    ],
)
def test_xid_classified_from_catalogue(engine: HealthEngine, code: int, status: str, fragment: str) -> None:
    state, _ = engine.observe(HealthState(), sample(T0), T0)
    state, obs = engine.observe(state, event(T0 + 1, "xid", xid=code), T0 + 1)
    (o,) = by_check(obs, "gpu.xid")
    assert o.status == status
    assert o.immediate
    assert o.labels["xid"] == str(code)
    assert fragment in (o.summary + " " + o.advice)


def test_xid_counts_window_and_rma(engine: HealthEngine) -> None:
    state, _ = engine.observe(HealthState(), sample(T0), T0)
    t = T0
    for i in range(2):
        t += 3600
        state, obs = engine.observe(state, event(t, "xid", xid=79), t)
        assert by_check(obs, "gpu.rma") == []  # 1, 2 fatal XIDs: no RMA yet
        assert state.hosts["node-1"].gpus[0].xids[79].count == i + 1
    state, obs = engine.observe(state, event(t + 60, "xid", xid=48), t + 60)
    (rma,) = by_check(obs, "gpu.rma")
    assert rma.status == "critical"
    assert "RMA" in rma.summary
    assert rma.value == 3.0
    # The XID check clears after its window; the RMA advice after the 24 h window.
    state, obs = engine.tick(state, t + 60 + 3600)
    assert {o.labels["xid"]: o.status for o in by_check(obs, "gpu.xid")} == {"79": "healthy", "48": "healthy"}
    assert by_check(obs, "gpu.rma")[0].status == "critical"  # still 3 within 24 h
    state, obs = engine.tick(state, T0 + 3600 + 86400 + 1)
    assert by_check(obs, "gpu.rma")[0].status == "healthy"


def test_fatal_xids_spread_beyond_window_give_no_rma(engine: HealthEngine) -> None:
    state, _ = engine.observe(HealthState(), sample(T0), T0)
    for i in range(5):
        t = T0 + i * 43201 + 1
        state, obs = engine.observe(state, event(t, "xid", xid=79), t)
        assert all(o.status != "critical" for o in by_check(obs, "gpu.rma"))


@pytest.mark.parametrize(
    ("type", "kw", "check", "status"),
    [
        ("gpu_lost", {}, "gpu.lost", "critical"),
        ("ecc_dbe", {"count": 2}, "gpu.ecc_dbe", "critical"),
        ("throttle_start", {"value": 0x40}, "gpu.clock_events", "warning"),
        ("throttle_start", {"value": 0x4}, "gpu.clock_events", None),  # SW power cap: not a fault
        ("recovery_action", {"value": 2}, "gpu.recovery_action", "critical"),
        ("recovery_action", {"value": 3}, "gpu.recovery_action", "warning"),
        ("page_retirement", {"value": 1}, "gpu.row_remap", "critical"),
        ("page_retirement", {"value": 0}, "gpu.row_remap", None),
        ("ecc_sbe", {}, "gpu.ecc_sbe_rate", None),
    ],
)
def test_events_judged_on_arrival(
    engine: HealthEngine, type: str, kw: dict[str, Any], check: str, status: str | None
) -> None:
    state, _ = engine.observe(HealthState(), sample(T0), T0)
    state, obs = engine.observe(state, event(T0 + 1, type, **kw), T0 + 1)
    found = by_check(obs, check)
    assert [o.status for o in found] == ([status] if status else [])


def test_gpu_lost_then_recovered(engine: HealthEngine) -> None:
    state, _ = engine.observe(HealthState(), sample(T0), T0)
    state, obs = engine.observe(state, event(T0 + 1, "gpu_lost", gpu=1), T0 + 1)
    assert [(o.check, o.status, o.labels["gpu"]) for o in obs] == [("gpu.lost", "critical", "1")]
    fleet = rollup(state, engine.config.provider)
    g1 = fleet.hosts["node-1"].gpus[1]
    assert (g1.status, g1.lost, g1.stale, g1.usable) == ("critical", True, True, False)
    state, obs = engine.observe(state, event(T0 + 2, "gpu_recovered", gpu=1), T0 + 2)
    assert by_check(obs, "gpu.lost")[0].status == "healthy"


def test_event_by_uuid_and_unknown_gpu(engine: HealthEngine) -> None:
    state, _ = engine.observe(HealthState(), sample(T0), T0)
    ev = EventFrame(
        host="node-1", provider="acme", boot_id="b1", seq=9, ts=T0, type="ecc_dbe", gpu_uuid="GPU-node-1-1"
    )
    state, obs = engine.observe(state, ev, T0 + 1)
    assert by_check(obs, "gpu.ecc_dbe")[0].labels["gpu"] == "1"
    ev = EventFrame(
        host="node-1", provider="acme", boot_id="b1", seq=10, ts=T0, type="ecc_dbe", gpu_uuid="GPU-x"
    )
    assert engine.observe(state, ev, T0 + 2)[1] == []


def test_stale_host_unreachable_and_back(engine: HealthEngine) -> None:
    state, _ = engine.observe(HealthState(), sample(T0, gpus=8), T0)
    state, obs = engine.tick(state, T0 + 15)  # 3 x 5 s interval: not yet
    assert obs == []
    state, obs = engine.tick(state, T0 + 15.5)
    assert [(o.check, o.status) for o in by_check(obs, "host.unreachable")] == [
        ("host.unreachable", "critical")
    ]
    assert [o.status for o in by_check(obs, "gpu.stale")] == ["unknown"] * 8
    fleet = rollup(state, engine.config.provider)
    assert fleet.hosts["node-1"].status == "unknown"
    assert fleet.hosts["node-1"].gpus_usable == 0
    assert engine.tick(state, T0 + 100)[1] == []  # raised once
    state, obs = engine.observe(state, sample(T0 + 101, gpus=8), T0 + 101)
    assert by_check(obs, "host.unreachable")[0].status == "healthy"
    assert [o.status for o in by_check(obs, "gpu.stale")] == ["healthy"] * 8
    assert rollup(state, engine.config.provider).hosts["node-1"].status == "healthy"


def test_configured_stale_after() -> None:
    engine = HealthEngine(HealthConfig(health=HealthSection(stale_after=60.0)))
    state, _ = engine.observe(HealthState(), sample(T0), T0)
    assert engine.tick(state, T0 + 59)[1] == []
    assert by_check(engine.tick(state, T0 + 61)[1], "host.unreachable")[0].status == "critical"


def test_expected_host_never_reported(engine: HealthEngine) -> None:
    expected = {"node-9": ExpectedHost("acme", 8)}
    state, obs = engine.tick(HealthState(), T0, expected)
    assert obs == []
    assert rollup(state, engine.config.provider).hosts["node-9"].status == "unknown"
    state, obs = engine.tick(state, T0 + 61, expected)
    (o,) = obs
    assert (o.check, o.status) == ("host.unreachable", "critical")
    assert "never reported" in o.summary


def test_gpu_missing_against_inventory(engine: HealthEngine) -> None:
    state, _ = engine.tick(HealthState(), T0, {"node-1": ExpectedHost("acme", 8)})
    state, obs = engine.observe(state, sample(T0, gpus=7), T0)
    (o,) = by_check(obs, "host.gpu_missing")
    assert (o.status, o.value) == ("critical", 1.0)
    state, obs = engine.observe(state, sample(T0 + 5, gpus=8), T0 + 5)
    assert by_check(obs, "host.gpu_missing")[0].status == "healthy"


def test_gpu_missing_against_agent_inventory(engine: HealthEngine) -> None:
    inv = InventoryFrame(
        host="node-1",
        provider="acme",
        boot_id="b1",
        seq=1,
        ts=T0,
        gpus=tuple(GpuInfo(index=i) for i in range(4)),
    )
    state, _ = engine.observe(HealthState(), inv, T0)
    state, obs = engine.observe(state, sample(T0, gpus=3), T0)
    assert by_check(obs, "host.gpu_missing")[0].status == "critical"
    assert state.hosts["node-1"].gpus[3].stale is True  # known from the inventory, no data
    state, _ = engine.observe(state, sample(T0 + 5, gpus=4), T0 + 5)
    state, _ = engine.observe(state, sample(T0 + 10, gpus=3), T0 + 10)
    assert state.hosts["node-1"].gpus[3].stale is True  # stopped appearing: last values stale


def test_emission_policy(engine: HealthEngine) -> None:
    """Healthy checks go quiet; a problem is sent every time, then 21 healthy ones."""
    state, obs = engine.observe(HealthState(), sample(T0, gpus=1), T0)
    assert by_check(obs, "gpu.temperature")[0].status == "healthy"
    state, obs = engine.observe(state, sample(T0 + 5, gpus=1), T0 + 5)
    assert obs == []
    for i in range(3):
        hot = SampleFrame(
            host="node-1",
            provider="acme",
            boot_id="b1",
            seq=int(T0) + 10 + i,
            ts=T0 + 10 + i,
            gpus=(GpuSample(index=0, uuid="GPU-node-1-0", temp_c=95.0),),
        )
        state, obs = engine.observe(state, hot, T0 + 10 + i)
        assert [o.status for o in by_check(obs, "gpu.temperature")] == ["critical"]
    healthy = []
    for i in range(30):
        state, obs = engine.observe(state, sample(T0 + 20 + i, gpus=1), T0 + 20 + i)
        healthy += by_check(obs, "gpu.temperature")
    assert len(healthy) == engine.config.health.emit_healthy_for == 21
    assert {o.status for o in healthy} == {"healthy"}


def test_provider_rollup_thresholds(engine: HealthEngine) -> None:
    state = HealthState()
    for h in range(10):
        state, _ = engine.observe(state, sample(T0, host=f"n{h}", gpus=8), T0)

    def status_with(critical_gpus: int) -> tuple[str, int]:
        s = HealthState()
        for h in range(10):
            hot = [GpuSample(index=i, uuid=f"G{h}-{i}", temp_c=50.0) for i in range(8)]
            for i in range(8):
                if h * 8 + i < critical_gpus:
                    hot[i] = GpuSample(index=i, uuid=f"G{h}-{i}", temp_c=99.0)
            f = SampleFrame(host=f"n{h}", provider="acme", boot_id="b", seq=1, ts=T0, gpus=tuple(hot))
            s, _ = engine.observe(s, f, T0)
        p = rollup(s, engine.config.provider).providers["acme"]
        return p.status, p.gpus_usable

    assert status_with(0) == ("healthy", 80)
    assert status_with(4) == ("healthy", 76)  # 5.0%: not more than 5%
    assert status_with(5) == ("warning", 75)  # 6.25%
    assert status_with(16) == ("warning", 64)  # 20%: not more than 20%
    assert status_with(17) == ("critical", 63)
    p = rollup(state, engine.config.provider).providers["acme"]
    assert (p.hosts, p.gpus, p.hosts_by_status["healthy"], p.usable_pct) == (10, 80, 10, 100.0)


def test_health_config_from_raw() -> None:
    raw = {
        "health": {
            "stale_after": "20s",
            "gpu": {"temp_warning_c": 80, "temp_critical_c": 90, "xid_window": "30m"},
            "host": {"disk_warning_pct": 70},
            "provider": {"critical_gpu_pct": 10},
        }
    }
    cfg = health_config_from(raw, env={"GPUWARDEN_HEALTH_GPU_TEMP_CRITICAL_C": "88"})
    assert cfg.health.stale_after == 20.0
    assert (cfg.gpu.temp_warning_c, cfg.gpu.temp_critical_c, cfg.gpu.xid_window) == (80.0, 88.0, 1800.0)
    assert cfg.host.disk_warning_pct == 70.0
    assert cfg.provider.critical_gpu_pct == 10.0
    assert health_config_from({}, env={}) == HealthConfig()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"health": {"gpu": {"temp_warning_c": "hot"}}}, "health.gpu.temp_warning_c"),
        ({"health": {"gpu": {"temp_warning_c": 95}}}, "health.gpu.temp_warning_c"),  # above critical
        ({"health": {"gpu": {"memory_full_pct": 101}}}, "health.gpu.memory_full_pct"),
        ({"health": {"gpu": {"tmep_warning_c": 80}}}, "health.gpu.tmep_warning_c"),
        ({"health": {"stale_after": "soon"}}, "health.stale_after"),
        ({"health": {"host": {"disk_warning_pct": 99}}}, "health.host.disk_warning_pct"),
        ({"health": {"network": {"unreachable_status": "bad"}}}, "health.network.unreachable_status"),
        ({"health": {"gpu": 3}}, "health.gpu"),
    ],
)
def test_health_config_errors_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        health_config_from(raw, env={})
    assert e.value.key == key


def test_state_round_trips_through_json(engine: HealthEngine) -> None:
    import json

    from collector.health.codec import state_from_dict
    from shared.frames import DiskUsage, GpuProcess, NicCounters, SystemSample
    from tests.support.health_dump import state_to_dict

    def busy(ts: float, errors: int) -> SampleFrame:
        gpus = (
            GpuSample(
                index=0,
                uuid="G0",
                temp_c=88.0,
                clock_event_reasons=0x8,
                pcie_replay_count=int(ts - T0) * 9,
                pcie_link_gen=4,
                pcie_link_width=16,
                processes=(GpuProcess(pid=7, name="train", used_mem_bytes=5),),
            ),
            GpuSample(index=1, uuid="G1", lost=True),
        )
        system = SystemSample(
            cpu_pct=99.0,
            disks=(DiskUsage("/", 100, 90, 10),),
            nics=(NicCounters(name="ib0", up=True, rx_errors=errors),),
        )
        return SampleFrame(
            host="node-1", provider="acme", boot_id="b1", seq=int(ts), ts=ts, gpus=gpus, system=system
        )

    state, _ = engine.observe(HealthState(), busy(T0, 0), T0)
    state, _ = engine.observe(state, event(T0 + 1, "xid", xid=79), T0 + 1)
    state, _ = engine.observe(state, busy(T0 + 60, 500), T0 + 60)
    saved = json.loads(json.dumps(state_to_dict(state)))
    restored = state_from_dict(saved)
    assert restored == state
    state, a = engine.observe(state, busy(T0 + 400, 1000), T0 + 400)
    restored, b = engine.observe(restored, busy(T0 + 400, 1000), T0 + 400)
    assert a == b
    assert ("gpu.clock_events", "critical") in [(o.check, o.status) for o in a]  # sustained across the save


def test_redelivered_frames_are_judged_once(engine: HealthEngine) -> None:
    state, _ = engine.observe(HealthState(), sample(T0), T0)
    xid = event(T0 + 1, "xid", xid=79)
    for _ in range(3):  # redelivered: one XID, not three fatal XIDs (no RMA advice)
        state, obs = engine.observe(state, xid, T0 + 2)
    assert state.hosts["node-1"].gpus[0].xids[79].count == 1
    assert by_check(obs, "gpu.xid") == []
    assert "gpu.rma" not in state.hosts["node-1"].gpus[0].checks
    hot = sample(T0 + 10)
    state, _ = engine.observe(state, hot, T0 + 10)
    assert engine.observe(state, sample(T0 + 5), T0 + 11)[1] == []  # late, older sample: ignored
    assert state.hosts["node-1"].gpus[0].last == hot.gpus[0]
    restarted = SampleFrame(host="node-1", provider="acme", boot_id="b2", seq=1, ts=T0 + 20, gpus=hot.gpus)
    state, _ = engine.observe(state, restarted, T0 + 20)  # a new agent run counts from 1 again
    assert state.hosts["node-1"].last_sample_seq == 1
    again = EventFrame(
        host="node-1", provider="acme", boot_id="b2", seq=xid.seq, ts=T0 + 21, type="xid", gpu_index=0, xid=79
    )
    state, obs = engine.observe(state, again, T0 + 21)
    assert state.hosts["node-1"].gpus[0].xids[79].count == 2  # same seq, another run: a new XID


def inventory(
    ts: float, gpus: int = 2, nvml_error: str | None = None, seq: int | None = None
) -> InventoryFrame:
    return InventoryFrame(
        host="node-1",
        provider="acme",
        boot_id="b1",
        seq=int(ts) if seq is None else seq,
        ts=ts,
        backend="nvml",
        gpus=tuple(GpuInfo(index=i, uuid=f"GPU-node-1-{i}") for i in range(gpus)),
        nvml_error=nvml_error,
    )


def test_nvml_that_cannot_initialise_is_a_driver_alert_not_an_unreachable_host(engine: HealthEngine) -> None:
    """A broken driver is not a dead host: the agent's inventory carries the NVML error and its
    samples keep coming without GPUs. One critical ``host.gpu_driver`` with the driver advice;
    no ``host.unreachable``, no ``host.gpu_missing``; its GPUs are unknown; NVML back clears it."""
    expected = {"node-1": ExpectedHost("acme", 2)}  # the inventory source expects its 2 GPUs
    state, _ = engine.observe(HealthState(), inventory(T0), T0)
    state, _ = engine.observe(state, sample(T0 + 1), T0 + 1)
    err = "RM has detected an NVML/RM version mismatch."
    state, obs = engine.observe(state, inventory(T0 + 10, gpus=0, nvml_error=err), T0 + 10)
    (o,) = by_check(obs, "host.gpu_driver")
    assert o.status == "critical"
    assert not o.immediate
    assert o.summary == (
        f"node-1: NVML cannot initialise: {err}; check the driver and library versions; "
        "reboot if a driver update is pending"
    )
    out: list[Observation] = []
    for t in range(11, 120, 5):
        state, obs = engine.observe(state, sample(T0 + t, gpus=0), T0 + t)
        out += obs
        state, obs = engine.tick(state, T0 + t + 1, expected)
        out += obs
    bad = [(o.check, o.status) for o in out if o.status != "healthy"]
    assert bad == []
    fleet = rollup(state, engine.config.provider)
    host = fleet.hosts["node-1"]
    assert host.status == "critical"
    assert {g.status for g in host.gpus} == {"unknown"}
    state, obs = engine.observe(state, inventory(T0 + 121), T0 + 121)
    assert [(o.check, o.status) for o in by_check(obs, "host.gpu_driver")] == [("host.gpu_driver", "healthy")]
    state, obs = engine.observe(state, sample(T0 + 122), T0 + 122)
    assert [o for o in obs if o.status != "healthy"] == []
    assert {g.status for g in rollup(state, engine.config.provider).hosts["node-1"].gpus} == {"healthy"}
