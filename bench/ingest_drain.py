"""Drain rate of one collector: a pre-filled stream of simulated-fleet frames into PostgreSQL.

Private nats-server and PostgreSQL on this machine (PostgreSQL configured as operators run it:
``fsync``, ``synchronous_commit`` and ``full_page_writes`` on); frames of ``HOSTS`` simulated hosts with
8 GPUs each (the agent's simulated backend), ``TICKS`` samples per host published before the
collector starts. The collector runs in this process (one event loop, as in production) and
the figure is GPU-samples stored (committed) per second. ``BENCH_PROFILE=1`` prints the top
functions by cumulative time (cProfile) to stderr.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import os
import pstats
import statistics
import sys
import time
from typing import Any

from bench._util import stored_sizes, tree_cpu

GPUS = 8
HOSTS = int(os.environ.get("BENCH_DRAIN_HOSTS", "250"))
TICKS = int(os.environ.get("BENCH_DRAIN_TICKS", "60"))
GOAL = 50_000
LIVE_HOSTS = int(os.environ.get("BENCH_LIVE_HOSTS", "500"))  # steady phase: hosts at 1 s
LIVE_TICKS = 5


def fleet_frames(
    hosts: int,
    ticks: int,
    start: float,
    prefix: str = "host",
    static: bool = True,
    inventories: list[Any] | None = None,
) -> list[tuple[str, bytes]]:
    """Encoded sample frames of a simulated fleet, one per host per second (``static=False``:
    as the agent sends them, static facts left to the inventory, each host's appended to
    ``inventories``)."""
    from agent.gpu.simulated import SimulatedBackend
    from agent.sampler import Sequencer, build_inventory, build_sample
    from agent.system import SimulatedSystem
    from shared.frames import encode

    out: list[tuple[str, bytes]] = []
    for h in range(hosts):
        name = f"{prefix}-{h:04d}"
        backend = SimulatedBackend(GPUS, host=name, seed=h)
        backend.open()
        system = SimulatedSystem(host=name, seed=h)
        seqr = Sequencer(host=name, provider=f"provider-{h % 4}")
        if inventories is not None:
            inventories.append(build_inventory(seqr, backend.inventory(), ts=start))
        gpus = backend.sample()
        sysv = system.sample()
        for t in range(ticks):
            frame = build_sample(seqr, interval_s=1.0, gpus=gpus, system=sysv, ts=start + t)
            if t % 10 == 9:  # fresh readings now and then; the rest reuse them (same shape)
                gpus = backend.sample()
            out.append((seqr.subjects[0], encode(frame, static=static)))
        backend.close()
    return out


async def _prefill(url: str, cfg: Any, frames: list[tuple[str, bytes]]) -> None:
    import nats

    from collector.stream import reconcile

    nc = await nats.connect(url)
    js = nc.jetstream()
    await reconcile(js, cfg.nats)
    for subject, data in frames:
        await nc.publish(subject, data)  # core publish: JetStream stores it, no per-message ack
    await nc.flush()
    while (await js.stream_info("GPUWARDEN")).state.messages < len(frames):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await nc.close()


async def _drain(cfg: Any, total: int, pg_pid: int) -> dict[str, Any]:
    import nats

    from collector.ingest import Ingest
    from collector.store.writer import Writer

    nc = await nats.connect(cfg.nats.servers[0])
    writer = Writer(cfg.postgres)
    ingest = Ingest(cfg, writer)
    await ingest.setup(nc)
    lags: list[float] = []  # per batch: fetched (checking starts) to committed and acked
    started: dict[int, float] = {}
    prepare, commit = ingest.prepare, ingest.commit

    async def timed_prepare(msgs: Any) -> Any:
        t = time.perf_counter()
        batch = await prepare(msgs)
        started[id(batch)] = t
        return batch

    live_lags: list[float] = []  # steady phase: stream arrival of a batch's oldest frame to commit

    async def timed_commit(batch: Any) -> Any:
        result = await commit(batch)
        lags.append(time.perf_counter() - started.pop(id(batch)))
        if steady.is_set():
            live_lags.append(time.time() - batch.msgs[0].metadata.timestamp.timestamp())
        return result

    steady = asyncio.Event()

    ingest.prepare = timed_prepare  # type: ignore[method-assign]
    ingest.commit = timed_commit  # type: ignore[method-assign]
    cpu0, pg0, t0 = time.process_time(), tree_cpu(pg_pid), time.perf_counter()
    task = asyncio.create_task(ingest.run())
    while ingest.stats.frames_stored + ingest.stats.duplicates < total:
        await asyncio.sleep(0.01)
        if task.done():
            task.result()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    pg_cpu = tree_cpu(pg_pid) - pg0
    total_gpu_rows = ingest.stats.gpu_samples_stored
    # steady phase: a live fleet of LIVE_HOSTS hosts at 1 s, commit lag per batch
    live = fleet_frames(LIVE_HOSTS, LIVE_TICKS, time.time(), prefix="live")
    steady.set()
    for tick in range(LIVE_TICKS):
        t_tick = time.perf_counter()
        for subject, data in live[tick::LIVE_TICKS]:
            await nc.publish(subject, data)
        await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t_tick)))
    while ingest.stats.frames_stored + ingest.stats.duplicates < total + len(live):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    ingest.stop()
    await task
    await nc.drain()
    await writer.close()
    return {
        "elapsed": elapsed,
        "cpu": cpu,
        "pg_cpu": pg_cpu,
        "gpu_rows": total_gpu_rows,
        "lags": lags,
        "live_lags": live_lags,
    }


async def _sizes(cfg: Any) -> tuple[int, int, int]:
    from collector.store import db

    conn = await db.connect(cfg.postgres)
    try:
        sizes = await stored_sizes(conn)
        return sizes["rows"], sizes["gpu"], sizes["host"] + sizes["rollup"]
    finally:
        await conn.close()


def measure(hosts: int = HOSTS, ticks: int = TICKS, profile: bool = False) -> dict[str, Any]:
    from collector.config import load_collector_config
    from collector.store import db, migrate
    from gpuwarden.servers import NatsServer, PostgresServer

    start = time.time() - ticks - 5
    frames = fleet_frames(hosts, ticks, start)
    with NatsServer() as ns, PostgresServer(durable=True) as pg:  # fsync etc. on, as operators run it
        cfg = load_collector_config(
            env={}, flags={"postgres.dsn": pg.dsn(), "nats.servers": [ns.url], "collector.batch": 2000}
        )

        async def setup() -> None:
            conn = await db.connect(cfg.postgres)
            await migrate.migrate(conn)
            await conn.close()
            await _prefill(ns.url, cfg, frames)

        asyncio.run(setup())
        from collector.service import tune_gc

        before = gc.get_threshold()
        tune_gc()  # as `gpuwarden collector run` does; undone below for the other benchmarks
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        assert pg.proc is not None
        result = asyncio.run(_drain(cfg, len(frames), pg.proc.pid))
        if prof:
            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        gc.unfreeze()
        gc.set_threshold(*before)
        rows, gpu_bytes, other_bytes = asyncio.run(_sizes(cfg))
    result.update(rows=rows, gpu_bytes=gpu_bytes, other_bytes=other_bytes, frames=len(frames))
    return result


def run() -> list[tuple[str, str, str]]:
    r = measure(profile=os.environ.get("BENCH_PROFILE") == "1")
    rate = r["gpu_rows"] / r["elapsed"]
    lags = sorted(r["lags"])
    live = sorted(r["live_lags"]) or [0.0]
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
    return [
        (
            "collector drain, GPU-samples/s (1 process, 8 GPUs/host)",
            f"{rate:,.0f} ({r['gpu_rows']:,} in {r['elapsed']:.1f} s,"
            f" collector CPU {r['cpu'] / r['elapsed']:.0%})",
            f">= {GOAL:,}",
        ),
        (
            "drain CPU-us per stored GPU-sample: collector + PostgreSQL (PostgreSQL's from /proc)",
            f"{(r['cpu'] + r['pg_cpu']) * 1e6 / r['gpu_rows']:.0f} = collector"
            f" {r['cpu'] * 1e6 / r['gpu_rows']:.0f} + PostgreSQL {r['pg_cpu'] * 1e6 / r['gpu_rows']:.0f}",
            "<= 20",
        ),
        (
            f"collector commit lag, live fleet of {LIVE_HOSTS} x 8 GPUs at 1 s, p50 / max",
            f"{statistics.median(live) * 1000:.0f} / {live[-1] * 1000:.0f} ms (stream arrival to commit)",
            "",
        ),
        (
            "collector batch fetch-to-commit while draining, p50 / p99",
            f"{statistics.median(lags) * 1000:.0f} / {p99 * 1000:.0f} ms (batches of <= 2000 frames)",
            "",
        ),
        (
            "bytes stored per GPU-sample (drain)",
            f"{r['gpu_bytes'] / r['rows']:.0f} (gpu_samples, gpu_facts + indexes); "
            f"{(r['gpu_bytes'] + r['other_bytes']) / r['rows']:.0f} with host rows and rollups",
            "",
        ),
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
