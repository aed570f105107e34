"""``/metrics`` at 10,000 hosts x 8 GPUs: time and extra memory per scrape, plain and gzip.

The fleet's state is built in memory as in ``bench/api_latency.py`` (no NATS, no PostgreSQL),
the API runs on a local port and an aiohttp client in the same process scrapes it, reading
the body in chunks and dropping them (so the client never holds the whole body either):
the time is from the request to the last byte, server and loopback together. Scrapes are
sequential, ``SCRAPES`` of each kind:

- *unchanged*: no host sent anything since the last scrape (every block is reused);
- *all changed*: every host sent a new sample (new temperature, utilisation, memory used and
  power on every GPU) and was judged again since the last scrape (the state is updated
  between the timed scrapes, not during them); the realistic case with 5 s samples and 15 s or
  longer scrapes;
- each of the above plain and with ``Accept-Encoding: gzip``;
- one shard of four (``?shards=4&shard=1``, gzip, all changed), as the documented
  scrape configuration does;
- *rendered ahead* (gzip): every host sent a new sample, the API rendered the selection ahead
  of the scrape as it does for a steadily scraped one, then AHEAD_SHARE of the hosts sent
  another sample before the scrape (5 s samples, rendered 1 s ahead). Rendering ahead is
  turned off for the other kinds. What rendering ahead cost (CPU, before the scrape) is
  reported on a row of its own, also per GPU-sample: the scrape's figure leaves it out.

Extra memory per scrape: how far the process's resident memory rose during one scrape above
where it was before (the peak, ``VmHWM``, reset just before; Linux), the client's reading
included. Time and CPU are the process's own while it serves and reads, so the figures
include the client's side (reading 64 KiB chunks and dropping them).
``BENCH_METRICS_HOSTS`` changes the fleet size.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp.test_utils import TestServer

from bench.api_latency import GPUS, PROVIDERS, build
from bench.engine import _gpu
from collector.api import make_app
from collector.health.model import Observation
from collector.metrics import FleetCollector, Select
from collector.service import CollectorService, tune_gc
from shared.frames import SampleFrame, SystemSample

HOSTS = int(os.environ.get("BENCH_METRICS_HOSTS", "10000"))
SCRAPES = 5
AHEAD_SHARE = 0.2  # hosts that send a sample between the rendering ahead and the scrape
GOAL_S = 0.25
GOAL_MIB = 20.0
# This benchmark run on the code before the per-host blocks (commit d342b56: every scrape
# rendered everything, answered plain text to a gzip request and had no shards), 10,000 hosts,
# on the shared 2-core development machine at a load average of 14-20 (the wall times of that
# run are mostly waiting for a core; CPU and memory are the comparable figures).
BEFORE: Final = {
    "unchanged, plain": "CPU 0.74 s, 68.9 MiB, +273 MiB",
    "unchanged, gzip": "CPU 1.08 s, 68.9 MiB (no gzip), +273 MiB",
    "all changed, plain": "CPU 1.20 s, 68.9 MiB, +272 MiB",
    "all changed, gzip": "CPU 0.83 s, 68.9 MiB (no gzip), +270 MiB",
    "all changed, gzip, 1 shard of 4": "CPU 0.87 s, 68.9 MiB (no shards), +272 MiB",
    "all changed, gzip, rendered ahead": "CPU 0.83 s (as all changed: nothing was rendered ahead)",
}


def next_round(svc: CollectorService, r: int, rng: random.Random, share: float = 1.0) -> None:
    """Every host (``share`` of them) sends a new sample (round ``r``), judged and marked as the
    collector's hooks do."""
    al = svc.alerting
    now = time.time()
    frames = [
        SampleFrame(
            host=f"host-{h:05d}",
            provider=f"provider-{h % PROVIDERS}",
            boot_id="b",
            seq=r + 1,
            ts=now,
            interval_s=1.0,
            gpus=tuple(_gpu(rng, h, i, r, h % 50 == 0) for i in range(GPUS)),
            system=SystemSample(
                cpu_pct=20.0, cpu_count=64, mem_total_bytes=1 << 40, mem_available_bytes=1 << 39
            ),
        )
        for h in range(HOSTS)
        if share >= 1.0 or rng.random() < share
    ]
    svc.state.apply(frames)
    obs: list[Observation] = []
    for f in frames:
        _, o = al.health_engine.observe(al.health, f, now)
        obs += o
    al._collect(al.engine.evaluate(al.alerts_state, obs, now, (), al.health.provider_hosts()), obs)
    svc.parts.live.mark(frames)


