"""Failover of the engines underneath: a NATS stream leader killed, a PostgreSQL standby promoted.

A simulated fleet (``BENCH_FAILOVER_HOSTS`` hosts x 2 GPUs at 1 s, default 100) and a
collector run in this process; the collector notes when each batch commits and the newest
frame time in it.

* NATS: a three-node cluster (``NatsCluster``), the stream with three replicas. ``KILLS``
  times: the stream's leader is SIGKILLed; measured are the time until a new leader is
  elected, the time until the collector commits again, and the time until it commits a frame
  the agents made after the kill (storing resumed end to end). The node is started again
  between kills. At the end every frame the fleet made is compared with the rows: lost and
  doubled.
* PostgreSQL: a primary and its streaming standby, the collector on a multi-host DSN
  (``target_session_attrs=read-write``); the primary is stopped with SIGQUIT (a crash), held
  down ``DOWN_S`` seconds (the time failover tooling takes to decide), then the standby is
  promoted (``pg_ctl promote``). Measured: from the promotion to the collector's first commit
  on the new primary, until frames made after the promotion are stored (the backlog of the
  outage drained), and the frames lost (asynchronous replication: the loss window;
  synchronous: none expected). ``PG_TRIES`` failovers of each kind.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HOSTS = int(os.environ.get("BENCH_FAILOVER_HOSTS", "100"))
KILLS = int(os.environ.get("BENCH_FAILOVER_KILLS", "3"))
WARMUP_S = 6.0
DOWN_S = 10.0
PG_TRIES = int(os.environ.get("BENCH_FAILOVER_PG_TRIES", "2"))
STREAM_BYTES = 256 << 20
Row = tuple[str, str, str]


class Commits:
    """An ingest hook: when each batch of new frames committed, and its newest frame time."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    async def __call__(self, frames: Sequence[Any]) -> None:
        self.seen.append((time.time(), max(f.ts for f in frames)))

    def first_after(self, t: float, *, made_after: bool) -> float | None:
        """When the first batch committed after ``t`` (holding a frame made after ``t``)."""
        for at, newest in self.seen:
            if at > t and (newest > t or not made_after):
                return at
        return None


def _tap(svc: Any, commits: Commits) -> None:
    """Have ``commits`` see every committed batch of new frames, after the collector's own use."""
    inner = svc.ingest.on_batch

    async def both(frames: Sequence[Any]) -> None:
        if inner is not None:
            await inner(frames)
        await commits(frames)

    svc.ingest.on_batch = both


async def _until(pred: Any, within: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while True:
        r = pred()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(step)


async def _collector(tmp: str, dsn: str, urls: list[str], replicas: int) -> tuple[Any, asyncio.Task[None]]:
    from collector.config import load_collector_config
    from collector.service import CollectorService

    path = Path(tmp) / "collector.toml"
    path.write_text(
        f"""
[collector]
ack_wait = "30s"
[nats]
stream_replicas = {replicas}
stream_max_bytes = {STREAM_BYTES}
reconnect_wait = "200ms"
[notify.log]
enabled = false
"""
    )
    cfg = load_collector_config(path, env={}, flags={"postgres.dsn": dsn, "nats.servers": urls})
    svc = CollectorService(cfg)
    await svc.startup()
    return svc, asyncio.create_task(svc.run())


def _fleet(urls: list[str], replicas: int) -> Any:
    from agent.fleet import Fleet
    from shared.config import NatsConfig

    cfg = NatsConfig(
        servers=tuple(urls), stream_replicas=replicas, stream_max_bytes=STREAM_BYTES,
        reconnect_wait=0.2, reconnect_wait_max=1.0, buffer_frames=500_000, publish_timeout=2.0,
    )  # fmt: skip
    return Fleet(cfg, hosts=HOSTS, gpus=2, interval=1.0, workers=64)


async def _stored(dsn: str) -> set[tuple[str, str, int]]:
    import asyncpg

    c = await asyncpg.connect(dsn)
    try:
        rows = await c.fetch(
            "SELECT h.name, k.boot_id, k.seq FROM (SELECT host_id, boot_id, seq FROM host_samples"
            " UNION ALL SELECT host_id, boot_id, seq FROM events"
            " UNION ALL SELECT host_id, boot_id, seq FROM inventory_reports) k"
            " JOIN hosts h ON h.id = k.host_id"
        )
    finally:
        await c.close()
    keys = [(r["name"], r["boot_id"], r["seq"]) for r in rows]
    if len(keys) != len(set(keys)):
        raise AssertionError(f"{len(keys) - len(set(keys))} frames stored twice")
    return set(keys)


async def _drained(svc: Any) -> bool:
    """Everything in the stream was delivered to the collector and acknowledged (stored)."""
    from shared.subjects import STREAM

    nc = svc.parts.nats.nc
    assert nc is not None
    infos = await nc.jetstream().consumers_info(STREAM)
    return bool(infos) and all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos)


