"""Side by side, in the same run: Prometheus scraping a simulated fleet, and our collector ingesting it.

The same simulated fleet (``BENCH_PEER_HOSTS`` hosts x 8 GPUs, default 300, readings from the
agent's simulated backend) is, at the same time:

- exposed as Prometheus targets by one aiohttp process (``bench/_prom_exporter.py``: one
  exposition per host, one gauge per GPU field the agent's sample carries, labelled by GPU),
  scraped every second by Debian's ``prometheus`` (its own TSDB in a temporary directory);
- published every second by ``gpuwarden fleet`` over NATS into one ``gpuwarden collector run``
  (everything on) and a private PostgreSQL with ``fsync``/``synchronous_commit``/
  ``full_page_writes`` on (as in ``bench/live_cost.py``).

Over the same ``BENCH_PEER_SECONDS`` window (default 60) the CPU of each process tree is read
from ``/proc``: Prometheus; the exporter process (it stands for the exporters on the GPU hosts,
so it is reported on its own and not in Prometheus's figure, as the fleet simulator is not in
ours); the collector and PostgreSQL. Each side's CPU is divided by the GPU-samples it took in
that window (Prometheus: successful scrapes x 8; ours: rows stored in ``gpu_samples``), and the
ratio ours / Prometheus's is printed. ``make bench`` installs ``prometheus`` when it is missing
(as root); otherwise this benchmark says so and is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._util import ROOT, spawn, stop, tree_cpu
from bench.live_cost import GPUS, WARMUP, gpu_samples, loadavg, per_sample, start_collector

HOSTS = int(os.environ.get("BENCH_PEER_HOSTS", "300"))
WINDOW = float(os.environ.get("BENCH_PEER_SECONDS", "60"))
Row = tuple[str, str, str]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (a local http URL we built)
        return json.loads(r.read())


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"{proc.args} exited: {err}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not answering")


def prometheus_config(hosts: int, exporter: str) -> str:
    targets = json.dumps([f"host-{h:04d}" for h in range(hosts)])
    return f"""global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: gpus
    metrics_path: /metrics
    static_configs:
      - targets: {targets}
    relabel_configs:
      - source_labels: [__address__]
        target_label: __param_target
      - source_labels: [__param_target]
        target_label: instance
      - target_label: __address__
        replacement: {exporter}
"""


def measure(hosts: int = HOSTS, window: float = WINDOW) -> dict[str, Any]:
    from gpuwarden.servers import NatsServer, PostgresServer, free_port

    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus")
    with (
        NatsServer() as ns,
        PostgresServer(durable=True) as pg,
        tempfile.TemporaryDirectory() as tmp,
    ):
        assert pg.proc is not None
        eport, pport = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        exporter = subprocess.Popen(
            [sys.executable, "-m", "bench._prom_exporter", "--hosts", str(hosts), "--gpus", str(GPUS)]
            + ["--port", str(eport)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        prom: subprocess.Popen[bytes] | None = None
        collector = fleet = None
        try:
            _wait(f"http://127.0.0.1:{eport}/stats", exporter)
            cfg = Path(tmp) / "prometheus.yml"
            cfg.write_text(prometheus_config(hosts, f"127.0.0.1:{eport}"))
            prom = subprocess.Popen(
                [
                    binary,
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={Path(tmp) / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{pport}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            _wait(f"http://127.0.0.1:{pport}/-/ready", prom)
            collector, _ = start_collector(tmp, pg.dsn(), ns.url)
            args = ["fleet", "--hosts", str(hosts), "--gpus", str(GPUS), "--providers", "4"]
            args += ["--interval", "1s", "--nats", ns.url, "--duration", f"{WARMUP + window + 10:.0f}s"]
            fleet = spawn(*args, "--log-level", "warning")
            time.sleep(WARMUP)
            n0 = asyncio.run(gpu_samples(pg.dsn()))
            s0 = _get(f"http://127.0.0.1:{eport}/stats")["scrapes"]
            cpu0 = [tree_cpu(p.pid) for p in (prom, exporter, collector, pg.proc)]
            load0, t0 = loadavg(), time.monotonic()
            time.sleep(window)
            cpu1 = [tree_cpu(p.pid) for p in (prom, exporter, collector, pg.proc)]
            elapsed, load1 = time.monotonic() - t0, loadavg()
            s1 = _get(f"http://127.0.0.1:{eport}/stats")["scrapes"]
            n1 = asyncio.run(gpu_samples(pg.dsn()))
            failed = _get(f"http://127.0.0.1:{pport}/api/v1/query?query=count(up%3D%3D0)%20or%20vector(0)")[
                "data"
            ]["result"][0]["value"][1]
        finally:
            for p in (fleet, collector):
                if p is not None:
                    stop(p)
            for p in (prom, exporter):
                if p is not None and p.poll() is None:
                    p.terminate()
                    p.wait(30)
    prom_cpu, exp_cpu, col_cpu, pg_cpu = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    return {
        "hosts": hosts,
        "elapsed": elapsed,
        "prom_samples": (s1 - s0) * GPUS,
        "ours_samples": n1 - n0,
        "prometheus": prom_cpu,
        "exporter": exp_cpu,
        "collector": col_cpu,
        "postgres": pg_cpu,
        "targets_down": int(float(failed)),
        "load": f"{load0} -> {load1}",
    }


def run() -> list[Row]:
    try:
        r = measure()
    except FileNotFoundError:
        return [
            ("peer: Prometheus side by side", "skipped: prometheus missing (apt-get install prometheus)", "")
        ]
    prom = per_sample(r["prometheus"], r["prom_samples"])
    ours = per_sample(r["collector"] + r["postgres"], r["ours_samples"])
    col, pg = per_sample(r["collector"], r["ours_samples"]), per_sample(r["postgres"], r["ours_samples"])
    exp = per_sample(r["exporter"], r["prom_samples"])
    return [
        (
            f"peer: {r['hosts']} hosts x {GPUS} GPUs at 1 s, both at once, {r['elapsed']:.0f} s (load avg)",
            f"Prometheus {r['prom_samples']:,} GPU-samples scraped ({r['targets_down']} targets down at"
            f" the end), ours {r['ours_samples']:,} stored; load {r['load']}",
            "",
        ),
        (
            "peer: Prometheus 2.x CPU-us per GPU-sample (scrape + TSDB; exporter not counted)",
            f"{prom:.0f} (the exporter process, standing for the hosts' exporters: {exp:.0f})",
            "",
        ),
        (
            "peer: ours CPU-us per GPU-sample (collector + PostgreSQL, fsync on)",
            f"{ours:.0f} = collector {col:.0f} + PostgreSQL {pg:.0f}",
            "",
        ),
        ("peer: ratio ours / Prometheus (CPU per GPU-sample, same run)", f"{ours / prom:.2f}", "<= 1"),
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
