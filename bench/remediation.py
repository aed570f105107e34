"""Time from fault to Slurm node drained.

A private Slurm (``gpuwarden.slurm.PrivateSlurm``, the test fixture: munged + slurmctld,
nodes named after the simulated hosts), private nats-server and PostgreSQL, the collector in
this process with one remediation rule in ``auto`` mode (``slurm_drain`` on a fatal XID), and
an in-process fleet (``BENCH_REMEDIATION_HOSTS`` hosts, default 100, x 8 GPUs at 1 s) in
which ``K`` hosts get an XID 79, staggered by 0.5 s after a warm-up.

The fault's time is the ``ts`` of the XID event frame (this process taps the event subject);
drained is when ``scontrol update ... State=DRAIN`` returned (the ``step_ok`` audit record
of the drain, written right after it), checked afterwards against ``sinfo -R`` (every faulty
node DRAIN with gpuwarden's reason). The path: agent -> NATS -> collector -> health and
alert engines -> remediation plan (persisted) -> scontrol -> slurmctld.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

from bench._util import pct, start_collector, stop_collector

HOSTS = int(os.environ.get("BENCH_REMEDIATION_HOSTS", "100"))
K = int(os.environ.get("BENCH_REMEDIATION_FAULTS", "20"))
WARMUP = 8.0
STAGGER = 0.5
Row = tuple[str, str, str]


async def _measure(slurm: Any) -> dict[str, Any]:
    import nats

    from agent.fleet import Fleet, host_name
    from collector.remediation import store
    from gpuwarden.servers import NatsServer, PostgresServer
    from shared.config import NatsConfig
    from shared.frames import EventFrame, decode

    faulty = [host_name(1 + 3 * i) for i in range(K)]
    specs = [f"{h}/gpu2:xid=79@{WARMUP + i * STAGGER}s" for i, h in enumerate(faulty)]
    seen: dict[str, float] = {}

    async def tap(msg: Any) -> None:
        host = msg.subject.rsplit(".", 1)[-1]
        if host in seen or host not in faulty:
            return
        f = decode(msg.data)
        if isinstance(f, EventFrame) and f.xid == 79:
            seen[host] = f.ts

    with NatsServer() as ns, PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        toml = f"""
[notify.log]
enabled = false
[remediation]
max_running = 8
[remediation.breaker]
max_share = 1.0
max_hosts = 100000
[remediation.slurm]
conf = "{slurm.conf}"
[[remediation.rule]]
name = "fatal-xid"
match = ["rule=gpu.xid", "action=~drain_.*"]
mode = "auto"
  [[remediation.rule.step]]
  kind = "slurm_drain"
"""
        svc, run = await start_collector(tmp, toml, pg.dsn(), ns.url)
        nc = await nats.connect(ns.url)
        await nc.subscribe("gpuwarden.v1.event.>", cb=tap)
        fleet = Fleet(NatsConfig(servers=(ns.url,)), hosts=HOSTS, gpus=8, interval=1.0, faults=specs)
        await fleet.start()
        duration = WARMUP + K * STAGGER + 10
        frun = asyncio.create_task(fleet.run(duration=duration))
        drained: dict[str, float] = {}
        t0 = time.time()
        try:
            while time.time() - t0 < duration + 20 and len(drained) < K:
                await asyncio.sleep(0.5)
                assert svc.pool is not None
                async with svc.pool.acquire() as conn:
                    acts = {a["id"]: a["host"] for a in await store.list_actions(conn, limit=1000)}
                    for e in await store.audit(conn, limit=10000):
                        if e["event"] == "step_ok" and e["step"] == "slurm_drain" and e["action_id"] in acts:
                            drained.setdefault(acts[e["action_id"]], e["at"])
        finally:
            fleet.stop()
            await frun
            await fleet.close()
            await nc.drain()
            await stop_collector(svc, run)
    reasons = slurm.reasons()
    ok = sum(1 for h in faulty if reasons.get(h, "").startswith("gpuwarden: fatal-xid"))
    lat = [drained[h] - seen[h] for h in drained if h in seen]
    return {"lat": lat, "in_sinfo": ok, "missed": K - len(lat)}


def run() -> list[Row]:
    from agent.fleet import host_name
    from gpuwarden.slurm import PrivateSlurm, available

    why = available()
    if why is not None:
        return [("remediation: fault -> Slurm node drained", f"skipped: {why}", "")]
    with PrivateSlurm([host_name(i) for i in range(HOSTS)]) as slurm:
        r = asyncio.run(_measure(slurm))
    lat = r["lat"]
    return [
        (
            f"remediation: fault (XID 79 event) -> Slurm node drained (auto) p50 / p99 / max, n={len(lat)}"
            f" ({HOSTS} hosts x 8 GPUs at 1 s)",
            f"{pct(lat, 50):.3f} / {pct(lat, 99):.3f} / {max(lat, default=float('nan')):.3f} s",
            "p99 < 1 s",
        ),
        (
            "remediation: faulty nodes DRAIN with gpuwarden's reason in sinfo -R",
            f"{r['in_sinfo']} of {K}",
            str(K),
        ),
    ]