async def _finish(
    fleet: Any, svc: Any, run: asyncio.Task[None], fleet_run: asyncio.Task[None], dsn: str
) -> int:
    """Stop the fleet (all its frames acknowledged), let the collector drain; frames lost."""
    _say("stopping the fleet")
    fleet.stop()
    await fleet_run
    await fleet.close(flush_timeout=120)
    if fleet.publisher.buffered or fleet.publisher.stats.dropped:
        raise AssertionError("the fleet could not publish every frame")
    made = {(h.seqr.host, h.seqr.boot_id, n) for h in fleet.hosts for n in range(1, h.seqr.seq + 1)}
    _say("waiting for the collector to drain the stream")
    await _until(lambda: _drained(svc), within=180, step=0.5)
    svc.request_stop()
    await asyncio.wait_for(run, 60)
    await svc.shutdown()
    return len(made - await _stored(dsn))


async def _nats() -> dict[str, Any]:
    from gpuwarden.servers import NatsCluster, PostgresServer
    from shared.subjects import STREAM

    elected: list[float] = []
    first: list[float] = []  # any batch committed after the kill
    resumed: list[float] = []  # a batch holding a frame made after the kill
    with NatsCluster(3) as cluster, PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        svc, run = await _collector(tmp, pg.dsn(), cluster.urls, 3)
        commits = Commits()
        _tap(svc, commits)
        js = svc.parts.nats.nc.jetstream(timeout=2)
        fleet = _fleet(cluster.urls, 3)
        await fleet.start()
        fleet_run = asyncio.create_task(fleet.run())
        try:
            for _ in range(KILLS):
                await asyncio.sleep(WARMUP_S)  # steady state before each kill
                leader = (await js.stream_info(STREAM)).cluster.leader
                node = cluster.node(leader)
                killed = time.time()
                node.kill()

                async def new_leader(victim: str = leader) -> bool:
                    try:
                        c = (await js.stream_info(STREAM)).cluster
                    except Exception:  # noqa: BLE001 (no answer while electing)
                        return False
                    return c is not None and c.leader not in (None, victim)

                await _until(new_leader, within=120, step=0.05)
                elected.append(time.time() - killed)
                _say(f"killed {leader}: new leader after {elected[-1]:.2f} s")
                await _until(lambda t=killed: svc.ingest.stats.last_commit_at > t, within=120, step=0.01)
                first.append(svc.ingest.stats.last_commit_at - killed)
                await _until(lambda t=killed: commits.first_after(t, made_after=True) is not None, within=120)
                resumed.append((commits.first_after(killed, made_after=True) or killed) - killed)
                _say(
                    f"first commit after {first[-1]:.2f} s,"
                    f" frames made after the kill stored after {resumed[-1]:.2f} s"
                )
                node.start()
                await asyncio.to_thread(cluster.wait_healthy)
        finally:
            lost = await _finish(fleet, svc, run, fleet_run, pg.dsn())
        dups = svc.ingest.stats.duplicates
    return {"elected": elected, "first": first, "resumed": resumed, "lost": lost, "duplicates": dups}


