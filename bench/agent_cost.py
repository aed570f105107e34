"""Agent cost: ``gpuwarden agent run --simulate 8 --interval 1`` for 60 s against a private NATS.

Measures the agent process's CPU seconds per tick, its share of one core and its RSS, and
checks that every tick's sample reached the stream.
"""

from __future__ import annotations

import os
import time

import psutil

from bench._util import make_stream, simulated_agent, stream_count
from gpuwarden.servers import NatsServer

MEASURE_S = float(os.environ.get("BENCH_AGENT_SECONDS", "60"))
WARMUP_S = 5.0
INTERVAL_S = 1.0


def run() -> list[tuple[str, str, str]]:
    with NatsServer() as server:
        make_stream(server.url)  # a collector makes it; without one the agent's samples are not stored
        with simulated_agent(server.url, "bench-agent", INTERVAL_S, WARMUP_S) as proc:
            p = psutil.Process(proc.pid)
            c0 = p.cpu_times()
            t0 = time.monotonic()
            n0 = stream_count(server.url, "gpuwarden.v1.sample.*.bench-agent")
            rss_peak = 0
            while time.monotonic() - t0 < MEASURE_S:
                time.sleep(1.0)
                rss_peak = max(rss_peak, p.memory_info().rss)
            c1 = p.cpu_times()
            elapsed = time.monotonic() - t0
            n1 = stream_count(server.url, "gpuwarden.v1.sample.*.bench-agent")
        code = proc.returncode
    cpu = (c1.user + c1.system) - (c0.user + c0.system)
    ticks = elapsed / INTERVAL_S
    per_tick_ms = cpu / ticks * 1000
    core_pct = cpu / elapsed * 100
    return [
        ("agent: CPU per tick (8 simulated GPUs)", f"{per_tick_ms:.2f} ms", "< 5 ms"),
        ("agent: share of one core at 1 s", f"{core_pct:.3f} %", "< 0.5 %"),
        ("agent: peak RSS", f"{rss_peak / 1e6:.1f} MB", "< 60 MB"),
        ("agent: samples stored / ticks", f"{n1 - n0} / {ticks:.0f}", "all"),
        ("agent: exit code on SIGTERM", str(code), "0"),
    ]
