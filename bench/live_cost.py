"""Live cost of monitoring: CPU-µs per GPU-sample of the whole collector and of PostgreSQL.

A live simulated fleet (``gpuwarden fleet``: ``BENCH_LIVE_HOSTS`` hosts x 8 GPUs publishing every
second, default 300) into one real ``gpuwarden collector run`` process (ingest, health, alerts,
notifications and the HTTP API all on, as deployed) and a private PostgreSQL configured as an
operator runs it (``fsync``, ``synchronous_commit`` and ``full_page_writes`` on). After a
warm-up, for ``BENCH_LIVE_SECONDS`` (default 60: the once-a-minute work included), the CPU time
(user + system) of the collector process and of every PostgreSQL process (the postmaster's whole
tree, backends and workers that come and go included: see :func:`bench._util.tree_cpu`) is read
from ``/proc`` and divided by the GPU-samples stored in that window. The fleet simulator and
nats-server are not counted (they stand for the agents and the bus); nats-server's figure is
printed for information.

``BENCH_PROFILE=1`` also runs the collector under cProfile (top functions by own time to stderr;
the profiled run's CPU figures are inflated by the profiler) and prints PostgreSQL's statements
by total time (``pg_stat_statements``).
"""

from __future__ import annotations

import asyncio
import os
import pstats
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._util import gpuwarden_cmd, spawn, stop, stored_sizes, tree_cpu
from tests.support.db import fetchval

HOSTS = int(os.environ.get("BENCH_LIVE_HOSTS", "300"))
WINDOW = float(os.environ.get("BENCH_LIVE_SECONDS", "60"))  # a whole minute: its rollups included
WARMUP = float(os.environ.get("BENCH_LIVE_WARMUP", "10"))
GPUS = 8
# the collector as deployed: a group of one (the default); BENCH_LIVE_GROUP=0: a collector alone
GROUP = os.environ.get("BENCH_LIVE_GROUP", "1") != "0"
BEFORE = "337 (collector ~180 + PostgreSQL ~155)"  # issue 12, measured before this benchmark existed
Row = tuple[str, str, str]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def execute(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def gpu_samples(dsn: str) -> int:
    return int(await fetchval(dsn, "SELECT count(*) FROM gpu_samples"))


async def _sizes(dsn: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await stored_sizes(conn)
    finally:
        await conn.close()


async def _statements(dsn: str, top: int = 15) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 150) AS q"
            " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT $1",
            top,
        )
    finally:
        await conn.close()
    print("pg_stat_statements, top by total time (ms, calls, rows, statement):", file=sys.stderr)
    for r in rows:
        print(f"{r['total_exec_time']:10.0f} {r['calls']:8d} {r['rows']:9d}  {r['q']}", file=sys.stderr)


COUNTERS = ("gpuwarden_alert_transitions_total", "gpuwarden_collector_batches_total")


def counters(port: int) -> tuple[float, float]:
    """The collector's alert transitions and batches committed (read outside the measured
    window): each batch is a transaction, and what a batch costs beside its frames is most of
    the CPU a second that does not grow with the fleet (docs/ingest.md)."""
    got = dict.fromkeys(COUNTERS, float("nan"))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:  # noqa: S310
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in got:
                got[name] = float(value)
    return got[COUNTERS[0]], got[COUNTERS[1]]


