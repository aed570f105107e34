"""End to end from the kernel's own interfaces: a real agent (recorded NVML, 2 × H100) reads
InfiniBand ports from an H100-shaped sysfs tree (tests/sysfs_ib.py) and the kernel log from a file,
publishes to a real nats-server; the collector (PostgreSQL, both engines) notifies a webhook.
A port taken down in sysfs and a fatal SXid line appended to the log each give their alert,
and the port's alert resolves when the port is back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent.gpu.nvml import NvmlBackend
from agent.node import NodeSource
from agent.service import AgentService
from agent.system import PsutilSystem
from gpuwarden.servers import NatsServer
from shared.config import (
    AgentConfig,
    AgentSection,
    NatsConfig,
    NetworkChecksConfig,
    NodeConfig,
    SimulateConfig,
)
from tests.support.collector import Receiver, collector, webhook_toml, write_config
from tests.support.fake_pynvml import FakeNvml
from tests.support.sysfs_ib import write_tree
from tests.support.wait import until

CONFIG = """
[alerts]
for = "1s"
[health]
stale_after = "5s"
"""
SXID = "[ 812.5] nvidia-nvswitch2: SXid (PCI:0000:07:00.0): 20034, Fatal, Link 28 LTSSM Fault Up\n"


def alerts(rx: Receiver, name: str) -> list[dict[str, Any]]:
    return [a for body in rx.bodies() for a in body["alerts"] if a["labels"]["alertname"] == name]


async def test_a_real_agent_port_down_and_sxid_alert_and_resolve(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    tree = write_tree(tmp_path / "sys")
    port = tree / "class/infiniband/mlx5_4/ports/1"
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    host = "node-e2e-1"
    agent_cfg = AgentConfig(
        agent=AgentSection(host=host, provider="p", interval=0.5, kmsg=True, kmsg_path=str(kmsg)),
        nats=NatsConfig(servers=(private_nats.url,), reconnect_wait=0.2, publish_timeout=2.0),
        network=NetworkChecksConfig(nats_rtt=False),
        simulate=SimulateConfig(),
    )
    node = NodeSource(NodeConfig(sys_root=str(tree), services_every=0, dstate_every=0))
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, private_nats.url, CONFIG + webhook_toml(rx.url))
        async with collector(cfg) as col:
            svc = AgentService(
                agent_cfg,
                NvmlBackend(FakeNvml.load().module, proc_root="/nonexistent"),
                PsutilSystem(host, node=node),
            )
            task = asyncio.create_task(svc.serve(signals=False))
            try:
                assert await svc.publisher.wait_connected(10)
                await until(lambda: host in col.parts.live.current().hosts, 20)  # judged healthy first
                (port / "state").write_text("1: DOWN\n")
                (port / "phys_state").write_text("3: Disabled\n")
                with kmsg.open("a") as f:
                    f.write(SXID)
                await until(lambda: bool(alerts(rx, "host.ib_port")) and bool(alerts(rx, "host.sxid")), 30)
                (port / "state").write_text("4: ACTIVE\n")
                (port / "phys_state").write_text("5: LinkUp\n")
                await until(lambda: any(a["status"] == "resolved" for a in alerts(rx, "host.ib_port")), 30)
            finally:
                svc.stop()
                await task
    ib = alerts(rx, "host.ib_port")
    assert [a["status"] for a in ib] == ["firing", "resolved"]
    assert ib[0]["labels"]["port"] == "mlx5_4/1"
    assert ib[0]["labels"]["severity"] == "critical"
    assert ib[0]["labels"]["host"] == host
    assert "cable" in ib[0]["annotations"]["summary"]
    sx = alerts(rx, "host.sxid")
    assert sx[0]["status"] == "firing"
    assert (sx[0]["labels"]["sxid"], sx[0]["labels"]["severity"]) == ("20034", "critical")
    assert (
        "LTSSM Fault Up" in sx[0]["annotations"]["summary"] or "NVSwitch" in sx[0]["annotations"]["summary"]
    )
    # the other ports and the RoCE bond stayed quiet
    assert {a["labels"]["port"] for a in ib} == {"mlx5_4/1"}
