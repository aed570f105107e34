"""Collector group takeover: how long a SIGKILLed member's hosts go unowned.

Three ``gpuwarden collector run`` processes form a group (``[collector] group = true``, lease
``BENCH_GROUP_LEASE``, default 8 s) on one nats-server and PostgreSQL, with a simulated fleet
(``BENCH_GROUP_HOSTS`` hosts x 1 GPU at 1 s, default 100) publishing throughout. ``KILLS``
times (``BENCH_GROUP_KILLS``, default 10): once the 64 buckets are split over the three, one
member (in turn) is SIGKILLed; measured is the time from the kill until the group's KV bucket
shows every bucket held by the two others (the takeover); the member is then started again and
the group rebalanced before the next kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from bench._util import ROOT, pct
from tests.support.group import owners

HOSTS = int(os.environ.get("BENCH_GROUP_HOSTS", "100"))
KILLS = int(os.environ.get("BENCH_GROUP_KILLS", "10"))
LEASE = os.environ.get("BENCH_GROUP_LEASE", "8s")
Row = tuple[str, str, str]


async def held_by(url: str, members: set[str], within: float = 120.0, balanced: bool = False) -> float:
    """Seconds until the 64 buckets are held by exactly ``members`` (``balanced``: each holding
    its share, at least 64 // len(members): a rebalance finished, not just begun)."""
    from collections import Counter

    t0 = time.monotonic()
    while True:
        table = await owners(url)
        shares = Counter(table.values())
        full = len(table) == 64 and set(shares) == members
        if full and (not balanced or min(shares.values()) >= 64 // len(members)):
            return time.monotonic() - t0
        if time.monotonic() - t0 > within:
            raise TimeoutError(f"buckets not held by {sorted(members)} after {within:.0f} s: {shares}")
        await asyncio.sleep(0.1)


def start_member(tmp: Path, config: Path, name: str) -> subprocess.Popen[bytes]:
    from gpuwarden.servers import free_port

    env = dict(os.environ, GPUWARDEN_COLLECTOR_MEMBER=name, PYTHONPATH=str(ROOT))
    with (tmp / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gpuwarden", "collector", "run", "--config", str(config),
             "--listen", f"127.0.0.1:{free_port()}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def group_config(tmp: Path, pg_dsn: str, url: str, extra: str = "", lease: str = LEASE) -> Path:
    """The members' shared configuration (``extra``: more TOML, e.g. a webhook)."""
    config = tmp / "group.toml"
    config.write_text(
        f'[collector]\ngroup = true\nlease = "{lease}"\n[nats]\nservers = ["{url}"]\n'
        f'[postgres]\ndsn = "{pg_dsn}"\n[alerts]\nprovider_incident_min_hosts = 100000\n{extra}'
    )
    return config


def stop_members(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every member still running, then wait (SIGKILL after 30 s)."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


async def _bench(tmp: Path, pg_dsn: str, url: str) -> list[float]:
    from agent.fleet import Fleet
    from shared.config import NatsConfig

    config = group_config(tmp, pg_dsn, url)
    names = ["g0", "g1", "g2"]
    procs = {n: start_member(tmp, config, n) for n in names}
    fleet = Fleet(NatsConfig(servers=(url,)), hosts=HOSTS, gpus=1, interval=1.0)
    takeovers: list[float] = []
    try:
        await held_by(url, set(names))
        await fleet.start()
        run = asyncio.create_task(fleet.run(duration=24 * 3600))
        try:
            for k in range(KILLS):
                victim = names[k % 3]
                os.killpg(procs[victim].pid, signal.SIGKILL)
                procs[victim].wait()
                takeovers.append(await held_by(url, set(names) - {victim}))
                print(f"bench: kill {k + 1}/{KILLS}: takeover {takeovers[-1]:.1f} s", file=sys.stderr)
                procs[victim] = start_member(tmp, config, victim)
                await held_by(url, set(names), balanced=True)  # rebalanced: the next kill hits a full share
        finally:
            fleet.stop()
            await run
            await fleet.close()
    finally:
        stop_members(procs.values())
    return takeovers


def run() -> list[Row]:
    from gpuwarden.servers import NatsServer, PostgresServer

    with tempfile.TemporaryDirectory(prefix="bench-group-") as d, PostgresServer() as pg, NatsServer() as ns:
        takeovers = asyncio.run(_bench(Path(d), pg.dsn(), ns.url))
    return [
        (
            f"group takeover after SIGKILL, p50 ({KILLS} kills, lease {LEASE}, {HOSTS} hosts)",
            f"{pct(takeovers, 50):.1f} s",
            "<= 15 s (stretch 5 s)",
        ),
        (f"group takeover after SIGKILL, max ({KILLS} kills)", f"{max(takeovers):.1f} s", "<= 15 s"),
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
