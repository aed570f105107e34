"""Frames with realistic values (8 GPUs, system metrics) for the store, ingest and end-to-end tests."""

from __future__ import annotations

from collector.config import CollectorConfig, load_collector_config
from shared.frames import (
    AgentStats,
    CheckResult,
    ClockSync,
    DiskUsage,
    EventFrame,
    GpuInfo,
    GpuProcess,
    GpuSample,
    IbPort,
    InventoryFrame,
    KernelLogCount,
    ModuleState,
    NicCounters,
    SampleFrame,
    ServiceState,
    SystemSample,
)
from tests.support.frame_fixtures import xid_frame


def gpu_sample(host: str, i: int, seq: int) -> GpuSample:
    return GpuSample(
        index=i,
        uuid=f"GPU-{host}-{i}",
        util_gpu_pct=float((seq * 7 + i) % 101),
        util_mem_pct=float((seq * 3 + i) % 101),
        mem_total_bytes=80 * 2**30,
        mem_used_bytes=((seq + i) % 80) * 2**30,
        temp_c=30.0 + (seq + i) % 50 + 0.25,
        temp_slowdown_c=87.0,
        power_w=100.5 + i * 10 + seq % 7,
        power_limit_w=700.0,
        energy_j=1e6 + seq,
        pstate=0,
        clock_sm_mhz=1410 + i,
        clock_event_reasons=0,
        ecc_enabled=True,
        ecc_sbe_volatile=seq,
        ecc_dbe_volatile=0,
        retired_pages_pending=False,
        pcie_replay_count=None,  # not supported: stays NULL
        nvlink_crc_errors=(1 << 62) + seq,
        processes=(GpuProcess(pid=100 + i, name="python", used_mem_bytes=2**30, container="job-7"),)
        if i == 0
        else (),
    )


def sample(
    host: str,
    seq: int,
    ts: float,
    *,
    provider: str = "prov-a",
    boot: str = "boot-1",
    gpus: int = 8,
    system: bool = True,
) -> SampleFrame:
    return SampleFrame(
        host=host,
        provider=provider,
        boot_id=boot,
        seq=seq,
        ts=ts,
        interval_s=1.0,
        gpus=tuple(gpu_sample(host, i, seq) for i in range(gpus)),
        system=SystemSample(
            cpu_pct=12.5,
            cpu_count=64,
            load_1=1.0,
            mem_total_bytes=2**40,
            mem_available_bytes=2**39,
            disks=(
                DiskUsage(
                    mount="/",
                    total_bytes=10**12,
                    used_bytes=10**11,
                    free_bytes=9 * 10**11,
                    readonly=False,
                    inodes_total=10**8,
                    inodes_used=10**6 + seq,
                ),
            ),
            nics=(NicCounters(name="eth0", up=True, rx_bytes=seq),),
            # the node part (issue 14) is stored in detail.node and read back equal; healthy, so
            # that the many tests built on these frames see no node alert (a RoCE port: no
            # InfiniBand port count or rate expected of it; counts that do not move)
            ib_ports=(
                IbPort(
                    "mlx5_bond_0", 1, "ACTIVE", "LinkUp", 200.0, "Ethernet", symbol_error=3, link_downed=0
                ),
            ),
            kernel_log=(KernelLogCount("sxid", 12028, 2, False, "nvidia-nvswitch0: SXid ..."),),
            modules=(ModuleState("nvidia", True),),
            services=(ServiceState("nvidia-persistenced", "loaded", "active", "running"),),
            clock=ClockSync(True, 0.0005, 0.01, "adjtimex"),
            dstate_procs=0,
            dstate_names=(),
            absent=("nvswitch",),
        )
        if system
        else None,
        checks=(CheckResult(id="nats_rtt", kind="nats_rtt", target="nats", ok=True, latency_ms=0.4),),
        agent=AgentStats(version="0.1.0", backend="simulated", published_frames=seq),
    )


def event(host: str, seq: int, ts: float, *, provider: str = "prov-a", xid: int = 79) -> EventFrame:
    return xid_frame(
        host,
        seq,
        ts,
        provider,
        "boot-1",
        source="simulated",
        gpu_uuid=f"GPU-{host}-2",
        xid=xid,
        count=seq,
        message="GPU has fallen off the bus",
    )


def inventory(host: str, seq: int, ts: float, *, provider: str = "prov-a", gpus: int = 8) -> InventoryFrame:
    return InventoryFrame(
        host=host,
        provider=provider,
        boot_id="boot-1",
        seq=seq,
        ts=ts,
        backend="simulated",
        driver_version="550.54.15",
        gpus=tuple(
            GpuInfo(index=i, uuid=f"GPU-{host}-{i}", name="NVIDIA H100 80GB HBM3", serial=f"S{i}")
            for i in range(gpus)
        ),
    )


def make_config(dsn: str, **flags: object) -> CollectorConfig:
    return load_collector_config(env={}, flags={"postgres.dsn": dsn, **flags})
