"""API latency with 10,000 hosts x 8 GPUs of in-memory state (``/metrics``: bench/metrics_scrape.py).

The state is built without NATS or PostgreSQL: sample frames go through ``FleetState.apply``
and the health engine (two rounds, so rates exist; about 2% of GPUs in trouble) and the
observations through the alert engine, exactly as the collector's hooks do. The API then
runs on a local port and is timed from an aiohttp client in the same process (sequential
requests 20 ms apart, so that the health rollup, recomputed at most once a second, is part
of the figure: server time plus loopback, not concurrency). ``BENCH_API_HOSTS``
changes the fleet size, ``BENCH_API_PROVIDERS`` the number of providers (default 10).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import time

import aiohttp
from aiohttp.test_utils import TestServer

from bench.engine import _gpu
from collector.api import make_app
from collector.config import load_collector_config
from collector.health.model import Observation
from collector.service import CollectorService, tune_gc
from shared.frames import SampleFrame, SystemSample

HOSTS = int(os.environ.get("BENCH_API_HOSTS", "10000"))
PROVIDERS = int(os.environ.get("BENCH_API_PROVIDERS", "10"))
GPUS = 8
REQUESTS = 200
PAUSE = 0.02
GOAL_MS = 50.0


def build(hosts: int = HOSTS, providers: int = PROVIDERS) -> CollectorService:
    """A collector service (never started) holding ``hosts`` x 8 GPUs of state and health."""
    cfg = load_collector_config(env={}, flags={"postgres.dsn": "postgresql://bench@127.0.0.1:1/none"})
    svc = CollectorService(cfg)
    al = svc.alerting
    rng = random.Random(7)
    now = time.time()
    for r in range(2):
        frames = []
        for h in range(hosts):
            faulty = h % 50 == 0
            frames.append(
                SampleFrame(
                    host=f"host-{h:05d}",
                    provider=f"provider-{h % providers}",
                    boot_id="b",
                    seq=r + 1,
                    ts=now - 2 + r,
                    interval_s=1.0,
                    gpus=tuple(_gpu(rng, h, i, r, faulty) for i in range(GPUS)),
                    system=SystemSample(
                        cpu_pct=20.0, cpu_count=64, mem_total_bytes=1 << 40, mem_available_bytes=1 << 39
                    ),
                )
            )
        svc.state.apply(frames)
        obs: list[Observation] = []
        for f in frames:
            _, o = al.health_engine.observe(al.health, f, now - 2 + r)
            obs += o
        out = al.engine.evaluate(al.alerts_state, obs, now - 2 + r, (), al.health.provider_hosts())
        al._collect(out, obs)  # state only: nothing is flushed without a pool
    return svc


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))]


async def measure(svc: CollectorService) -> dict[str, tuple[float, float, int]]:
    """path -> (p50 ms, p99 ms, bytes) over REQUESTS sequential requests."""
    out: dict[str, tuple[float, float, int]] = {}
    async with TestServer(make_app(svc.parts.api_deps)) as server, aiohttp.ClientSession() as http:
        paths = {
            "/api/v1/providers": REQUESTS,
            "/api/v1/hosts?provider=provider-1": REQUESTS,
            "/api/v1/hosts/host-00050": REQUESTS,
            "/api/v1/alerts?limit=100": REQUESTS,
        }
        await asyncio.sleep(3.0)  # a running collector: the first full rollup is done at start
        for path, n in paths.items():
            async with http.get(server.make_url(path)) as r:  # warm-up, not timed
                await r.read()
            times, size = [], 0
            for _ in range(n):
                await asyncio.sleep(PAUSE)  # spread over seconds: the per-second rollup is included
                t = time.perf_counter()
                async with http.get(server.make_url(path)) as r:
                    body = await r.read()
                    assert r.status == 200, body[:200]
                times.append((time.perf_counter() - t) * 1000)
                size = len(body)
            out[path] = (statistics.median(times), pct(times, 0.99), size)
    return out


def run() -> list[tuple[str, str, str]]:
    t = time.perf_counter()
    svc = build()
    built = time.perf_counter() - t
    before = gc.get_threshold()
    tune_gc()  # as `gpuwarden collector run` does; undone below for the other benchmarks
    try:
        results = asyncio.run(measure(svc))
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    rows = [("api: state built (hosts x GPUs)", f"{HOSTS} x {GPUS} in {built:.1f} s", "")]
    for path, (p50, p99, size) in results.items():
        goaled = path.split("?")[0] in ("/api/v1/providers", "/api/v1/hosts")
        goal = f"p99 < {GOAL_MS:.0f} ms" if goaled else ""
        rows.append((f"api: GET {path}", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {size / 1024:.0f} KiB", goal))
    return rows


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
