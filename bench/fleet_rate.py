"""Fleet rate: ``gpuwarden fleet --hosts 2000 --gpus 8 --interval 1`` for ~30 s.

Counts the sample frames actually acknowledged in the stream (frames/s and GPU samples/s),
against the goal of 2,000 hosts x 8 GPUs every second from one process.
"""

from __future__ import annotations

import json
import os
import time

import psutil

from bench._util import spawn, stream_count
from gpuwarden.servers import NatsServer

HOSTS = int(os.environ.get("BENCH_FLEET_HOSTS", "2000"))
GPUS = 8
DURATION_S = float(os.environ.get("BENCH_FLEET_SECONDS", "30"))


def run() -> list[tuple[str, str, str]]:
    with NatsServer() as server:
        started = time.monotonic()
        proc = spawn(
            "fleet",
            "--hosts",
            str(HOSTS),
            "--gpus",
            str(GPUS),
            "--interval",
            "1",
            "--nats",
            server.url,
            "--duration",
            f"{DURATION_S}s",
            "--log-level",
            "warning",
            stdout=-1,
        )
        try:
            out, err = proc.communicate(timeout=DURATION_S + 180)
            wall = time.monotonic() - started
        except BaseException:
            proc.kill()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"fleet exited {proc.returncode}: {err.decode()[-2000:]}")
        summary = json.loads(out.decode().strip().splitlines()[-1])
        stored = stream_count(server.url, "gpuwarden.v1.sample.>")
        server_cpu = psutil.Process(server.proc.pid).cpu_times() if server.proc else None
    elapsed = summary["run_s"]  # the ticking time; every frame of it was acked before exit
    rate = stored / elapsed
    goal = HOSTS / 1.0
    rows = [
        (
            f"fleet: sample frames/s acked ({HOSTS} hosts x {GPUS} GPUs, 1 s)",
            f"{rate:,.0f}",
            f">= {goal:,.0f}",
        ),
        ("fleet: GPU samples/s acked", f"{rate * GPUS:,.0f}", f">= {goal * GPUS:,.0f}"),
        ("fleet: share of goal", f"{rate / goal * 100:.0f} %", "100 %"),
        ("fleet: ticks skipped (fell > 1 interval behind)", str(summary["skipped_ticks"]), "0"),
        (
            "fleet: frames dropped / publish errors",
            f"{summary['dropped']} / {summary['publish_errors']}",
            "0 / 0",
        ),
        ("fleet: process CPU (share of one core)", f"{summary['cpu_s'] / elapsed * 100:.0f} %", ""),
        ("fleet: wall time incl. start-up", f"{wall:.0f} s", ""),
    ]
    if server_cpu is not None:
        rows.append(("fleet: nats-server CPU during run", f"{server_cpu.user + server_cpu.system:.1f} s", ""))
    return rows
