"""Representative frames shared by the agent's and the collector's tests (one source of truth)."""

from __future__ import annotations

from typing import Any

from collector.health.gpu_signals import FABRIC_COMPLETED, GPU_IDLE
from shared.frames import (
    AgentStats,
    CheckResult,
    DiskUsage,
    EventFrame,
    GpuInfo,
    GpuProcess,
    GpuSample,
    HostFacts,
    InventoryFrame,
    NicCounters,
    SampleFrame,
    SystemSample,
)

TS = 1_790_000_000.0

# What every healthy GPU fixture (tests and bench) shares: no error counter moving, every link up.
QUIET_GPU: dict[str, object] = dict(
    ecc_sbe_volatile=0,
    ecc_dbe_volatile=0,
    remap_pending=False,
    remap_failure=False,
    pcie_replay_count=0,
    pcie_link_gen=5,
    pcie_link_width=16,
    nvlink_links_total=18,
    nvlink_links_up=18,
    nvlink_crc_errors=0,
    nvlink_replay_errors=0,
    nvlink_recovery_errors=0,
    recovery_action=0,
    persistence_mode=True,
)


def quiet_gpu(**fields: object) -> GpuSample:
    """A ``GpuSample`` of ``QUIET_GPU`` with ``fields`` on top."""
    return GpuSample(**{**QUIET_GPU, **fields})  # type: ignore[arg-type]


def gpu(index: int, **over: object) -> GpuSample:
    base: dict[str, object] = dict(
        QUIET_GPU,
        index=index,
        uuid=f"GPU-{index:08x}-0000-0000-0000-000000000000",
        util_gpu_pct=87.0,
        util_mem_pct=41.0,
        mem_total_bytes=85_899_345_920,
        mem_used_bytes=61_203_283_968,
        mem_reserved_bytes=536_870_912,
        temp_c=64.0,
        mem_temp_c=71.0,
        temp_slowdown_c=87.0,
        temp_shutdown_c=92.0,
        temp_max_operating_c=85.0,
        power_w=512.3,
        power_limit_w=700.0,
        energy_j=123_456_789.0,
        pstate=0,
        clock_sm_mhz=1980,
        clock_mem_mhz=2619,
        clock_event_reasons=0,
        throttle_thermal_ns=0,
        throttle_power_ns=1_500_000,
        ecc_enabled=True,
        ecc_sbe_aggregate=3,
        ecc_dbe_aggregate=0,
        retired_pages_sbe=None,  # Hopper remaps rows instead of retiring pages
        retired_pages_dbe=None,
        retired_pages_pending=None,
        remapped_rows_correctable=0,
        remapped_rows_uncorrectable=0,
        pcie_link_gen_max=5,
        pcie_link_width_max=16,
        processes=(GpuProcess(pid=4242, name="python", used_mem_bytes=60_000_000_000, container="job_1234"),),
    )
    base.update(over)
    return GpuSample(**base)  # type: ignore[arg-type]


# What the GPU checks read that gpu() does not report (a limit, the fan, the NVSwitch fabric,
# per-link NVLink counters): with it every GPU check judges the GPU, healthy.
JUDGED: dict[str, object] = {
    "clock_event_reasons": GPU_IDLE,
    "temp_mem_max_c": 95.0,
    "clock_sm_app_mhz": 1980,
    "fan_pct": 40.0,
    "fabric_state": FABRIC_COMPLETED,
    "fabric_status": 0,
    "fabric_health_mask": 0,
    "nvlink_crc_by_link": (0, 0),
    "nvlink_replay_by_link": (0, 0),
}


def judged_gpu(index: int, uuid: str, **fields: object) -> GpuSample:
    """GPU ``index`` (``uuid``) of :func:`gpu` with :data:`JUDGED` and ``fields`` on top: the pure
    engines' tests start from it and change what their case is about."""
    return gpu(index, **{**JUDGED, "uuid": uuid, **fields})


def sample(
    host: str = "gpu-node-17", provider: str = "acme-east", seq: int = 1, gpus: int = 8
) -> SampleFrame:
    return SampleFrame(
        host=host,
        provider=provider,
        boot_id="3f2a9c1d00000000",
        seq=seq,
        ts=TS + seq,
        interval_s=5.0,
        gpus=tuple(gpu(i) for i in range(gpus)),
        system=SystemSample(
            cpu_pct=12.5,
            cpu_count=128,
            load_1=9.1,
            load_5=8.7,
            load_15=8.2,
            mem_total_bytes=2_164_000_000_000,
            mem_available_bytes=1_900_000_000_000,
            swap_total_bytes=0,
            swap_used_bytes=0,
            fds_open=10_240,
            fds_max=9_223_372_036_854_775_807,
            uptime_s=864_000.0,
            disks=(DiskUsage(mount="/", total_bytes=1 << 40, used_bytes=1 << 38, free_bytes=3 << 38),),
            nics=(NicCounters(name="ens1", up=True, speed_mbps=400_000, rx_bytes=10, tx_bytes=20),),
        ),
        checks=(
            CheckResult(
                id="tcp:storage-1:2049", kind="tcp", target="storage-1:2049", ok=True, latency_ms=0.4
            ),
        ),
        agent=AgentStats(version="0.1.0", backend="nvml", uptime_s=60.0, cpu_s=0.2, rss_bytes=40_000_000),
    )


def xid_frame(host: str, seq: int, ts: float, provider: str, boot_id: str, **fields: Any) -> EventFrame:
    """An XID event frame of ``host``'s agent run ``boot_id``: XID 79 on GPU 2 unless ``fields``
    (``xid``, ``gpu_index``, ``gpu_uuid``, ``message``...) say otherwise."""
    return EventFrame(
        host=host,
        provider=provider,
        boot_id=boot_id,
        seq=seq,
        ts=ts,
        type="xid",
        **{"gpu_index": 2, "xid": 79, **fields},
    )


def event(seq: int = 2, xid: int = 79) -> EventFrame:
    return xid_frame(
        "gpu-node-17",
        seq,
        TS + seq,
        "acme-east",
        "3f2a9c1d00000000",
        source="nvml",
        gpu_uuid="GPU-00000002-0000-0000-0000-000000000000",
        xid=xid,
        count=1,
        message="GPU has fallen off the bus.",
    )


def inventory(seq: int = 0, gpus: int = 8) -> InventoryFrame:
    return InventoryFrame(
        host="gpu-node-17",
        provider="acme-east",
        boot_id="3f2a9c1d00000000",
        seq=seq,
        ts=TS,
        backend="nvml",
        driver_version="580.95.05",
        cuda_version="13.0",
        nvml_version="13.580.95.05",
        gpus=tuple(
            GpuInfo(
                index=i,
                uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000",
                name="NVIDIA H100 80GB HBM3",
                serial=None,
                pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
                mem_total_bytes=85_899_345_920,
                mig_mode=False,
                persistence_mode=True,
                unsupported=("retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending"),
            )
            for i in range(gpus)
        ),
        host_facts=HostFacts(
            hostname="gpu-node-17", os="Ubuntu 22.04.4 LTS", kernel="5.15.0-105-generic", cpu_count=128
        ),
    )
