"""Collector group scale-out: CPU per stored GPU-sample with 1, 2 and 3 members, bytes read per member.

One nats-server (its monitoring port on) and a PostgreSQL configured as an operator runs it
(``fsync`` and ``synchronous_commit`` on, as :mod:`bench.live_cost`), a simulated fleet
(``gpuwarden fleet``: ``BENCH_SCALE_HOSTS`` hosts x 8 GPUs at 1 s, default 100) publishing
throughout. Each row is measured on servers and a fleet of its own, started afresh: its
members start (``[collector] group = true``), the 64 buckets are split over them, the fleet
starts, and after ``BENCH_SCALE_WARMUP`` seconds (default 10) ``BENCH_SCALE_SECONDS`` (default
30) are measured. Every size thus meets a fleet and a database of the same age (measured as
members joined one run, a later row met a bigger database, whose writes cost more: that alone
made 3 members look 10-20 % dearer). Measured:

* the CPU time (user + system, from ``/proc``) of every member process and of PostgreSQL's whole
  tree, per GPU-sample stored in that window: flat when members share the work instead of
  repeating it;
* the bytes nats-server sent to each member's connection (``/connz`` ``out_bytes``: the
  frames delivered, lease and API traffic, protocol headers included) against the bytes by which
  the ``GPUWARDEN`` stream grew: the group's sum over the stream's is its read amplification
  (goal <= 1.2; with one member the same ratio is the protocol's own overhead);
* the transactions PostgreSQL committed per second (``pg_stat_database``): each member commits
  its own batches, of its share of the frames; and nats-server's CPU, in % of a core.

``BENCH_SCALE_SIZES`` (default ``0,1,2,3``) selects the rows: 0 is one collector configured
``group = false``, against which a group of one's overhead reads; 1-3 the group sizes.
``BENCH_SCALE_ROUNDS`` (default 1) repeats them, every other round in the reverse order (0 1 2 3
3 2 1 0 ...), so that the machine's load drifting during the run weighs on every size alike;
each run is printed and the table gives each size's median. ``BENCH_SCALE_COLLECTOR`` adds
``[collector]`` keys to every collector's configuration (e.g. ``linger = "300ms"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._util import spawn, stop, tree_cpu
from bench.group_takeover import group_config, held_by, start_member, stop_members
from bench.live_cost import GPUS, gpu_samples, loadavg, per_sample

HOSTS = int(os.environ.get("BENCH_SCALE_HOSTS", "100"))
WINDOW = float(os.environ.get("BENCH_SCALE_SECONDS", "30"))
WARMUP = float(os.environ.get("BENCH_SCALE_WARMUP", "10"))
COLLECTOR = os.environ.get("BENCH_SCALE_COLLECTOR", "")  # more [collector] keys, TOML
SIZES = sorted({int(k) for k in os.environ.get("BENCH_SCALE_SIZES", "0,1,2,3").split(",") if k.strip()})
ROUNDS = int(os.environ.get("BENCH_SCALE_ROUNDS", "1"))
Row = tuple[str, str, str]


def collector_bytes(monitor: int) -> dict[int, int]:
    """Client port -> bytes nats-server sent to each collector connection (``/connz``)."""
    url = f"http://127.0.0.1:{monitor}/connz?limit=1024"
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (our own local server)
        conns = json.loads(r.read())["connections"]
    return {c["port"]: c["out_bytes"] for c in conns if c.get("name", "").startswith("gpuwarden-collector")}


def stream_bytes(url: str) -> int:
    async def get() -> int:
        import nats

        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().stream_info("GPUWARDEN")).state.bytes)
        finally:
            await nc.close()

    return asyncio.run(get())


async def commits(dsn: str) -> int:
    """Transactions PostgreSQL committed in the bench's database so far."""
    from tests.support.db import fetchval

    sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    return int(await fetchval(dsn, sql))


def window(dsn: str, pg: Any, ns: Any, monitor: int, pids: list[int], members: int) -> dict[str, Any]:
    """The figures of one row: ``WARMUP`` s, then ``WINDOW`` s measured."""
    time.sleep(WARMUP)
    n0, b0, s0 = asyncio.run(gpu_samples(dsn)), collector_bytes(monitor), stream_bytes(ns.url)
    x0 = asyncio.run(commits(dsn))
    c0, p0, load0 = sum(tree_cpu(p) for p in pids), tree_cpu(pg.proc.pid), loadavg()
    q0 = tree_cpu(ns.proc.pid)
    t0 = time.monotonic()
    time.sleep(WINDOW)
    c1, p1, load1 = sum(tree_cpu(p) for p in pids), tree_cpu(pg.proc.pid), loadavg()
    q1 = tree_cpu(ns.proc.pid)
    elapsed = time.monotonic() - t0
    n1, b1, s1 = asyncio.run(gpu_samples(dsn)), collector_bytes(monitor), stream_bytes(ns.url)
    x1 = asyncio.run(commits(dsn))
    read = sorted((b1[k] - b0.get(k, 0) for k in b1), reverse=True)
    row = {
        "members": members,
        "samples": n1 - n0,
        "elapsed": elapsed,
        "collectors": c1 - c0,
        "postgres": p1 - p0,
        "nats": q1 - q0,
        "read": read,
        "stream": s1 - s0,
        "commits": x1 - x0,
        "load": f"{load0} -> {load1}",
    }
    print(f"bench: group_scale {row}", file=sys.stderr)
    return row


