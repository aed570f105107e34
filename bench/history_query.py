"""History query: 24 hours of one GPU at 1 s (86,400 samples), read back at a 1-minute step.

The samples are written through the collector's own batch writer (so the one-minute rollups
are the ones ingest maintains) into a private PostgreSQL, among 7 other GPUs of the same
host; the figure is the median wall time of the API's query function over 20 runs.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from typing import Any

SECONDS = 86_400
GPUS = 8
RUNS = 20
GOAL_MS = 100.0


def _frames(start: float) -> list[Any]:
    from shared.frames import GpuSample, SampleFrame

    out = []
    for s in range(SECONDS):
        gpus = tuple(
            GpuSample(
                index=i,
                uuid=f"GPU-bench-{i}",
                util_gpu_pct=float((s + i) % 100),
                temp_c=40.0 + (s % 600) / 20.0,
                power_w=300.0 + (s % 120),
                mem_used_bytes=(s % 80) << 30,
            )
            for i in range(GPUS if s % 60 == 0 else 1)  # the other GPUs once a minute
        )
        out.append(
            SampleFrame(host="bench-0", provider="bench", boot_id="b", seq=s + 1, ts=start + s, gpus=gpus)
        )
    return out


async def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    result = await fn()
    return (time.perf_counter() - t) * 1000, result


async def _main(dsn: str) -> dict[str, Any]:
    from collector.config import load_collector_config
    from collector.store import db, migrate, queries
    from collector.store.writer import Accepted, Writer

    cfg = load_collector_config(env={}, flags={"postgres.dsn": dsn})
    conn = await db.connect(cfg.postgres)
    await migrate.migrate(conn)
    start = float(int(time.time()) // 60 * 60 - SECONDS - 60)
    frames = _frames(start)
    writer = Writer(cfg.postgres)
    t0 = time.perf_counter()
    for i in range(0, len(frames), 2000):
        await writer.write([Accepted(f) for f in frames[i : i + 2000]])
    load_s = time.perf_counter() - t0
    await conn.execute("ANALYZE")
    until = start + SECONDS
    out: dict[str, Any] = {"load_s": load_s}

    async def rollup() -> Any:
        return await queries.history(conn, "bench-0", "temp_c", start, until, step=60, gpu=0)

    # before the rollups are written (every minute still marked pending: read from the samples),
    # then written as the ingest does once the minutes are over: the same figures, faster
    out["pending_ms"], pending = await _timed(rollup)
    await writer.flush_rollups(everything=True)
    await writer.close()
    await conn.execute("ANALYZE")
    after = (await rollup()).points
    out["same"] = len(after) == len(pending.points) and all(
        (a.ts, a.gpu, a.min, a.max, a.count) == (b.ts, b.gpu, b.min, b.max, b.count)
        and (a.value == b.value or math.isclose(a.value or 0.0, b.value or 1.0, rel_tol=1e-12))
        # the mean may differ in its last bits: the same sums, added in another order
        for a, b in zip(after, pending.points, strict=True)
    )

    async def raw_page() -> Any:
        return await queries.history(conn, "bench-0", "temp_c", start, until, gpu=0, limit=1000)

    async def raw_agg() -> Any:
        return await queries.history(conn, "bench-0", "temp_c", start, until, step=90, gpu=0)

    for name, fn in (("rollup", rollup), ("raw_page", raw_page), ("raw_agg", raw_agg)):
        await fn()  # warm
        times = []
        for _ in range(RUNS if name != "raw_agg" else 5):
            ms, page = await _timed(fn)
            times.append(ms)
        out[name] = (statistics.median(times), len(page.points), page.source)
    await conn.close()
    return out


def run() -> list[tuple[str, str, str]]:
    from gpuwarden.servers import PostgresServer

    with PostgresServer(durable=True) as pg:
        r = asyncio.run(_main(pg.dsn()))
    ms, n, source = r["rollup"]
    pms, pn, _ = r["raw_page"]
    ams, an, _ = r["raw_agg"]
    return [
        (
            "history: 24 h of one GPU at 1 s, 1-minute step",
            f"{ms:.1f} ms median ({n} points from {source}; 86,400 samples written in {r['load_s']:.0f} s)",
            f"< {GOAL_MS:.0f} ms",
        ),
        (
            "history: same query before the rollups are written (all 1,440 minutes pending)",
            f"{r['pending_ms']:.0f} ms, figures {'the same as' if r['same'] else 'DIFFERENT from'}"
            " the rollups'",
            "the same",
        ),
        ("history: same range, raw samples, first page of 1000", f"{pms:.1f} ms median", ""),
        ("history: same range, 90 s step from raw samples", f"{ams:.0f} ms median ({an} points)", ""),
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