def _ready(port: int, proc: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"collector exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("collector not ready")


def start_collector(tmp: str, dsn: str, nats_url: str, profile: str | None = None) -> tuple[Any, int]:
    """``gpuwarden collector run`` as deployed (API on a free port); returns the process, its port."""
    from gpuwarden.servers import free_port

    port = free_port()
    cfg = Path(tmp) / "collector.toml"
    group = "" if GROUP else "[collector]\ngroup = false\n"
    cfg.write_text(group + "[notify.log]\nenabled = false\n")
    args = ["collector", "run", "--config", str(cfg), "--nats", nats_url, "--dsn", dsn]
    args += ["--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"]
    if profile is None:
        proc = spawn(*args)
    else:
        import subprocess

        from bench._util import ROOT

        cmd = [sys.executable, "-m", "cProfile", "-o", profile, *gpuwarden_cmd(*args)[1:]]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
    _ready(port, proc)
    return proc, port


def measure(hosts: int = HOSTS, window: float = WINDOW, profile: bool = False) -> dict[str, Any]:
    from gpuwarden.servers import NatsServer, PostgresServer

    settings = {"shared_preload_libraries": "pg_stat_statements"} if profile else {}
    with (
        NatsServer() as ns,
        PostgresServer(durable=True, settings=settings) as pg,
        tempfile.TemporaryDirectory() as tmp,
    ):
        assert pg.proc is not None
        assert ns.proc is not None
        prof = os.environ.get("BENCH_PROFILE_OUT", str(Path(tmp) / "collector.prof")) if profile else None
        collector, port = start_collector(tmp, pg.dsn(), ns.url, prof)
        if profile:
            asyncio.run(execute(pg.dsn(), "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        args = ["fleet", "--hosts", str(hosts), "--gpus", str(GPUS), "--providers", "4", "--interval", "1s"]
        args += ["--nats", ns.url, "--duration", f"{WARMUP + window + 10:.0f}s", "--log-level", "warning"]
        fleet = spawn(*args)
        try:
            time.sleep(WARMUP)
            if profile:
                asyncio.run(execute(pg.dsn(), "SELECT pg_stat_statements_reset()"))
            a0, b0 = counters(port)
            n0 = asyncio.run(gpu_samples(pg.dsn()))
            t0 = time.monotonic()
            c0, p0, s0 = tree_cpu(collector.pid), tree_cpu(pg.proc.pid), tree_cpu(ns.proc.pid)
            load0 = loadavg()
            time.sleep(window)
            c1, p1, s1 = tree_cpu(collector.pid), tree_cpu(pg.proc.pid), tree_cpu(ns.proc.pid)
            elapsed = time.monotonic() - t0
            load1 = loadavg()
            n1 = asyncio.run(gpu_samples(pg.dsn()))
            a1, b1 = counters(port)
        finally:
            stop(fleet)
            stop(collector)
        if profile:
            asyncio.run(_statements(pg.dsn()))
        sizes = asyncio.run(_sizes(pg.dsn()))
        if prof and Path(prof).exists():
            pstats.Stats(prof, stream=sys.stderr).sort_stats(
                os.environ.get("BENCH_PROFILE_SORT", "tottime")
            ).print_stats(40)
    return {
        "hosts": hosts,
        "samples": n1 - n0,
        "elapsed": elapsed,
        "collector": c1 - c0,
        "postgres": p1 - p0,
        "nats": s1 - s0,
        "load": f"{load0} -> {load1}",
        "transitions": a1 - a0,
        "batches": b1 - b0,
        **sizes,
    }


def per_sample(cpu_s: float, samples: int) -> float:
    return cpu_s * 1e6 / samples if samples else float("nan")


def run() -> list[Row]:
    r = measure(profile=os.environ.get("BENCH_PROFILE") == "1")
    n = r["samples"]
    col, pg = per_sample(r["collector"], n), per_sample(r["postgres"], n)
    expected = r["hosts"] * GPUS * r["elapsed"]
    rows = max(r["rows"], 1)
    return [
        (
            f"live: {r['hosts']} hosts x {GPUS} GPUs at 1 s, {r['elapsed']:.0f} s window (load avg)",
            f"{n:,} GPU-samples stored ({n / expected:.0%} of the fleet's); load {r['load']};"
            f" {r['batches'] / r['elapsed']:.1f} batches (transactions) a second;"
            f" {r['transitions']:.0f} alert transitions (a healthy fleet: 0 unless the machine lags)",
            "",
        ),
        (
            "live CPU-us per GPU-sample: collector + PostgreSQL (from /proc)",
            f"{col + pg:.0f} = collector {col:.0f} + PostgreSQL {pg:.0f} (before: {BEFORE})",
            "<= 54, then <= 27",
        ),
        (
            "live CPU share: collector / PostgreSQL / nats-server (not counted above)",
            f"{r['collector'] / r['elapsed']:.0%} / {r['postgres'] / r['elapsed']:.0%}"
            f" / {r['nats'] / r['elapsed']:.0%} of one core",
            "",
        ),
        (
            "live bytes stored per GPU-sample (gpu_samples, gpu_facts + indexes; with host rows and rollups)",
            f"{r['gpu'] / rows:.0f}; {(r['gpu'] + r['host'] + r['rollup']) / rows:.0f}",
            "<= 200",
        ),
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
