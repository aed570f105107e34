"""MIG devices on the host page: the inventory's instances with the sample's memory and the
processes attributed to each (the view behind GET /api/v1/hosts/{host})."""

from __future__ import annotations

from collector.api.views import host_detail
from collector.state import FleetState
from shared.frames import GpuInfo, GpuProcess, GpuSample, InventoryFrame, MigInstance, MigSample, SampleFrame

GIB = 1 << 30


def test_host_page_shows_mig_instances_memory_and_processes() -> None:
    info = GpuInfo(
        index=0,
        uuid="GPU-0",
        mig_mode=True,
        mig_instances=(
            MigInstance(1, 0, "3g.40gb", "MIG-a", 40 * GIB),
            MigInstance(9, 0, "1g.10gb", "MIG-b", 10 * GIB),
        ),
    )
    sample = GpuSample(
        index=0,
        uuid="GPU-0",
        mig=(MigSample(1, 0, 40 * GIB, 28 * GIB), MigSample(9, 0, 10 * GIB, 1 * GIB)),
        processes=(
            GpuProcess(pid=10, gpu_instance_id=1, compute_instance_id=0),
            GpuProcess(pid=11, gpu_instance_id=1, compute_instance_id=0),
            GpuProcess(pid=12),
        ),
    )
    fleet = FleetState()
    fleet.apply(
        [
            InventoryFrame(host="n", provider="p", boot_id="b", seq=1, ts=1.0, gpus=(info,)),
            SampleFrame(host="n", provider="p", boot_id="b", seq=2, ts=2.0, gpus=(sample,)),
        ]
    )
    (gpu,) = host_detail("n", None, fleet.host("n"), {})["gpu_list"]
    assert gpu["mig"] == [
        {
            "gpu_instance_id": 1,
            "compute_instance_id": 0,
            "profile": "3g.40gb",
            "uuid": "MIG-a",
            "mem_total_bytes": 40 * GIB,
            "mem_used_bytes": 28 * GIB,
            "util_gpu_pct": None,
            "pids": [10, 11],
        },
        {
            "gpu_instance_id": 9,
            "compute_instance_id": 0,
            "profile": "1g.10gb",
            "uuid": "MIG-b",
            "mem_total_bytes": 10 * GIB,
            "mem_used_bytes": 1 * GIB,
            "util_gpu_pct": None,
            "pids": [],
        },
    ]
    assert [(p["pid"], p["gpu_instance_id"]) for p in gpu["processes"]] == [(10, 1), (11, 1), (12, None)]


def test_no_mig_is_an_empty_list() -> None:
    fleet = FleetState()
    fleet.apply([SampleFrame(host="n", provider="p", boot_id="b", seq=1, ts=1.0, gpus=(GpuSample(index=0),))])
    (gpu,) = host_detail("n", None, fleet.host("n"), {})["gpu_list"]
    assert gpu["mig"] == []
