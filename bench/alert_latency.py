"""Time from fault to webhook delivery under load.

A ``gpuwarden fleet`` subprocess (``BENCH_ALERT_HOSTS`` hosts x 8 GPUs at 1 s, default
1,000) publishes to a private nats-server; the collector (in this process, with its
alerting) stores every frame in a private PostgreSQL and notifies a local webhook receiver.
``K`` hosts get an XID 79 on GPU 2 and ``K`` others a temperature of 95 °C (a threshold
fault, ``[alerts] for = 5s``), staggered by 0.5 s after a warm-up.

The fault's time is when the agent saw it: the ``ts`` of the XID event frame, or of the
first sample with the GPU at 95 °C (this process taps those subjects on core NATS). The
latency is the webhook's arrival minus that time: agent -> NATS -> collector (stored,
committed) -> health and alert engines -> outbox commit -> HTTP POST. Goals: XID p99 < 0.25 s;
the threshold fault < its ``for`` + ``group_wait`` (2 s here) + 1 s.

Then a provider outage in the same run: ``OUTAGE`` hosts of provider-0 (a quarter of the
fleet) go down at once, and ``OUTAGE_XIDS`` up hosts of provider-0 get an XID 79 during it.
Every notification about provider-0 is counted per incident: the provider incident's first
notification, its updates (and escalations), and any of its hosts told on their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from typing import Any

from bench._util import pct, spawn, start_collector, stop, stop_collector, webhook

HOSTS = int(os.environ.get("BENCH_ALERT_HOSTS", "1000"))
K = int(os.environ.get("BENCH_ALERT_FAULTS", "20"))  # faulty hosts per kind
FOR_S = 5.0
WARMUP = 20.0
STAGGER = 0.5
OUTAGE = int(os.environ.get("BENCH_ALERT_OUTAGE", str(max(3, HOSTS // 16))))  # provider-0 hosts down
OUTAGE_XIDS = 2
GROUP_WAIT = 2.0  # [alerts] group_wait: a first notice (not event-class) waits this long
OUTAGE_AT = WARMUP + K * STAGGER + FOR_S + 5
OUTAGE_S = 25.0
Row = tuple[str, str, str]


def faults() -> tuple[list[str], dict[str, str]]:
    specs, kind = [], {}
    for i in range(K):
        xid_host, temp_host = f"host-{2 * i + 1:04d}", f"host-{2 * i + 2:04d}"
        at = WARMUP + i * STAGGER
        specs += [f"{xid_host}/gpu2:xid=79@{at}s", f"{temp_host}/gpu2:temp=95@{at}s"]
        kind[xid_host], kind[temp_host] = "xid", "temp"
    # provider-0 is hosts 0, 4, 8, ... (4 providers); the outage takes the highest ones
    p0 = [h for h in range(HOSTS - 1, 2 * K + 2, -1) if h % 4 == 0]
    for h in p0[:OUTAGE]:
        specs.append(f"host-{h:04d}:host_down@{OUTAGE_AT}s+{OUTAGE_S}s")
    for h in p0[OUTAGE : OUTAGE + OUTAGE_XIDS]:
        specs.append(f"host-{h:04d}/gpu1:xid=79@{OUTAGE_AT + 8}s")
    return specs, kind


async def _measure(hosts: int) -> dict[str, Any]:
    import nats
    from aiohttp import web

    from gpuwarden.servers import NatsServer, PostgresServer
    from shared.frames import EventFrame, SampleFrame, decode

    specs, kind = faults()
    outage_t = [float("inf")]
    seen: dict[str, float] = {}  # host -> agent time of the fault
    got: dict[str, float] = {}  # host -> webhook arrival

    outage: list[dict[str, Any]] = []  # every notification about provider-0 after the outage began

    async def hook(request: web.Request) -> web.Response:
        t = time.time()
        for a in json.loads(await request.read())["alerts"]:
            if a["labels"].get("provider") == "provider-0" and t >= outage_t[0]:
                outage.append(a)
            host = a["labels"].get("host", "")
            want = {"xid": "gpu.xid", "temp": "gpu.temperature"}.get(kind.get(host, ""))
            if a["status"] == "firing" and a["labels"]["alertname"] == want and host not in got:
                got[host] = t
        return web.Response()

    async def tap(msg: Any) -> None:
        host = msg.subject.rsplit(".", 1)[-1]
        k = kind.get(host)
        if k is None or host in seen:
            return
        f = decode(msg.data)
        if (
            k == "xid"
            and isinstance(f, EventFrame)
            and f.xid == 79
            or (
                k == "temp"
                and isinstance(f, SampleFrame)
                and any(g.index == 2 and (g.temp_c or 0) >= 95 for g in f.gpus)
            )
        ):
            seen[host] = f.ts

    runner, port = await webhook(hook)
    with NatsServer() as ns, PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        toml = f"""

