"""NvmlBackend against the recorded fake of pynvml (real pynvml exception classes and structures)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.gpu.base import GpuBackend
from agent.gpu.nvml import NvmlBackend
from shared.errors import EXIT_NVML, NvmlUnavailableError
from shared.frames import InventoryFrame, SampleFrame, decode, encode
from tests.support.fake_pynvml import FakeNvml

XID, SBE, DBE, PSTATE, RECOVERY = 0x8, 0x1, 0x2, 0x4, 0x8000


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml.load()


@pytest.fixture
def proc_root(tmp_path: Path) -> str:
    pid = tmp_path / "4242"
    pid.mkdir()
    (pid / "comm").write_text("python3\n")
    (pid / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/"
        "cri-containerd-" + "ab" * 32 + ".scope\n"
    )
    return str(tmp_path)


@pytest.fixture
def backend(fake: FakeNvml, proc_root: str) -> Iterator[NvmlBackend]:
    b = NvmlBackend(fake.module, proc_root=proc_root)
    b.open()
    yield b
    b.close()


def opened(fake: FakeNvml, **kw: object) -> NvmlBackend:
    b = NvmlBackend(fake.module, proc_root="/nonexistent", **kw)  # type: ignore[arg-type]
    b.open()
    return b


def test_is_a_gpu_backend(backend: NvmlBackend) -> None:
    assert isinstance(backend, GpuBackend)
    assert backend.name == "nvml"


def test_inventory(backend: NvmlBackend) -> None:
    inv = backend.inventory()
    assert (inv.backend, inv.driver_version, inv.cuda_version, inv.nvml_version) == (
        "nvml",
        "570.133.20",
        "12.8",
        "12.570.133.20",
    )
    g0, g1 = inv.gpus
    assert g0.uuid == "GPU-5e1f0a3c-8d2b-4c71-9f3e-2a6b7c8d9e01"
    assert (g0.name, g0.serial, g0.pci_bus_id, g0.minor_number) == (
        "NVIDIA H100 80GB HBM3",
        "1652823054127",
        "00000000:18:00.0",
        0,
    )
    assert (g0.architecture, g0.mem_total_bytes, g0.vbios) == ("hopper", 81559 << 20, "96.00.99.00.01")
    assert (g0.mig_mode, g0.persistence_mode, g0.power_limit_default_w) == (False, True, 700.0)
    assert (g0.pcie_link_gen_max, g0.pcie_link_width_max, g0.nvlink_links_total) == (5, 16, 18)
    # Hopper has row remapping, not page retirement; the SXM board has no fan reading.
    assert g0.unsupported == ("fan_pct", "retired_pages_dbe", "retired_pages_pending", "retired_pages_sbe")
    assert g1.pci_bus_id == "00000000:2A:00.0"
    assert g1.index == 1
    frame = InventoryFrame(host="h", provider="p", boot_id="b", gpus=inv.gpus, backend=inv.backend)
    assert decode(encode(frame)) == frame


def test_sample_values_and_units(backend: NvmlBackend) -> None:
    s0, s1 = backend.sample()
    assert (s0.index, s0.lost, s0.util_gpu_pct, s0.util_mem_pct) == (0, False, 87.0, 41.0)
    assert (s0.mem_total_bytes, s0.mem_reserved_bytes) == (81559 << 20, 541 << 20)
    assert (s0.temp_c, s0.mem_temp_c) == (54.0, 62.0)
    assert (s0.temp_shutdown_c, s0.temp_slowdown_c, s0.temp_max_operating_c) == (92.0, 89.0, 87.0)
    assert s0.power_w == pytest.approx(512.345)  # POWER_INSTANT field, mW -> W
    assert s0.power_limit_w == 700.0
    assert s0.energy_j == pytest.approx(1_036_800_000.0)  # mJ -> J
    assert (s0.pstate, s0.clock_sm_mhz, s0.clock_mem_mhz, s0.clock_event_reasons) == (0, 1980, 2619, 0)
    assert (s0.ecc_enabled, s0.ecc_sbe_volatile, s0.ecc_dbe_volatile, s0.ecc_sbe_aggregate) == (
        True,
        0,
        0,
        12,
    )
    assert s0.fan_pct is None
    assert s0.retired_pages_sbe is None
    assert s0.retired_pages_pending is None
    assert (s0.nvlink_links_total, s0.nvlink_links_up, s0.nvlink_crc_errors) == (18, 18, 0)
    assert (s0.recovery_action, s0.persistence_mode, s0.throttle_thermal_ns) == (0, True, 0)
    p0, p1 = s0.processes
    assert (p0.pid, p0.name, p0.used_mem_bytes) == (4242, "python3", 60 << 30)
    assert p0.container == "pod_0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/containerd://" + "ab" * 32
    assert (p1.pid, p1.name, p1.used_mem_bytes, p1.container) == (4243, None, None, None)  # exited, NVML n/a
    assert (s1.remapped_rows_correctable, s1.remapped_rows_uncorrectable, s1.remap_pending) == (2, 1, False)
    assert (s1.nvlink_links_up, s1.pcie_replay_count, s1.clock_event_reasons, s1.processes) == (17, 3, 1, ())
    frame = SampleFrame(host="h", provider="p", boot_id="b", gpus=(s0, s1))
    assert decode(encode(frame)) == frame  # every value within the wire ranges
    assert backend.nvml_errors == 0


def test_not_supported_is_asked_once(fake: FakeNvml, backend: NvmlBackend) -> None:
    for _ in range(5):
        backend.sample()
    for i in (0, 1):
        assert fake.count("nvmlDeviceGetFanSpeed", i) == 1
        assert fake.count("field 29", i) == 1  # RETIRED_SBE left the batch after one NOT_SUPPORTED
        assert fake.count("nvmlDeviceGetRetiredPages", i) == 2  # one per cause, then cached
        assert fake.count("nvmlDeviceGetRetiredPagesPendingStatus", i) == 1
        assert fake.count("nvmlDeviceGetFieldValues", i) == 7  # one batch per tick; open: link count + a tick
        assert fake.count("field 3", i) == 6
        assert fake.count("nvmlDeviceGetTemperature", i) == 6
    assert backend.nvml_errors == 0


def test_field_batch_per_field_errors(fake: FakeNvml) -> None:
    fake.set_field(1, "94", {"error": "Unknown"})  # PCIe replay: an error, not a capability
    fake.set_field(1, "186", {"error": "NotSupported"})  # POWER_INSTANT: use nvmlDeviceGetPowerUsage
    b = opened(fake)
    errors = b.nvml_errors
    s0, s1 = b.sample()
    assert s1.pcie_replay_count is None
    assert s0.pcie_replay_count == 0
    assert s1.power_w == pytest.approx(71.234)
    assert s0.power_w == pytest.approx(512.345)
    assert s1.ecc_enabled is True
    assert s1.remapped_rows_correctable == 2
    assert b.nvml_errors == errors + 1
    b.sample()
    assert b.nvml_errors == errors + 2  # an error is asked again next tick (it may clear)
    assert fake.count("field 94", 1) == 3
    assert fake.count("field 186", 1) == 1  # not supported: out of the batch after the first
    assert fake.count("nvmlDeviceGetPowerUsage", 1) == 3
    assert "power_w" not in b.inventory().gpus[1].unsupported  # the fallback call gives it
    b.close()


@pytest.mark.parametrize("how", ["binding lacks it", "call not supported", "library lacks it"])
def test_without_field_values_every_reading_has_a_single_call(fake: FakeNvml, how: str) -> None:
    if how == "binding lacks it":
        fake.remove("nvmlDeviceGetFieldValues")
    for i in (0, 1):
        if how == "call not supported":
            fake.gpu(i)["fields"]["error"] = "NotSupported"
        elif how == "library lacks it":
            fake.gpu(i)["fields"]["error"] = "FunctionNotFound"
    b = opened(fake)
    s0, s1 = b.sample()
    assert s0.power_w == pytest.approx(512.345)
    assert s0.energy_j == pytest.approx(1_036_800_000.0)
    assert (s0.ecc_enabled, s0.ecc_sbe_aggregate, s0.ecc_dbe_volatile) == (True, 12, 0)
    assert (s1.remapped_rows_correctable, s1.remapped_rows_uncorrectable, s1.remap_failure) == (2, 1, False)
    assert (s0.nvlink_links_total, s0.nvlink_links_up, s1.nvlink_links_up) == (18, 18, 17)
    assert (s0.nvlink_crc_errors, s0.nvlink_replay_errors, s0.throttle_power_ns) == (0, 0, 0)
    assert (s1.pcie_replay_count, s0.mem_temp_c, s0.recovery_action) == (3, None, None)
    unsupported = b.inventory().gpus[0].unsupported
    assert {"mem_temp_c", "recovery_action", "retired_pages_sbe", "fan_pct"} <= set(unsupported)
    assert "power_w" not in unsupported
    assert "nvlink_links_up" not in unsupported
    assert b.nvml_errors == 0
    b.close()


def test_missing_functions_fall_back_and_log_once(fake: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    fake.remove("nvmlDeviceGetCurrentClocksEventReasons")  # older binding: ThrottleReasons only
    fake.remove("nvmlMemory_v2")  # older binding: no v2 memory info, so no reserved figure
    fake.remove("nvmlDeviceGetPersistenceMode")
    with caplog.at_level(logging.INFO, logger="agent.gpu.nvml"):
        b = opened(fake)
        for _ in range(3):
            s0, s1 = b.sample()
    assert (s0.clock_event_reasons, s1.clock_event_reasons) == (0, 1)
    assert (s0.mem_total_bytes, s0.mem_reserved_bytes) == (81559 << 20, None)
    assert s0.mem_used_bytes is not None
    assert s0.persistence_mode is None
    missing = [r.getMessage() for r in caplog.records if "nvmlDeviceGetPersistenceMode" in r.getMessage()]
    assert len(missing) == 1
    assert b.nvml_errors == 0
    b.close()


def test_other_error_counts_and_is_retried(fake: FakeNvml) -> None:
    fake.set_call(0, "nvmlDeviceGetClockInfo/1", {"error": "NoPermission"})
    b = opened(fake)
    before = b.nvml_errors
    s0, s1 = b.sample()
    assert s0.clock_sm_mhz is None
    assert s0.clock_mem_mhz == 2619
    assert s1.clock_sm_mhz == 345
    assert b.nvml_errors == before + 1
    fake.set_call(0, "nvmlDeviceGetClockInfo/1", 1755)
    assert b.sample()[0].clock_sm_mhz == 1755
    assert "clock_sm_mhz" not in b.inventory().gpus[0].unsupported
    b.close()


def test_out_of_range_readings_become_none(fake: FakeNvml) -> None:
    fake.set_call(0, "nvmlDeviceGetTemperature/0", 4000)  # a driver glitch
    fake.set_field(0, "230", {"type": 1, "value": 0xFFFFFFFF})  # an unexpected sentinel
    fake.set_field(0, "82", {"type": 0, "value": float("nan")})
    b = opened(fake)
    before = b.nvml_errors
    s0, s1 = b.sample()
    assert (s0.temp_c, s0.recovery_action, s0.mem_temp_c) == (None, None, None)
    assert (s1.temp_c, s1.recovery_action, s1.mem_temp_c) == (31.0, 0, 38.0)
    assert b.nvml_errors == before + 3
    frame = SampleFrame(host="h", provider="p", boot_id="b", gpus=(s0, s1))
    assert decode(encode(frame)) == frame
    b.close()


def test_gpu_lost_then_recovered(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.sample()
    fake.lose(1)
    s0, s1 = backend.sample()
    assert not s0.lost
    assert s0.temp_c == 54.0
    assert s1.lost
    assert s1.uuid == "GPU-9b0c7d12-44e6-4a8f-b1d3-6c5e4f3a2b10"
    assert all(getattr(s1, f) is None for f in ("temp_c", "power_w", "mem_used_bytes", "ecc_dbe_volatile"))
    events = backend.wait_events(0.0)
    assert [(e.type, e.gpu_index, e.gpu_uuid, e.source) for e in events] == [("gpu_lost", 1, s1.uuid, "nvml")]
    asked = sum(n for (_, i), n in fake.calls.items() if i == 1)
    assert backend.sample()[1].lost
    assert backend.wait_events(0.0) == []  # reported once
    # a lost GPU costs one probe per tick, not a full read
    assert sum(n for (_, i), n in fake.calls.items() if i == 1) == asked + 1
    assert fake.count("nvmlDeviceGetHandleByUUID", 1) == 1
    fake.recover(1)
    s0, s1 = backend.sample()
    assert not s1.lost
    assert s1.temp_c == 31.0
    assert [(e.type, e.gpu_index) for e in backend.wait_events(0.0)] == [("gpu_recovered", 1)]


def test_gpu_lost_at_open_is_reported_and_can_come_back(fake: FakeNvml) -> None:
    fake.lose(1)
    b = opened(fake)
    assert [(e.type, e.gpu_index) for e in b.wait_events(0.0)] == [("gpu_lost", 1)]
    assert fake.registered.keys() == {0}
    s0, s1 = b.sample()
    assert (s0.lost, s1.lost, s1.uuid) == (False, True, "")
    assert b.inventory().gpus[1].uuid == ""
    fake.recover(1)
    s1 = b.sample()[1]
    assert (s1.lost, s1.uuid, s1.temp_c) == (False, "GPU-9b0c7d12-44e6-4a8f-b1d3-6c5e4f3a2b10", 31.0)
    assert [(e.type, e.gpu_index) for e in b.wait_events(0.0)] == [("gpu_recovered", 1)]
    assert b.inventory().gpus[1].pci_bus_id == "00000000:2A:00.0"
    assert fake.registered.keys() == {0, 1}  # registered for events once it answered
    fake.push_event(1, XID, 48)
    assert [(e.type, e.gpu_index, e.xid) for e in b.wait_events(5.0)] == [("xid", 1, 48)]
    b.close()


def test_unknown_error_on_a_lost_device_is_gpu_lost(fake: FakeNvml) -> None:
    b = opened(fake)
    fake.set_call(0, "nvmlDeviceGetTemperature/0", {"error": "Unknown"})
    assert b.sample()[0].temp_c is None
    assert not b.sample()[0].lost
    fake.set_call(0, "nvmlDeviceGetPciInfo", {"error": "Unknown"})
    s0, s1 = b.sample()
    assert s0.lost
    assert not s1.lost
    assert [e.type for e in b.wait_events(0.0)] == ["gpu_lost"]
    b.close()


@pytest.mark.parametrize(
    "error", ["LibraryNotFound", "DriverNotLoaded", "LibRmVersionMismatch", "Uninitialized"]
)
def test_open_fails_with_a_typed_error(fake: FakeNvml, error: str) -> None:
    fake.init_error = error
    with pytest.raises(NvmlUnavailableError, match="NVML unavailable") as info:
        NvmlBackend(fake.module).open()
    assert info.value.exit_code == EXIT_NVML == 3


def test_events_xid_ecc_recovery(fake: FakeNvml, backend: NvmlBackend) -> None:
    assert fake.registered == {0: XID | SBE | DBE | 0x400 | 0x800 | RECOVERY} | {1: fake.registered[0]}
    fake.push_event(1, XID, 79)
    fake.push_event(0, PSTATE, 2)  # not registered: never delivered
    fake.push_event(0, DBE)
    fake.push_event(0, RECOVERY, 1)
    events = []
    while len(events) < 3:
        got = backend.wait_events(5.0)
        assert got, "events were queued"
        events += got
    assert [(e.type, e.gpu_index, e.xid, e.value, e.source) for e in events] == [
        ("xid", 1, 79, None, "nvml"),
        ("ecc_dbe", 0, None, 0, "nvml"),
        ("recovery_action", 0, None, 1, "nvml"),
    ]
    assert events[0].gpu_uuid == "GPU-9b0c7d12-44e6-4a8f-b1d3-6c5e4f3a2b10"


def test_event_wait_timeout_returns_empty(fake: FakeNvml, backend: NvmlBackend) -> None:
    assert backend.wait_events(0.3) == []
    assert fake.count("nvmlEventSetWait") >= 1
    assert backend.nvml_errors == 0  # a timeout is not an error


def test_gpu_lost_during_event_wait(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.lose_during_wait(0)
    events = backend.wait_events(5.0)
    assert [(e.type, e.gpu_index) for e in events] == [("gpu_lost", 0)]
    s0, s1 = backend.sample()
    assert s0.lost
    assert not s1.lost
    assert backend.wait_events(0.0) == []  # not reported twice


def test_close_wakes_a_waiting_thread_and_is_idempotent(fake: FakeNvml) -> None:
    b = opened(fake)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(b.wait_events(60.0)))
    t.start()
    b.close()
    t.join(10.0)
    assert not t.is_alive()
    assert result == [[]]
    b.close()
    assert fake.shutdowns == 1
    assert fake.count("nvmlEventSetFree") == 1


def test_without_event_support_lost_events_still_come(fake: FakeNvml) -> None:
    for i in (0, 1):
        fake.set_call(i, "nvmlDeviceGetSupportedEventTypes", 0)
    b = opened(fake)
    assert fake.count("nvmlEventSetCreate") == 1
    assert fake.count("nvmlEventSetFree") == 1
    fake.lose(0)
    b.sample()
    assert [e.type for e in b.wait_events(1.0)] == ["gpu_lost"]
    assert b.wait_events(0.1) == []
    b.close()


def test_events_and_processes_can_be_switched_off(fake: FakeNvml) -> None:
    b = opened(fake, events=False, processes=False)
    assert fake.count("nvmlEventSetCreate") == 0
    assert b.sample()[0].processes == ()
    assert fake.count("nvmlDeviceGetComputeRunningProcesses", 0) == 0
    b.close()


def test_eight_gpus(proc_root: str) -> None:
    fake = FakeNvml.load(gpus=8)
    b = NvmlBackend(fake.module, proc_root=proc_root)
    b.open()
    inv = b.inventory()
    assert [g.index for g in inv.gpus] == list(range(8))
    assert len({g.uuid for g in inv.gpus}) == len({g.pci_bus_id for g in inv.gpus}) == 8
    samples = b.sample()
    assert [s.index for s in samples] == list(range(8))
    assert not any(s.lost for s in samples)
    b.close()


def test_node_signals_hbm_limit_app_clock_fabric_and_links(fake: FakeNvml, backend: NvmlBackend) -> None:
    s0, s1 = backend.sample()
    assert (s0.temp_mem_max_c, s0.clock_sm_app_mhz) == (95.0, 1980)  # MEM_MAX threshold, app clock
    assert (s0.fabric_state, s0.fabric_status, s0.fabric_clique_id, s0.fabric_health_mask) == (3, 0, 0, 0)
    assert s1.fabric_state == 2  # still registering
    assert (s0.nvlink_down_links, s1.nvlink_down_links) == ((), (7,))  # link 7 of GPU 1 is down
    assert s1.nvlink_links_up == 17
    assert s1.nvlink_crc_by_link == (0, 0, 0, 12, *(0,) * 14)  # attributed to link 3
    assert s0.nvlink_replay_by_link == s0.nvlink_recovery_by_link == (0,) * 18
    cluster = "5e1f0a3c-8d2b-4c71-9f3e-2a6b7c8d9e01"
    fake.set_call(
        0,
        "nvmlDeviceGetGpuFabricInfoV",
        {**fake.gpu(0)["calls"]["nvmlDeviceGetGpuFabricInfoV"], "clusterUuid": cluster, "status": 999},
    )
    assert backend.sample()[0].fabric_status == 999
    assert backend.inventory().gpus[0].fabric_cluster_uuid == cluster


def test_no_fabric_is_absent_not_a_failure(fake: FakeNvml) -> None:
    fake.set_call(0, "nvmlDeviceGetGpuFabricInfoV", {"state": 0, "status": 0, "cliqueId": 0})  # NOT_SUPPORTED
    fake.set_call(1, "nvmlDeviceGetGpuFabricInfoV", {"error": "NotSupported"})  # a PCIe board
    for i in (0, 1):
        fake.set_field(i, "163/0", {"error": "NotSupported"})  # a driver without per-link counters
    b = NvmlBackend(fake.module, events=False)
    b.open()
    for s in b.sample() + b.sample():
        assert (s.fabric_state, s.fabric_status, s.fabric_health_mask) == (None, None, None)
        assert s.nvlink_crc_by_link == ()
    assert b.nvml_errors == 0
    assert fake.count("nvmlDeviceGetGpuFabricInfoV", 0) == 1  # learnt once, not asked again
    unsupported = b.inventory().gpus[0].unsupported
    assert {"fabric_state", "fabric_health_mask", "nvlink_crc_by_link"} <= set(unsupported)
    b.close()


def test_old_binding_without_versioned_fabric_call(fake: FakeNvml) -> None:
    fake.remove("nvmlDeviceGetGpuFabricInfoV")
    b = NvmlBackend(fake.module, events=False)
    b.open()
    assert [s.fabric_state for s in b.sample()] == [None, None]  # the plain call is not recorded: absent
    assert b.nvml_errors == 0
    b.close()


@pytest.mark.parametrize(
    ("error", "text"),
    [
        ("DriverNotLoaded", "Driver Not Loaded"),
        ("LibraryNotFound", "NVML Shared Library Not Found"),
        ("LibRmVersionMismatch", "RM has detected an NVML/RM version mismatch."),
    ],
)
def test_open_fails_with_nvmls_own_text_then_a_retry_succeeds(fake: FakeNvml, error: str, text: str) -> None:
    """The error carries NVML's text as ``detail`` (what the agent publishes); the same backend
    opens once the driver is back, with every GPU."""
    fake.init_error = error
    b = NvmlBackend(fake.module, proc_root="/nonexistent")
    with pytest.raises(NvmlUnavailableError) as info:
        b.open()
    assert info.value.detail == text
    assert fake.initialized == 0
    fake.init_error = None
    b.open()
    try:
        assert len(b.inventory().gpus) == 2
        assert [s.lost for s in b.sample()] == [False, False]
    finally:
        b.close()


def test_gpu_lost_at_start_balances_nvml_init(fake: FakeNvml) -> None:
    """NVML initialises but the device count fails (GPU lost at start): the backend shuts NVML
    down again, so the retry starts clean."""

    def lost() -> int:
        raise fake._error("GpuIsLost")

    count = fake.module.nvmlDeviceGetCount
    fake.module.nvmlDeviceGetCount = lost
    b = NvmlBackend(fake.module, proc_root="/nonexistent")
    with pytest.raises(NvmlUnavailableError) as info:
        b.open()
    assert info.value.detail == "GPU is lost"
    assert (fake.initialized, fake.shutdowns) == (0, 1)
    fake.module.nvmlDeviceGetCount = count
    b.open()
    assert fake.initialized == 1
    b.close()


def test_mig_instances_memory_and_processes(proc_root: str) -> None:
    fake = FakeNvml.load("nvml_h100_mig.json")
    b = NvmlBackend(fake.module, proc_root=proc_root, events=False)
    b.open()
    (g,) = b.inventory().gpus
    assert g.mig_mode is True
    assert [(m.gpu_instance_id, m.compute_instance_id, m.profile) for m in g.mig_instances] == [
        (1, 0, "3g.40gb"),
        (9, 0, "1g.10gb"),
    ]
    assert g.mig_instances[1].uuid == "MIG-5d2a8f10-c3b7-5e49-8a06-7f1c9e2b4d33"
    assert g.mig_instances[1].mem_total_bytes == 9856 << 20
    (s,) = b.sample()
    assert [(m.gpu_instance_id, m.mem_used_bytes, m.util_gpu_pct) for m in s.mig] == [
        (1, 28672 << 20, None),  # NVML gives no utilisation for a MIG device: absent, not an error
        (9, 1024 << 20, None),
    ]
    assert [(p.pid, p.gpu_instance_id, p.compute_instance_id) for p in s.processes] == [
        (4242, 1, 0),
        (4243, 9, 0),
    ]
    assert s.util_gpu_pct is None
    assert b.nvml_errors == 0
    frame = SampleFrame(host="h", provider="p", boot_id="b", gpus=(s,))
    assert decode(encode(frame)) == frame
    # MIG turned off: the instances go
    fake.set_call(0, "nvmlDeviceGetMigMode", [0, 0])
    assert b.inventory().gpus[0].mig_instances == ()
    assert b.sample()[0].mig == ()
    b.close()


def test_without_mig_processes_have_no_instance(backend: NvmlBackend) -> None:
    s0, _ = backend.sample()
    assert s0.processes
    assert {(p.gpu_instance_id, p.compute_instance_id) for p in s0.processes} == {(None, None)}
    assert backend.inventory().gpus[0].mig_instances == ()
