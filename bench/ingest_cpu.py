"""CPU of the ingest's own work per frame, in process: decode and check, join, build rows.

What the collector does for one simulated 8-GPU host frame (the agent's simulated backend and
system, as ``gpuwarden fleet`` sends it: schema v2, static facts left to the inventory) between
the bytes JetStream delivers and the rows asyncpg encodes for COPY: :func:`collector.ingest.check`
(decode, validate, subject and identity checks), the static facts joined from the host's
inventory (:class:`collector.static.StaticFacts`), then the ``host_samples`` row, the
``gpu_facts`` values and the ``gpu_samples`` rows (:mod:`collector.store.rows`). No server, no
event loop: process CPU time over many frames (``BENCH_INGEST_CPU_ROUNDS`` passes over
``BENCH_INGEST_CPU_HOSTS`` hosts' frames, the best and the median of ``BENCH_INGEST_CPU_RUNS``
runs), the figure least moved by the other work on a shared machine. The garbage collector is tuned
as ``gpuwarden collector run`` tunes it (:func:`collector.service.tune_gc`; ``BENCH_DEFAULT_GC=1``:
Python's default thresholds). ``BENCH_PROFILE=1`` prints a cProfile of one run to stderr.
"""

from __future__ import annotations

import cProfile
import gc
import os
import pstats
import statistics
import sys
import time
from typing import Any

GPUS = 8
HOSTS = int(os.environ.get("BENCH_INGEST_CPU_HOSTS", "50"))
TICKS = 10  # samples per host
ROUNDS = int(os.environ.get("BENCH_INGEST_CPU_ROUNDS", "20"))
RUNS = int(os.environ.get("BENCH_INGEST_CPU_RUNS", "5"))


def fleet(hosts: int, ticks: int, start: float) -> tuple[list[Any], list[tuple[str, bytes]]]:
    """(inventory frames, [(subject, encoded sample)]) of a simulated fleet, as agents send them."""
    from bench.ingest_drain import fleet_frames

    inventories: list[Any] = []
    samples = fleet_frames(hosts, ticks, start, static=False, inventories=inventories)
    return inventories, samples


def per_frame(inventories: list[Any], samples: list[Any], rounds: int) -> float:
    """CPU-µs per sample frame: check, join, rows (``rounds`` passes over ``samples``)."""
    from collector.ingest import Limits, check
    from collector.static import StaticFacts
    from collector.store.rows import fact_values, gpu_rows, host_row, utc
    from collector.store.writer import Accepted

    now = time.time()
    limits = Limits(max_bytes=1 << 20, oldest_ts=now - 86400 * 30, newest_ts=now + 86400)
    static = StaticFacts()
    static.seed(inventories)
    hosts: dict[str, int] = {}
    t0 = time.process_time()
    for _ in range(rounds):
        for n, (subject, data) in enumerate(samples):
            item = check(subject, data, limits, n + 1)
            if type(item) is not Accepted:
                raise AssertionError(f"simulated frame rejected: {item}")
            frame = static.join(item.frame)
            hid = hosts.setdefault(frame.host, len(hosts) + 1)
            ts = utc(frame.ts)
            host_row(frame, hid, ts, n)
            facts = [hash(fact_values(g)) & 0xFFFF for g in frame.gpus]
            gpu_rows(frame, hid, ts, facts)
    return (time.process_time() - t0) * 1e6 / (rounds * len(samples))


def measure(profile: bool = False, tuned_gc: bool = True) -> tuple[float, float]:
    from collector.service import tune_gc

    inventories, samples = fleet(HOSTS, TICKS, time.time() - TICKS - 5)
    per_frame(inventories, samples, 1)  # warm: msgspec's schemas, caches
    before = gc.get_threshold()
    if tuned_gc:
        tune_gc()  # as `gpuwarden collector run` does; undone below for the other benchmarks
    prof = cProfile.Profile() if profile else None
    runs = []
    try:
        for i in range(RUNS):
            if prof is not None and i == 0:
                prof.enable()
            runs.append(per_frame(inventories, samples, ROUNDS))
            if prof is not None and i == 0:
                prof.disable()
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    return min(runs), statistics.median(runs)


def run() -> list[tuple[str, str, str]]:
    from bench.live_cost import loadavg

    best, median = measure(os.environ.get("BENCH_PROFILE") == "1", os.environ.get("BENCH_DEFAULT_GC") != "1")
    return [
        (
            "ingest CPU-us per 8-GPU sample frame: check + join + rows (in process, min / median)",
            f"{best:.0f} / {median:.0f} ({best / GPUS:.1f} per GPU-sample; load {loadavg()})",
            "",
        )
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