async def _pg(sync: bool) -> dict[str, Any]:
    from gpuwarden.servers import NatsServer, PostgresServer, multi_host_dsn

    settings = {"synchronous_commit": "on", "synchronous_standby_names": "*"} if sync else {}
    with (
        NatsServer() as ns,
        PostgresServer(durable=True, settings=settings) as primary,
        tempfile.TemporaryDirectory() as tmp,
    ):
        standby = PostgresServer.standby_of(primary)
        with standby:
            dsn = multi_host_dsn([primary, standby])
            svc, run = await _collector(tmp, dsn, [ns.url], 1)
            commits = Commits()
            _tap(svc, commits)
            fleet = _fleet([ns.url], 1)
            await fleet.start()
            fleet_run = asyncio.create_task(fleet.run())
            try:
                await asyncio.sleep(WARMUP_S)
                stopped = time.time()
                await asyncio.to_thread(primary.stop, "immediate")
                await asyncio.sleep(DOWN_S)
                t0 = time.monotonic()
                await asyncio.to_thread(standby.promote)
                promote_s = time.monotonic() - t0
                promoted = time.time()
                _say(f"promoted ({'sync' if sync else 'async'}) in {promote_s:.2f} s")
                # any batch committed (new frames or only duplicates of what the old primary had)
                await _until(lambda: svc.ingest.stats.last_commit_at > promoted, within=120, step=0.01)
                resumed = svc.ingest.stats.last_commit_at - promoted
                await _until(lambda: commits.first_after(promoted, made_after=True) is not None, within=120)
                fresh = (commits.first_after(promoted, made_after=True) or promoted) - promoted
            finally:
                lost = await _finish(fleet, svc, run, fleet_run, standby.dsn())
    outage = resumed + promoted - stopped
    return {"promote_s": promote_s, "resumed": resumed, "fresh": fresh, "outage": outage, "lost": lost}


def _say(what: str) -> None:
    print(f"bench failover: {what}", file=sys.stderr, flush=True)


def run() -> list[Row]:
    n = asyncio.run(_nats())
    rows: list[Row] = [
        (
            f"NATS stream leader SIGKILLed (3 nodes, R3, {HOSTS} hosts at 1 s): new leader elected after,"
            f" p50 / max of {len(n['elected'])}",
            f"{statistics.median(n['elected']):.2f} / {max(n['elected']):.2f} s",
            "",
        ),
        (
            "NATS leader kill: the collector's first commit after the kill, after p50 / max",
            f"{statistics.median(n['first']):.2f} / {max(n['first']):.2f} s",
            "",
        ),
        (
            "NATS leader kill: collector stores frames made after the kill, after p50 / max",
            f"{statistics.median(n['resumed']):.2f} / {max(n['resumed']):.2f} s",
            "< 15 s",
        ),
        (
            f"NATS leader kills: frames lost / stored twice (duplicates dropped: {n['duplicates']})",
            f"{n['lost']} / 0",
            "0 / 0",
        ),
    ]
    for sync in (False, True):
        runs = [asyncio.run(_pg(sync)) for _ in range(PG_TRIES)]
        mode = "synchronous" if sync else "asynchronous"
        each = ", ".join
        rows += [
            (
                f"PostgreSQL promotion ({mode} standby, primary SIGQUIT, promoted {DOWN_S:.0f} s later):"
                f" pg_ctl promote took, each of {PG_TRIES}",
                each(f"{p['promote_s']:.2f}" for p in runs) + " s",
                "",
            ),
            (
                f"PostgreSQL promotion ({mode}): the collector's first commit on the new primary, after",
                each(f"{p['resumed']:.2f}" for p in runs) + " s",
                "< 5 s (the writer's retry backoff)",
            ),
            (
                f"PostgreSQL promotion ({mode}): frames made after it stored (backlog drained), after",
                each(f"{p['fresh']:.2f}" for p in runs) + " s",
                "",
            ),
            (
                f"PostgreSQL promotion ({mode}): acknowledged frames lost",
                each(str(p["lost"]) for p in runs),
                "0" if sync else "0 up to the replication lag (docs/operations.md)",
            ),
        ]
    return rows
