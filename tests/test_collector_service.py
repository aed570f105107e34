"""The collector as a process: CLI, SIGKILL mid-stream and restart, SIGTERM, migrate, config."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import nats
import pytest

from collector.config import load_collector_config
from collector.group.consumers import consumer_name as bucket_consumer
from collector.ingest import consumer_name
from collector.service import CollectorService
from collector.store import migrate
from collector.stream import reconcile
from gpuwarden.servers import NatsServer, free_port
from shared.errors import ConfigError
from shared.frames import Frame
from tests.support.ingest import config, publish, stored_keys
from tests.support.records import event, inventory, sample
from tests.support.wait import until

ROOT = Path(__file__).resolve().parent.parent
LOG = Path(tempfile.gettempdir()) / f"gpuwarden-collector-test-{os.getpid()}.log"
# Hang guard of the waits on a collector process: its start (imports, PostgreSQL: migrations,
# partitions, the fleet state; NATS: stream, consumers, 64 in a group; the alert state) and what
# it then stores. CPU-bound: a start takes 3-5 s on a quiet machine, 26-30 s from spawn to the
# first log line measured on the loaded 2-core machine (load 20: a CI run, other work and 8 busy
# loops beside the test). Not a timing goal (those live in bench/): only a hang fails it.
GUARD_S = 300.0
NEVER = "1h"  # an ack_wait no wait of these tests reaches


def collector_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "collector.cli", *args]


def spawn(*args: str, ack_wait: str | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if ack_wait is not None:
        env["GPUWARDEN_COLLECTOR_ACK_WAIT"] = ack_wait
    with LOG.open("ab") as log:
        return subprocess.Popen(collector_cmd(*args), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(collector_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


async def count(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM host_samples")
    return n


def run_args(nats_url: str, dsn: str, group: bool) -> list[str]:
    return [
        "run",
        "--nats",
        nats_url,
        "--dsn",
        dsn,
        "--listen",  # a port of its own (the default 8080 may be another collector's on this machine)
        "127.0.0.1:0",
        "--log-level",
        "WARNING",
        "--group" if group else "--no-group",
    ]


Check = Callable[[], Awaitable[bool]]


def alive(proc: subprocess.Popen[bytes], pred: Check) -> Check:
    """``pred``, failing the wait at once when the collector exited (its log in the message)."""

    async def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the collector exited with {proc.returncode}:\n{LOG.read_text()[-4000:]}")
        return await pred()

    return check


# alone: the single consumer's messages in the killed collector's hands come back after
# ack_wait (shortened here); group (--group): the restarted member takes the buckets once
# the dead one's leases aged out and recreates their consumers at their floor (no ack_wait)
#
# The agents publish a fixed number of frames per phase (before the kill, while down, while the
# restarted one catches up): the work is the same on any machine (a free-running publisher
# published 5,000 to 10,000 frames, more the slower the collector started, which then all had to
# be drained, 110 s at load 20).
@pytest.mark.parametrize(("mode", "ack_wait"), [("group", None), ("alone", "2s")], ids=["group", "alone"])
@pytest.mark.timeout(900)  # two starts and the drain, each waited on with GUARD_S
async def test_sigkill_mid_stream_then_restart_stores_the_published_set(
    mode: str, ack_wait: str | None, pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    args = run_args(private_nats.url, pg_dsn, group=mode == "group")
    nc = await nats.connect(private_nats.url)
    js = nc.jetstream()
    await reconcile(js, config(pg_dsn, private_nats.url).nats)  # as the collector makes it
    now = time.time()
    published: list[Frame] = []
    budget = 16 * 150  # frames the agents may publish so far
    more = asyncio.Event()  # set while they may publish more (or when told to stop)
    more.set()
    stop = asyncio.Event()

    def allow(frames: int) -> None:
        nonlocal budget
        budget = len(published) + frames
        more.set()

    def halt() -> None:
        stop.set()
        more.set()

    async def agents() -> None:  # 16 hosts publishing their budget, until told to stop
        seq = 0
        while await more.wait() and not stop.is_set():
            seq += 1
            batch = [sample(f"k-{h:02d}", seq, now - 300 + seq * 0.1, gpus=8) for h in range(16)]
            await publish(js, batch)
            published.extend(batch)
            if len(published) >= budget:
                more.clear()

    publisher = asyncio.create_task(agents())
    proc = spawn(*args, ack_wait=ack_wait)
    try:
        await until(alive(proc, lambda: _more_than(conn, 200)), timeout=GUARD_S)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = await count(conn)
        assert 0 < killed_at < len(published)
        allow(16 * 10)  # agents keep publishing while the collector is down
        await until(lambda: not more.is_set())
        proc = spawn(*args, ack_wait=ack_wait)
        allow(16 * 50)  # ... and while the restarted one catches up
        await until(alive(proc, lambda: _more_than(conn, killed_at + 200)), timeout=GUARD_S)
        halt()
        await publisher
        await until(alive(proc, lambda: _at_least(conn, len(published))), timeout=GUARD_S)

        async def rolled_up() -> bool:  # the idle collector writes every marked minute's rollups,
            # those the killed one had marked included
            n = await conn.fetchval("SELECT sum(n) FROM gpu_rollup_1m")
            pending = await conn.fetchval("SELECT count(*) FROM gpu_rollup_pending")
            return n == 8 * len(published) and pending == 0

        await until(alive(proc, rolled_up), timeout=GUARD_S)
    finally:
        halt()
        proc.kill()
        proc.wait(10)
        await nc.close()
    keys = await stored_keys(conn)
    assert set(keys) == {(f.host, f.seq) for f in published}
    assert set(keys.values()) == {1}  # nothing twice
    assert await conn.fetchval("SELECT count(*) FROM gpu_samples") == 8 * len(published)
    assert await conn.fetchval("SELECT sum(n) FROM gpu_rollup_1m") == 8 * len(published)


async def _more_than(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) > n


async def _at_least(conn: asyncpg.Connection, n: int) -> bool:
    return await count(conn) >= n


@pytest.mark.parametrize("mode", ["group", "alone"])
@pytest.mark.timeout(700)  # two starts, each waited on with GUARD_S
async def test_sigterm_finishes_the_batch_and_exits_cleanly(
    mode: str, pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    """What was stored was acknowledged and nothing else; the rest is read by the next
    collector at once, not after the ``ack_wait`` of a message merely left unacknowledged (an
    hour here, past every hang guard: a collector that relied on it fails the test, however
    slow the machine): alone, the collector hands back (nak) what it was delivered and did not
    store; in a group, the member releases its leases and the next holder recreates the
    consumers at their floor."""
    cfg = config(pg_dsn, private_nats.url)
    group = mode == "group"
    names = [bucket_consumer(cfg.collector.durable, b) for b in range(64)] if group else [consumer_name(cfg)]
    proc = spawn(*run_args(private_nats.url, pg_dsn, group=group), ack_wait=NEVER)
    nc = await nats.connect(private_nats.url)
    try:
        js = nc.jetstream()
        for name in names:
            await until(alive(proc, lambda n=name: _consumer_exists(js, n)), timeout=GUARD_S)
        now = time.time()
        frames: list[Frame] = [sample(f"t-{h}", s, now - 50 + s) for h in range(5) for s in range(40)]
        await publish(js, frames)
        await until(alive(proc, lambda: _at_least(conn, 1)), timeout=GUARD_S)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, LOG.read_text()
        infos = [await js.consumer_info("GPUWARDEN", name) for name in names]
        stored = await count(conn)
        # everything stored was acknowledged, nothing else was (the stream holds only these
        # frames, each delivered once at most); what was not stored is pending: never
        # delivered, or delivered and not acknowledged (handed back, or left to the next holder)
        assert sum(i.ack_floor.consumer_seq for i in infos) == stored
        assert stored + sum(i.num_ack_pending + i.num_pending for i in infos) == len(frames)
        if group:
            proc = spawn(*run_args(private_nats.url, pg_dsn, group=True), ack_wait=NEVER)  # the next member
            await until(alive(proc, lambda: _at_least(conn, len(frames))), timeout=GUARD_S)
            keys = await stored_keys(conn)
            assert set(keys) == {(f.host, f.seq) for f in frames}
            assert set(keys.values()) == {1}  # nothing twice
            return
        sub = await js.pull_subscribe_bind(durable=consumer_name(cfg), stream="GPUWARDEN")
        rest: list[object] = []

        async def all_rest() -> bool:
            with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                rest.extend(await sub.fetch(len(frames), timeout=1.0))
            return len(rest) >= len(frames) - stored

        await until(all_rest, timeout=GUARD_S)
        assert len(rest) == len(frames) - stored
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        await nc.close()


async def _consumer_exists(js: object, name: str) -> bool:
    try:
        await js.consumer_info("GPUWARDEN", name)  # type: ignore[attr-defined]
    except nats.js.errors.NotFoundError:
        return False
    return True


def test_migrate_cli_applies_once_and_errors_have_codes(pg_dsn: str) -> None:
    first = run_cli("migrate", "--dsn", pg_dsn)
    assert first.returncode == 0, first.stderr
    assert f"applied migrations {[m.version for m in migrate.migrations()]}" in first.stdout
    again = run_cli("migrate", "--dsn", pg_dsn)
    assert again.returncode == 0
    assert "schema up to date" in again.stdout
    down = run_cli("migrate", "--dsn", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert down.returncode == 4
    assert down.stderr.startswith("error: cannot reach PostgreSQL")
    bad = run_cli("run", "--dsn", pg_dsn, "--partitions", "2", "--partition", "2")
    assert bad.returncode == 2
    assert "error: collector.partition" in bad.stderr


def test_config_file_env_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "collector.toml"
    path.write_text(
        '[collector]\nlisten = "127.0.0.1:9000"\npartitions = 4\npartition = 1\n'
        '[nats]\nservers = ["nats://n1:4222"]\n'
        '[postgres]\ndsn = "env:PGDSN"\nretention_days = 7\nsslmode = "verify-full"\n'
        '[api]\ntokens = ["env:TOK"]\n[inventory]\nsource = "/etc/hosts.json"\nrefresh = "1m"\n'
        '[health]\nstale_after = "15s"\n[health.gpu]\ntemp_warning_c = 85\n[alerts]\nfor = "30s"\n'
        '[[notify.webhook]]\nname = "oncall"\nurl = "https://hooks.example/gpu"\n'
    )
    env = {"PGDSN": "postgresql://u:pw@db/gw", "TOK": "s3cret", "GPUWARDEN_POSTGRES_RETENTION_DAYS": "10"}
    cfg = load_collector_config(path, env, {"collector.partition": 3})
    assert cfg.collector.listen == "127.0.0.1:9000"
    assert (cfg.collector.partitions, cfg.collector.partition) == (4, 3)
    assert cfg.postgres.dsn.reveal() == "postgresql://u:pw@db/gw"
    assert "pw" not in repr(cfg)
    assert cfg.postgres.retention_days == 10  # env beats file
    assert cfg.postgres.rollup_retention_days == 180
    assert cfg.inventory.refresh == 60.0
    assert [(t.name, t.secret.reveal()) for t in cfg.api_tokens] == [("token-0", "s3cret")]
    assert cfg.raw["health"]["gpu"]["temp_warning_c"] == 85
    assert cfg.raw["notify"]["webhook"][0]["name"] == "oncall"
    assert "escalation" not in cfg.raw  # absent from the file
    with pytest.raises(ConfigError, match="collector.partition"):
        load_collector_config(path, env, {"collector.partition": 4})
    path.write_text("[postgres]\nsslmode = 'sometimes'\n")
    with pytest.raises(ConfigError, match="sslmode"):
        load_collector_config(path, {})
    path.write_text("[collector]\nlisten = 'nowhere'\n")
    with pytest.raises(ConfigError, match="listen"):
        load_collector_config(path, {})


def test_the_group_is_the_default_and_one_per_durable(tmp_path: Path) -> None:
    """Collectors with the same configuration form a group (issue 13); the static partitions
    turn it off, and refuse it asked for; ``group = false`` runs one alone; each ``durable`` is
    a group of its own (its own KV bucket), so that deployments sharing one NATS do not join
    each other's group by accident."""
    path = tmp_path / "collector.toml"
    path.write_text("[collector]\n")
    c = load_collector_config(path, {}).collector
    assert (c.group, c.durable, c.group_kv) == (True, "gpuwarden-collector", "gpuwarden-collector-group")
    c = load_collector_config(path, {}, {"collector.partitions": 2, "collector.partition": 1}).collector
    assert (c.group, c.partitions) == (False, 2)
    assert load_collector_config(path, {}, {"collector.group": False}).collector.group is False
    path.write_text("[collector]\ngroup = false\n")
    assert load_collector_config(path, {}).collector.group is False
    path.write_text("[collector]\n")
    with pytest.raises(ConfigError, match="collector.group"):  # asked for both
        load_collector_config(path, {}, {"collector.group": True, "collector.partitions": 2})
    path.write_text('[collector]\ndurable = "site-b"\n')
    assert load_collector_config(path, {}).collector.group_kv == "site-b-group"
    path.write_text('[collector]\ndurable = "site-b"\ngroup_kv = "shared"\n')
    assert load_collector_config(path, {}).collector.group_kv == "shared"
    path.write_text('[collector]\ndurable = "site.b"\n')  # not a consumer's (nor a KV bucket's) name
    with pytest.raises(ConfigError, match="collector.durable"):
        load_collector_config(path, {})
    path.write_text('[collector]\ngroup = true\ngroup_kv = "a.b"\n')
    with pytest.raises(ConfigError, match="collector.group_kv"):
        load_collector_config(path, {})


