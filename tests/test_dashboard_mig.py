"""The host page in a real headless Chromium shows a GPU's MIG devices (profile, instance ids,
memory) and which MIG instance each process runs in, from the frames an agent publishes."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from collector.api import make_app
from collector.config import load_collector_config
from gpuwarden.servers import NatsServer
from shared.frames import (
    GpuInfo,
    GpuProcess,
    GpuSample,
    InventoryFrame,
    MigInstance,
    MigSample,
    SampleFrame,
)
from tests.support.browser import browser_page
from tests.support.collector import collector, send
from tests.support.wait import until

GIB = 1 << 30
HOST = "mig-node-1"


def frames(now: float) -> list[InventoryFrame | SampleFrame]:
    head = {"host": HOST, "provider": "p", "boot_id": "b"}
    info = GpuInfo(
        index=0,
        uuid="GPU-0",
        name="NVIDIA H100 80GB HBM3",
        mig_mode=True,
        mig_instances=(
            MigInstance(1, 0, "3g.40gb", "MIG-a", 40 * GIB),
            MigInstance(9, 0, "1g.10gb", "MIG-b", 10 * GIB),
        ),
    )
    gpu = GpuSample(
        index=0,
        uuid="GPU-0",
        temp_c=50.0,
        mem_total_bytes=80 * GIB,
        mem_used_bytes=30 * GIB,
        mig=(MigSample(1, 0, 40 * GIB, 28 * GIB), MigSample(9, 0, 10 * GIB, 2 * GIB)),
        processes=(GpuProcess(pid=4242, name="train.py", gpu_instance_id=1, compute_instance_id=0),),
    )
    return [
        InventoryFrame(**head, seq=1, ts=now - 2, backend="nvml", driver_version="570.133.20", gpus=(info,)),
        SampleFrame(**head, seq=2, ts=now - 1, interval_s=1.0, gpus=(gpu,)),
    ]


@pytest.mark.timeout(120)
async def test_host_page_shows_mig_devices_and_their_processes(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    path = tmp_path / "collector.toml"
    path.write_text(
        f"""
[collector]
fetch_timeout = "100ms"
durable = "mig{uuid.uuid4().hex[:8]}"
[alerting]
tick = "200ms"
"""
    )
    cfg = load_collector_config(
        path, env={}, flags={"postgres.dsn": pg_dsn, "nats.servers": [private_nats.url]}
    )
    console: list[str] = []
    async with collector(cfg) as svc:
        await send(private_nats.url, frames(time.time()))
        await until(lambda: (h := svc.state.host(HOST)) is not None and h.sample is not None, timeout=30)
        async with (
            TestServer(make_app(svc.parts.api_deps)) as server,
            browser_page(tmp_path, console) as page,
        ):
            await page.goto(str(server.make_url(f"/#/host/{HOST}")))
            cell = page.locator("#gpus tbody tr").first.locator("td").first
            await cell.locator(".mig").first.wait_for(timeout=20_000)
            migs = await cell.locator(".mig").all_inner_texts()
            assert [" ".join(m.split()) for m in migs] == [
                "MIG 3g.40gb GI 1/CI 0: 28.0 / 40.0 GiB · 1 proc",
                "MIG 1g.10gb GI 9/CI 0: 2.0 / 10.0 GiB",
            ]
            row = await page.locator("#gpus tbody tr").first.inner_text()
            assert "[GI 1/CI 0]" in row
    assert console == []