async def scrape(http: aiohttp.ClientSession, url: str, gzip: bool) -> tuple[float, float, int]:
    """Seconds to the last byte, CPU seconds of this process meanwhile, and bytes on the wire."""
    headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
    t, cpu = time.perf_counter(), time.process_time()
    n = 0
    async with http.get(url, headers=headers) as r:
        assert r.status == 200
        # (the code before gzip support answered plain text to everyone: run on it for BEFORE)
        assert (r.headers.get("Content-Encoding") == "gzip") == gzip or "Vary" not in r.headers
        async for chunk in r.content.iter_chunked(1 << 16):
            n += len(chunk)
    return time.perf_counter() - t, time.process_time() - cpu, n


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _reset_peak() -> int:
    """Reset VmHWM to the current resident size; that size (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


async def peak_mib(run: Callable[[], Awaitable[object]]) -> float:
    """How far the process's resident memory rose above where it was, at its highest during
    ``run`` (Linux: the peak is reset through /proc/self/clear_refs). Resident memory, not
    tracemalloc: tracemalloc counts the blocks re-rendered during the scrape but not the
    freeing of the ones they replace, which were allocated before it started."""
    gc.collect()
    before = _reset_peak()
    await run()
    return (_status_kib("VmHWM") - before) / 1024


async def measure(
    svc: CollectorService,
) -> tuple[dict[str, tuple[list[float], list[float], int, float]], float]:
    """kind -> (seconds and CPU seconds per scrape, bytes, extra MiB); MiB the blocks hold at the end."""
    rng = random.Random(11)
    rounds = iter(range(2, 1000))
    live = svc.parts.live
    out: dict[str, tuple[list[float], list[float], int, float]] = {}
    async with (
        TestServer(make_app(svc.parts.api_deps)) as server,
        aiohttp.ClientSession(auto_decompress=False) as http,
    ):
        await asyncio.sleep(2.0)  # the first full rollup, as in a running collector
        kinds = [
            ("unchanged, plain", "/metrics", False, False),
            ("unchanged, gzip", "/metrics", True, False),
            ("all changed, plain", "/metrics", False, True),
            ("all changed, gzip", "/metrics", True, True),
            ("all changed, gzip, 1 shard of 4", "/metrics?shards=4&shard=1", True, True),
        ]
        fc = svc.parts.api_deps.metrics
        fc.ahead = False  # rendered ahead only in the last kind, below, where it is measured on purpose
        for name, path, gz, change in kinds:
            url = str(server.make_url(path))
            await scrape(http, url, gz)  # warm-up (fills the blocks of this kind), not timed
            times, cpus, size = [], [], 0
            for _ in range(SCRAPES):
                if change:
                    next_round(svc, next(rounds), rng)
                    await live.refresh()  # the API's once-a-second refresher, not part of a scrape
                dt, cpu, size = await scrape(http, url, gz)
                times.append(dt)
                cpus.append(cpu)
            if change:
                next_round(svc, next(rounds), rng)
                await live.refresh()
            mib = await peak_mib(lambda: scrape(http, url, gz))  # noqa: B023 (awaited here)
            out[name] = (times, cpus, size, mib)
        # Rendered ahead (what the API does for a steadily scraped selection, AHEAD_LEAD before
        # its next scrape): every host sent a new sample, the API rendered them ahead, then
        # AHEAD_SHARE of the hosts sent another before the scrape (5 s samples, 1 s ahead).
        name, url = "all changed, gzip, rendered ahead", str(server.make_url("/metrics"))
        times, cpus, ahead = [], [], []
        for i in range(SCRAPES + 1):
            next_round(svc, next(rounds), rng)
            await live.refresh()
            cpu = time.process_time()  # paid before the scrape, reported with it
            await asyncio.to_thread(fc.render_ahead, fc.snapshot(), Select(), True)
            ahead.append(time.process_time() - cpu)
            next_round(svc, next(rounds), rng, AHEAD_SHARE)
            await live.refresh()
            if i < SCRAPES:
                dt, cpu, size = await scrape(http, url, True)
                times.append(dt)
                cpus.append(cpu)
        mib = await peak_mib(lambda: scrape(http, url, True))
        out[name] = (times, cpus, size, mib)
        out["rendering ahead"] = (ahead, ahead, 0, 0.0)
        held = cache_mib(svc.parts.api_deps.metrics)
    return out, held


def cache_mib(fc: FleetCollector | None) -> float:
    """What the per-host blocks, their templates and the kept compressed chunks hold."""
    expo = getattr(fc, "exposition", None)
    if expo is None:
        return 0.0
    n = sum(len(b) for e in expo.hosts.values() for b in (*e.frags, *(t for t in e.tmpl if t)))
    n += sum(len(d.data) for s in expo._selections.values() for fam in s.chunks for _, d in fam)
    return n / 2**20


def run() -> list[tuple[str, str, str]]:
    t = time.perf_counter()
    svc = build(HOSTS)
    built = time.perf_counter() - t
    before = gc.get_threshold()
    tune_gc()  # as `gpuwarden collector run` does; undone below for the other benchmarks
    try:
        results, held = asyncio.run(measure(svc))
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    rows = [("metrics: state built (hosts x GPUs)", f"{HOSTS} x {GPUS} in {built:.1f} s", "")]
    ahead = results.pop("rendering ahead")[1]
    for name, (times, cpus, size, mib) in results.items():
        goal = f"<= {GOAL_S} s, +{GOAL_MIB:.0f} MiB; " if name.startswith("all changed") else ""
        goal += f"before: {BEFORE[name]}"
        rows.append(
            (
                f"metrics: /metrics {name}",
                f"p50 {statistics.median(times):.3f} s, max {max(times):.3f} s "
                f"(CPU p50 {statistics.median(cpus):.3f} s), {size / 2**20:.1f} MiB sent, "
                f"+{mib:.1f} MiB peak",
                goal,
            )
        )
    cpu = statistics.median(ahead)
    rows.append(
        (
            "metrics: rendering ahead, before the scrape of the row above (all changed)",
            f"CPU p50 {cpu:.3f} s, {cpu / (HOSTS * GPUS) * 1e6:.2f} us per GPU-sample",
            "not in the scrape's figure: paid 1 s before it",
        )
    )
    rows.append(
        ("metrics: blocks kept between scrapes", f"{held:.0f} MiB (plain blocks, templates, gzip chunks)", "")
    )
    rows.append(
        (
            "metrics: label cardinality",
            f"per GPU: {HOSTS * GPUS} (provider, host, gpu, uuid) x 8 families + XID codes seen; "
            f"per host {HOSTS} x 2; per provider {PROVIDERS} x 5 statuses",
            "bounded",
        )
    )
    return rows


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