async def test_service_in_process_hooks_state_and_restart(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    cfg = config(pg_dsn, private_nats.url)
    now = time.time()
    frames: list[Frame] = [
        inventory("svc-1", 1, now - 10, gpus=2),
        *(sample("svc-1", s, now - 10 + s, gpus=2) for s in range(2, 7)),
        event("svc-1", 7, now - 2),
    ]
    seen: list[Frame] = []

    svc = CollectorService(cfg)
    judge = svc.ingest.on_batch
    assert judge is not None

    async def hook(batch: Sequence[Frame]) -> None:
        await judge(batch)  # the fleet state and the engine runner, as wired
        seen.extend(batch)

    svc.ingest.on_batch = hook
    task = asyncio.create_task(svc.serve())
    await asyncio.wait_for(svc.started.wait(), 30)
    assert svc.ready()
    nc = await nats.connect(private_nats.url)
    await publish(nc.jetstream(), frames)
    await until(lambda: _seen(seen, len(frames)))
    host = svc.state.host("svc-1")
    assert host is not None
    assert host.sample == frames[-2]
    assert host.inventory == frames[0]
    assert list(host.events) == [frames[-1]]
    svc.request_stop()
    await asyncio.wait_for(task, 30)
    assert not svc.ready()
    await nc.close()
    # a new service rebuilds the same state from PostgreSQL before consuming anything
    again = CollectorService(cfg)
    task = asyncio.create_task(again.serve())
    await asyncio.wait_for(again.started.wait(), 30)
    h2 = again.state.host("svc-1")
    assert h2 is not None
    assert h2.sample is not None
    assert [g.temp_c for g in h2.sample.gpus] == [g.temp_c for g in frames[-2].gpus]  # type: ignore[union-attr]
    assert h2.inventory == frames[0]
    again.request_stop()
    await asyncio.wait_for(task, 30)


async def _seen(seen: list[Frame], n: int) -> bool:
    return len(seen) >= n
