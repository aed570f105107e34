"""``gpuwarden demo``: everything on one machine, in one command.

Starts a private nats-server (JetStream) and PostgreSQL in temporary directories, the collector
in this process (migrations, ingest, health and alerts, the API and dashboard on a local port,
an API token generated for this run) and a simulated fleet (3 providers, 60 hosts, 8 GPUs each
by default) with a scripted stream of faults over the first minutes. Ctrl-C (or SIGTERM) stops
the fleet, the collector and both servers, and removes the temporary directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from agent.fleet import Fleet
from collector.config import load_collector_config
from collector.service import CollectorService
from gpuwarden.servers import NatsServer, PostgresServer
from shared.config import NatsConfig
from shared.tasks import stop_on_signals

log = logging.getLogger(__name__)

# (fault spec, what the operator sees): staggered so the page changes over the first minutes
SCRIPT: Final = (
    ("host-0027:nvml_init_fail@0s+150s", "NVML cannot initialise for 150 s: a driver alert, not down"),
    ("host-0001/gpu2:xid=79@10s", "XID 79: a GPU falls off the bus (critical, drain and reboot)"),
    ("host-0005/gpu0:temp=94@20s+90s", "a GPU runs hot at 94 C for 90 s, then cools down"),
    ("host-0012:host_down@35s+45s", "a host stops reporting for 45 s (unreachable, 8 GPUs unknown)"),
    ("host-0020/gpu3:ecc_dbe@50s", "a double-bit ECC error (critical)"),
    ("host-0031/gpu5:ecc_sbe=200@65s+120s", "a burst of single-bit ECC errors"),
    ("host-0042/gpu1:throttle=hw_slowdown@80s+60s", "hardware slowdown throttling"),
    ("host-0047/gpu6:row_remap_fail@95s", "a row-remapping failure (RMA)"),
    ("host-0033:disk_full@110s+90s", "a host's disk fills up"),
    ("host-0058/gpu7:pcie_replay=900@125s+60s", "PCIe replays above the expected rate"),
    ("host-0050/gpu4:lost@140s", "a GPU is lost"),
    ("host-0014:ib_down=2@155s+90s", "an InfiniBand port goes down for 90 s (its rail is lost)"),
    ("host-0039:sxid=20034@170s", "an NVSwitch logs a fatal SXid (drain and reset the fabric)"),
)
CONFIG: Final = """
[collector]
listen = "{listen}"
batch = 2000
fetch_timeout = "200ms"
durable = "demo"
[api]
tokens = ["{token}"]
[alerting]
tick = "500ms"
health_snapshot = "10s"
[health]
stale_after = "8s"
[alerts]
for = "4s"
"""


def pick_port(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` when it is free (0: any free port), else a free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            bound: int = s.getsockname()[1]
            return bound
    raise OSError("no free port")


def banner(url: str, token: str, nats_url: str, hosts: int, gpus: int, providers: int) -> str:
    faults = "\n".join(f"  {spec:44} {what}" for spec, what in SCRIPT)
    return f"""
gpuwarden demo: {providers} providers, {hosts} hosts x {gpus} GPUs, faults over the first minutes

  dashboard   {url}
  API         {url}api/v1/providers   (OpenAPI: {url}api/v1/openapi.json)
  metrics     {url}metrics
  API token   {token}
              curl -X POST -H 'Authorization: Bearer {token}' {url}api/v1/alerts/<id>/ack

  raw telemetry (MessagePack frames, docs/protocol.md) on {nats_url}:
              nats sub --server {nats_url} 'gpuwarden.v1.>'
              or: python -c "import asyncio, nats; from shared.frames import decode
              async def m():
                  nc = await nats.connect('{nats_url}')
                  await nc.subscribe('gpuwarden.v1.event.>', cb=lambda msg: print(decode(msg.data)))
                  await asyncio.Event().wait()
              asyncio.run(m())"

scripted faults:
{faults}

Ctrl-C stops everything.
"""


async def run_demo(
    *,
    hosts: int = 60,
    gpus: int = 8,
    providers: int = 3,
    interval: float = 2.0,
    port: int = 8080,
    duration: float | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Run the demo until SIGINT/SIGTERM (or ``duration`` seconds)."""
    stop = asyncio.Event()
    with stop_on_signals(stop.set):
        await _demo(stop, hosts, gpus, providers, interval, port, duration, echo)


async def _demo(
    stop: asyncio.Event,
    hosts: int,
    gpus: int,
    providers: int,
    interval: float,
    port: int,
    duration: float | None,
    echo: Callable[[str], None],
) -> None:
    nats_server: NatsServer | None = None
    pg: PostgresServer | None = None
    svc: CollectorService | None = None
    ingest: asyncio.Task[None] | None = None
    fleet: Fleet | None = None
    run: asyncio.Task[None] | None = None
    confdir = Path(tempfile.mkdtemp(prefix="gpuwarden-demo-"))
    try:
        nats_server = NatsServer()
        pg = PostgresServer()
        await asyncio.gather(asyncio.to_thread(nats_server.start), asyncio.to_thread(pg.start))
        token = secrets.token_urlsafe(24)
        listen = f"127.0.0.1:{pick_port(port)}"
        (confdir / "collector.toml").write_text(CONFIG.format(listen=listen, token=token))
        cfg = load_collector_config(
            confdir / "collector.toml",
            env={},
            flags={"postgres.dsn": pg.dsn(), "nats.servers": [nats_server.url]},
        )
        svc = CollectorService(cfg, api=True)
        api = svc.api
        assert api is not None
        await svc.startup()
        ingest = asyncio.create_task(svc.run(), name="ingest")
        fleet = Fleet(
            NatsConfig(servers=(nats_server.url,)),
            hosts=hosts,
            gpus=gpus,
            providers=providers,
            interval=interval,
            faults=[spec for spec, _ in SCRIPT],
        )
        await fleet.start()
        run = asyncio.create_task(fleet.run(duration), name="fleet")
        echo(banner(f"http://127.0.0.1:{api.port}/", token, nats_server.url, hosts, gpus, providers))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({run, waiter, ingest}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    finally:
        echo("demo: stopping")
        if fleet is not None:
            fleet.stop()
            if run is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await run
            await fleet.close(flush_timeout=2.0)
        if svc is not None:
            svc.request_stop()
            if ingest is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(ingest, 30)
            await svc.shutdown()
        for server in (pg, nats_server):
            if server is not None:
                await asyncio.to_thread(server.close)
        shutil.rmtree(confdir, ignore_errors=True)
        echo("demo: stopped")
