"""The agent's CPU per tick against Prometheus node_exporter's CPU per scrape, on this machine.

node_exporter (Debian's ``prometheus-node-exporter``, default collectors) is started on a free
port and scraped once a second; then ``gpuwarden agent run --simulate 8 --interval 1`` runs
for as long against a private NATS. Both figures are the process's user + system CPU from
``/proc/<pid>/stat`` over the measured window, divided by the scrapes or ticks in it. The goal
(issue 14): the agent's tick costs less than node_exporter's scrape. ``make bench`` installs the
package when it is missing and it runs as root; otherwise this benchmark says it is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

from bench._util import simulated_agent
from gpuwarden.servers import NatsServer

MEASURE_S = float(os.environ.get("BENCH_NODE_EXPORTER_SECONDS", "30"))
WARMUP_S = 5.0
INTERVAL_S = 1.0
BINARIES = ("prometheus-node-exporter", "node_exporter")
_TICK = os.sysconf("SC_CLK_TCK")

Row = tuple[str, str, str]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _scrape(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (a local http URL we built)
        return len(resp.read())


def node_exporter_per_scrape(binary: str) -> tuple[float, int, int]:
    """(CPU seconds per scrape, scrapes, bytes of the last scrape)."""
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                size = _scrape(url)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"{binary} did not start: {err[-500:]}") from None
                time.sleep(0.1)
        for _ in range(int(WARMUP_S / INTERVAL_S)):
            _scrape(url)
            time.sleep(INTERVAL_S)
        c0, n = cpu_seconds(proc.pid), 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < MEASURE_S:
            size = _scrape(url)
            n += 1
            time.sleep(max(0.0, t0 + n * INTERVAL_S - time.monotonic()))
        used = cpu_seconds(proc.pid) - c0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return used / n, n, size


def agent_per_tick() -> tuple[float, float]:
    """(CPU seconds per tick, ticks) of the agent with 8 simulated GPUs at a 1 s interval."""
    with (
        NatsServer() as server,
        simulated_agent(server.url, "bench-node-exporter", INTERVAL_S, WARMUP_S) as proc,
    ):
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(MEASURE_S)
        used, elapsed = cpu_seconds(proc.pid) - c0, time.monotonic() - t0
    ticks = elapsed / INTERVAL_S
    return used / ticks, ticks


def run() -> list[Row]:
    binary = next((b for b in BINARIES if shutil.which(b)), None)
    if binary is None:
        return [
            (
                "node_exporter comparison",
                "skipped: prometheus-node-exporter not installed (apt-get install prometheus-node-exporter)",
                "",
            )
        ]
    scrape_s, scrapes, size = node_exporter_per_scrape(binary)
    tick_s, ticks = agent_per_tick()
    ratio = tick_s / scrape_s if scrape_s > 0 else float("inf")
    scraped = f"{scrapes} scrapes of {size / 1e3:.0f} kB"
    return [
        (f"node_exporter: CPU per scrape ({scraped})", f"{scrape_s * 1e3:.2f} ms", "reference"),
        (
            f"agent: CPU per tick, 8 simulated GPUs ({ticks:.0f} ticks)",
            f"{tick_s * 1e3:.2f} ms",
            "< node_exporter",
        ),
        ("agent tick / node_exporter scrape", f"{ratio:.2f}", "< 1"),
    ]
