"""XID -> webhook while PostgreSQL is down (fail-open paging, issue 16).

A ``gpuwarden fleet`` subprocess (``BENCH_OUTAGE_HOSTS`` hosts x 8 GPUs at 1 s, default 200)
publishes to a private nats-server; the collector (in this process) stores into a private
PostgreSQL and notifies a local webhook. After a warm-up PostgreSQL is stopped (SIGQUIT, a
crash); during the outage ``K`` hosts get an XID 79, staggered by 0.5 s. The latency is the
webhook's arrival minus the XID event frame's ``ts`` (tapped on core NATS), for the XIDs
delivered while PostgreSQL was still down. Then PostgreSQL is started again and the run checks
what the outage left behind: host alerts and provider incidents raised since it began (goal:
none; a loaded machine can raise some during the warm-up, before it, which do not count), the collector's
own alert (one, resolved), and the XIDs' notifications in the outbox (each once, ``sent``).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from typing import Any

from bench._util import pct, spawn, start_collector, stop, stop_collector, told, webhook

HOSTS = int(os.environ.get("BENCH_OUTAGE_HOSTS", "200"))
K = int(os.environ.get("BENCH_OUTAGE_XIDS", "20"))
WARMUP = 15.0
XIDS_AT = WARMUP + 4.0  # after PostgreSQL went down at WARMUP
STAGGER = 0.5
PG_DOWN_S = 4.0 + K * STAGGER + 8.0
Row = tuple[str, str, str]


async def _measure() -> dict[str, Any]:
    import asyncpg
    import nats
    from aiohttp import web

    from gpuwarden.servers import NatsServer, PostgresServer
    from shared.frames import EventFrame, decode

    # spread over the 4 providers (5 of 50 hosts each at the defaults): below the provider-incident
    # share, so any provider incident would be the outage's
    xid_hosts = {f"host-{i + 1:04d}" for i in range(K)}
    specs = [f"host-{i + 1:04d}/gpu2:xid=79@{XIDS_AT + i * STAGGER}s" for i in range(K)]
    seen: dict[str, float] = {}
    hooks: list[tuple[float, Any]] = []  # (arrival, POSTed JSON)
    rules: list[tuple[str, str]] = []
    pg_up_at = [float("inf")]

    async def hook(request: web.Request) -> web.Response:
        t = time.time()
        body = json.loads(await request.read())
        hooks.append((t, body))
        for a in body["alerts"]:
            rules.append((a["status"], a["labels"]["alertname"]))
        return web.Response()

    async def tap(msg: Any) -> None:
        host = msg.subject.rsplit(".", 1)[-1]
        if host in xid_hosts and host not in seen:
            f = decode(msg.data)
            if isinstance(f, EventFrame) and f.xid == 79:
                seen[host] = f.ts

    runner, port = await webhook(hook)
    with NatsServer() as ns, PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        toml = f"""
[alerting]
spool = "{tmp}/spool"
[notify.log]
enabled = false
[[notify.webhook]]
name = "bench"
url = "http://127.0.0.1:{port}/hook"
"""
        svc, run = await start_collector(tmp, toml, pg.dsn(), ns.url)
        nc = await nats.connect(ns.url)
        await nc.subscribe("gpuwarden.v1.event.>", cb=tap)
        duration = WARMUP + PG_DOWN_S + 25
        args = ["fleet", "--hosts", str(HOSTS), "--gpus", "8", "--providers", "4", "--interval", "1s"]
        args += ["--nats", ns.url, "--duration", f"{duration}s", "--log-level", "warning"]
        for s in specs:
            args += ["--fault", s]
        proc = spawn(*args)
        t0 = time.time()
        outcome: dict[str, Any] = {}
        down_at = float("inf")
        try:
            await asyncio.sleep(WARMUP)
            down_at = time.time()
            await asyncio.to_thread(pg.stop, "immediate")
            await asyncio.sleep(PG_DOWN_S)
            outcome["during"] = raised(svc, down_at)
            pg_up_at[0] = time.time()
            await asyncio.to_thread(pg.start)
            while time.time() - t0 < duration:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        finally:
            stop(proc)
            outcome["after"] = raised(svc, down_at)
            await nc.drain()
            await stop_collector(svc, run)
            await runner.cleanup()
            c = await asyncpg.connect(pg.dsn())
            try:
                outcome["outbox"] = [
                    (r["status"], r["n"])
                    for r in await c.fetch(
                        "SELECT status, count(*) AS n FROM notification_outbox"
                        " WHERE channel = 'bench' AND payload->>'rule' = 'gpu.xid'"
                        " AND payload->>'kind' = 'firing'"
                        " GROUP BY status ORDER BY status"
                    )
                ]
            finally:
                await c.close()
    # an XID is told on its own, or by a provider incident it joined (the census of a provider's
    # hosts is those judged so far: on a loaded machine, 5 XIDs of a provider can be its 20 %)
    got = {h: t for h, (t, _) in told(hooks, dict.fromkeys(xid_hosts, "gpu.xid")).items()}
    down = [got[h] - seen[h] for h in got if h in seen and got[h] < pg_up_at[0]]
    return {**outcome, "down": down, "missed": K - len(got), "rules": rules}


def raised(svc: Any, since: float) -> dict[str, Any]:
    """Host alerts and provider incidents that began at or after ``since`` (the outage)."""
    alerts = {
        a.rule for a in svc.alerting.list_alerts() if a.rule.startswith("host.") and a.started_at >= since
    }
    incidents = [i for i in svc.alerting.list_incidents() if i["host"] is None and i["opened_at"] >= since]
    return {"host_alerts": sorted(alerts), "provider_incidents": len(incidents)}


def run() -> list[Row]:
    r = asyncio.run(_measure())
    down, rules = r["down"], r["rules"]
    own = [s for s, n in rules if n == "collector.pipeline"]
    return [
        (
            f"PostgreSQL down: XID 79 -> webhook p50 / p99 / max, n={len(down)} (of {K} during the outage)",
            f"{pct(down, 50):.3f} / {pct(down, 99):.3f} / {max(down, default=float('nan')):.3f} s",
            "p99 < 1 s, all delivered while down",
        ),
        (
            f"PostgreSQL down {PG_DOWN_S:.0f} s under {HOSTS} hosts x 8 GPUs at 1 s: host alerts / provider "
            "incidents raised (during; after it is back)",
            f"{r['during']['host_alerts'] or 'none'} / {r['during']['provider_incidents']}; "
            f"{r['after']['host_alerts'] or 'none'} / {r['after']['provider_incidents']}",
            "none / 0",
        ),
        (
            "PostgreSQL down: the collector's own alert (webhook)",
            ", ".join(own) or "none",
            "firing, resolved",
        ),
        (
            "PostgreSQL down: XID notifications in the outbox afterwards (status, count)",
            str(r["outbox"]),
            f"[('sent', {K})]",
        ),
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