[alerts]
for = "{FOR_S}s"
group_wait = "{GROUP_WAIT}s"
[notify.log]
enabled = false
[[notify.webhook]]
name = "bench"
url = "http://127.0.0.1:{port}/hook"
"""
        svc, run = await start_collector(tmp, toml, pg.dsn(), ns.url)
        nc = await nats.connect(ns.url)
        await nc.subscribe("gpuwarden.v1.event.>", cb=tap)
        await nc.subscribe("gpuwarden.v1.sample.>", cb=tap)
        duration = OUTAGE_AT + 25
        args = ["fleet", "--hosts", str(hosts), "--gpus", "8", "--providers", "4", "--interval", "1s"]
        args += ["--nats", ns.url, "--duration", f"{duration}s", "--log-level", "warning"]
        for s in specs:
            args += ["--fault", s]
        proc = spawn(*args)
        t0, cpu0 = time.time(), time.process_time()
        outage_t[0] = t0 + OUTAGE_AT - 1.0
        try:
            while time.time() - t0 < duration:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        finally:
            stop(proc)
            fired = {
                a.labels.get("host", ""): a.fired_at or 0.0
                for a in svc.alerting.list_alerts()
                if a.rule in ("gpu.xid", "gpu.temperature")
            }
            st = svc.ingest.stats
            figures = {
                "frames_in": st.frames_in,
                "elapsed": time.time() - t0,
                "cpu": time.process_time() - cpu0,
            }
            figures["alerting_s"] = sum(svc.alerting.stats["seconds"].values())
            await nc.drain()
            await stop_collector(svc, run)
            await runner.cleanup()
    lat = {k: [got[h] - seen[h] for h in got if h in seen and kind[h] == k] for k in ("xid", "temp")}
    # the XID path in two parts: agent -> judged and judged -> webhook (outbox commit, POST)
    xids = [h for h in got if h in seen and kind[h] == "xid" and h in fired]
    parts = {"judged": [fired[h] - seen[h] for h in xids], "delivered": [got[h] - fired[h] for h in xids]}
    return {**figures, "lat": lat, "parts": parts, "missed": 2 * K - len(got), "outage": per_incident(outage)}


def per_incident(notes: list[dict[str, Any]]) -> dict[str, Any]:
    """Notifications about provider-0 during the outage: per provider incident, and on their own."""
    incidents: dict[str, list[str]] = {}
    own = []
    for a in notes:
        if a["fingerprint"].startswith("incident-"):
            incidents.setdefault(a["annotations"].get("incident", ""), []).append(a["annotations"]["kind"])
        elif a["status"] == "firing":
            own.append(a["labels"]["alertname"])
    return {"incidents": incidents, "own": own}


def run() -> list[Row]:
    r = asyncio.run(_measure(HOSTS))
    xid, temp = r["lat"]["xid"], r["lat"]["temp"]
    rate = r["frames_in"] / max(r["elapsed"], 1e-9)
    load = f"{HOSTS} hosts x 8 GPUs at 1 s ({rate:.0f} frames/s in)"
    return [
        (
            "alert latency: load (fleet subprocess, collector, PostgreSQL, NATS on this machine)",
            load,
            "1000 x 8 at 1 s",
        ),
        (
            f"fault -> webhook, XID 79 (event) p50 / p99 / max, n={len(xid)}",
            f"{pct(xid, 50):.3f} / {pct(xid, 99):.3f} / {max(xid, default=float('nan')):.3f} s",
            "p99 < 0.25 s",
        ),
        (
            f"fault -> webhook, temp=95 (threshold, for {FOR_S:g} s) p50 / p99, n={len(temp)}",
            f"{pct(temp, 50):.3f} / {pct(temp, 99):.3f} s",
            f"< for + group_wait + 1 s = {FOR_S + GROUP_WAIT + 1:g} s",
        ),
        (
            "XID: agent -> judged (NATS; fast_events: before it is stored) p50 / p99",
            f"{pct(r['parts']['judged'], 50):.3f} / {pct(r['parts']['judged'], 99):.3f} s",
            "",
        ),
        (
            "XID: judged -> webhook received (outbox commit, POST) p50 / p99",
            f"{pct(r['parts']['delivered'], 50):.3f} / {pct(r['parts']['delivered'], 99):.3f} s",
            "",
        ),
        ("faults not notified within the run", str(r["missed"]), "0"),
        (
            f"provider outage ({OUTAGE} of {HOSTS // 4} provider-0 hosts down at once, {OUTAGE_XIDS} XIDs"
            " during it): notifications per incident",
            outage_text(r["outage"]),
            "1 first + updates; none on their own",
        ),
        (
            "collector CPU in health + alerts + alert persistence",
            f"{r['alerting_s']:.1f} s of {r['cpu']:.1f} s process CPU ({r['elapsed']:.0f} s run)",
            "",
        ),
    ]


def outage_text(o: dict[str, Any]) -> str:
    parts = []
    for kinds in o["incidents"].values():
        counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
        parts.append(f"{len(kinds)} ({', '.join(f'{n} {k}' for k, n in counts.items())})")
    own = f"{len(o['own'])} on their own" + (f" ({', '.join(sorted(set(o['own'])))})" if o["own"] else "")
    return f"{len(o['incidents'])} incident(s): " + "; ".join(parts or ["none"]) + f"; {own}"


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