def collectors_config(tmp: Path, dsn: str, url: str, group: bool) -> Path:
    config = group_config(tmp, dsn, url, "[notify.log]\nenabled = false\n")
    keys = f"group = {'true' if group else 'false'}\n{COLLECTOR}\n"
    config.write_text(config.read_text().replace("group = true\n", keys, 1))
    return config


def fleet_args(url: str) -> list[str]:
    args = ["fleet", "--hosts", str(HOSTS), "--gpus", str(GPUS), "--providers", "4", "--interval", "1s"]
    duration = f"{WARMUP + WINDOW + 120:.0f}s"
    return args + ["--nats", url, "--duration", duration, "--log-level", "warning"]


def measure(tmp: Path, pg: Any, ns: Any, monitor: int, size: int) -> dict[str, Any]:
    """The figure of a group of ``size`` members: they start and split the buckets, then the
    fleet starts."""
    dsn = pg.dsn()
    config = collectors_config(tmp, dsn, ns.url, group=True)
    procs: dict[str, Any] = {}
    fleet = None
    try:
        for name in ("g0", "g1", "g2")[:size]:
            procs[name] = start_member(tmp, config, name)
        asyncio.run(held_by(ns.url, set(procs), balanced=True))
        fleet = spawn(*fleet_args(ns.url))
        return window(dsn, pg, ns, monitor, [p.pid for p in procs.values()], size)
    finally:
        if fleet is not None:
            stop(fleet)
        stop_members(procs.values())


async def consuming(url: str, within: float = 120.0) -> None:
    """Until the stream has a consumer (a collector started consuming)."""
    import nats

    nc = await nats.connect(url)
    try:
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(nats.errors.Error):
                if await nc.jetstream().consumers_info("GPUWARDEN"):
                    return
            if time.monotonic() - t0 > within:
                raise TimeoutError(f"no collector consuming after {within:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


def measure_single(tmp: Path, pg: Any, ns: Any, monitor: int) -> dict[str, Any]:
    """The same fleet and window with one collector configured ``group = false``."""
    config = collectors_config(tmp, pg.dsn(), ns.url, group=False)
    proc = start_member(tmp, config, "single")
    fleet = None
    try:
        asyncio.run(consuming(ns.url))
        fleet = spawn(*fleet_args(ns.url))
        return window(pg.dsn(), pg, ns, monitor, [proc.pid], 0)
    finally:
        if fleet is not None:
            stop(fleet)
        stop_members([proc])


def run() -> list[Row]:
    from gpuwarden.servers import NatsServer, PostgresServer, free_port

    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in SIZES}
    for i in range(ROUNDS):
        for size in SIZES if i % 2 == 0 else SIZES[::-1]:
            monitor = free_port()
            with (
                tempfile.TemporaryDirectory(prefix="bench-scale-") as d,
                NatsServer(config=f'http: "127.0.0.1:{monitor}"\n') as ns,
                PostgresServer(durable=True) as pg,
            ):
                if size == 0:
                    runs[size].append(measure_single(Path(d), pg, ns, monitor))
                else:
                    runs[size].append(measure(Path(d), pg, ns, monitor, size))
    figures = []
    for got in runs.values():  # each size's median run, by CPU per GPU-sample
        got.sort(key=lambda r: (r["collectors"] + r["postgres"]) / max(r["samples"], 1))
        figures.append(got[len(got) // 2])
    rows: list[Row] = []
    for r in figures:
        n, k = r["samples"], r["members"]
        col, pgc = per_sample(r["collectors"], n), per_sample(r["postgres"], n)
        expected = HOSTS * GPUS * r["elapsed"]
        what = f"group of {k}" if k else "group=false"
        if ROUNDS > 1:
            what += f" (median of {ROUNDS})"
        rows.append(
            (
                f"{what}: CPU-us per GPU-sample, members + PostgreSQL (durable), {HOSTS}x{GPUS} GPUs",
                f"{col + pgc:.0f} = collectors {col:.0f} + PostgreSQL {pgc:.0f}; {n:,} stored"
                f" ({n / expected:.0%} of the fleet's) in {r['elapsed']:.0f} s;"
                f" PostgreSQL {r['commits'] / r['elapsed']:.0f} commits/s;"
                f" nats-server {r['nats'] / r['elapsed']:.1%} of a core; load {r['load']}",
                "flat with 1, 2, 3 members; a group of one within 5% of group=false",
            )
        )
        stream = max(r["stream"], 1)
        per_member = " / ".join(f"{b / stream:.2f}" for b in r["read"])
        rows.append(
            (
                f"{what}: bytes read per member / the stream's bytes (nats-server /connz)",
                f"{sum(r['read']) / stream:.2f}x in all ({per_member});"
                f" the stream grew {r['stream'] / 1e6:.1f} MB",
                "<= 1.2x in all" if k == 3 else "",
            )
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
