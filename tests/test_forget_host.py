"""Forgetting a decommissioned host (issue 9, item 5), against a running collector with real
nats-server and PostgreSQL: ``gpuwarden collector forget-host`` (the installed console script)
and ``DELETE /api/v1/hosts/{host}`` (token required) resolve the host's alerts with reason
``forgotten``, take it out of the fleet and the expected state, keep its history; a restart
does not bring it back; if it reports again it comes back as a new host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from collector.config import CollectorConfig, load_collector_config
from collector.service import CollectorService
from gpuwarden.servers import NatsServer, free_port
from tests.support.collector import collector, send
from tests.support.records import event, sample
from tests.support.wait import until

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "forget-" + uuid.uuid4().hex


def console_script() -> str:
    script = shutil.which("gpuwarden", path=str(Path(sys.executable).parent))
    assert script, "the gpuwarden console script is not installed (make install)"
    return script


async def forget_host_cli(*args: str) -> tuple[int, str, str]:
    """Run ``gpuwarden collector forget-host ...`` without blocking the collector's loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWARDEN_")}
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        "collector",
        "forget-host",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def serving(cfg: CollectorConfig) -> AsyncIterator[tuple[CollectorService, str]]:
    """The collector with its HTTP API on a free port (and its base URL)."""
    svc = CollectorService(cfg, api=True)
    server = svc.api
    assert server is not None
    await svc.startup()
    task = asyncio.create_task(svc.run())
    try:
        yield svc, f"http://127.0.0.1:{server.port}"
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)
        await svc.shutdown()


def config(tmp: Path, dsn: str, nats_url: str, inventory: Path) -> CollectorConfig:
    path = tmp / "collector.toml"
    path.write_text(
        f"""
[collector]
listen = "127.0.0.1:{free_port()}"
batch = 200
fetch_timeout = "100ms"
durable = "f{abs(hash(str(tmp))) % 10**8}"
[api]
tokens = ["{TOKEN}"]
[inventory]
source = "{inventory}"
[alerting]
tick = "200ms"
health_snapshot = "1s"
"""
    )
    return load_collector_config(path, env={}, flags={"postgres.dsn": dsn, "nats.servers": [nats_url]})


async def test_forget_host_resolves_its_alerts_keeps_history_and_a_report_brings_it_back_as_new(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    inventory = tmp_path / "inventory.json"  # the source still lists the host: ignored for it
    inventory.write_text(json.dumps([{"host": "gone-1", "provider": "prov-a", "gpus": 8}]))
    cfg = config(tmp_path, pg_dsn, private_nats.url, inventory)
    now = time.time()
    async with serving(cfg) as (svc, base):
        await send(private_nats.url, [sample("gone-1", 1, now), event("gone-1", 2, now, xid=79)])
        await send(private_nats.url, [sample("stay-1", 1, now), event("stay-1", 2, now, xid=79)])
        firing = lambda: svc.alerting.list_alerts(state="firing")  # noqa: E731
        xid = lambda h: [a for a in firing() if a.labels["host"] == h and a.rule == "gpu.xid"]  # noqa: E731
        await until(lambda: len(xid("gone-1")) == len(xid("stay-1")) == 1)
        (gone,) = xid("gone-1")

        async with aiohttp.ClientSession() as http:
            r = await http.delete(f"{base}/api/v1/hosts/gone-1")
            assert r.status == 401  # a token is required
            r = await http.delete(f"{base}/api/v1/hosts/gone-1", headers={"Authorization": "Bearer nope"})
            assert r.status == 403

        code, out, err = await forget_host_cli("gone-1", "--url", base, "--token", TOKEN)
        assert code == 0, err
        mine = svc.alerting.list_alerts(host="gone-1")  # the XID, and unreachable if it was by then
        assert all(a.state == "resolved" for a in mine)
        n = sum(a.reason == "forgotten" for a in mine)
        assert f"forgot gone-1: {n} alert(s) resolved" in out
        assert "inventory source still lists gone-1" in out

        assert gone.state == "resolved"
        assert gone.reason == "forgotten"
        assert {a.labels["host"] for a in firing()} == {"stay-1"}
        assert "gone-1" not in svc.alerting.health.hosts
        assert svc.state.host("gone-1") is None
        async with aiohttp.ClientSession() as http:
            r = await http.get(f"{base}/api/v1/hosts/gone-1")
            assert r.status == 404
            r = await http.get(f"{base}/api/v1/hosts")
            assert [h["name"] for h in (await r.json())["items"]] == ["stay-1"]
            r = await http.get(f"{base}/api/v1/alerts/{gone.fingerprint}")
            assert (await r.json())["reason"] == "forgotten"
            r = await http.get(f"{base}/api/v1/hosts/gone-1/history?metric=temp_c&since=0")
            assert r.status == 200
            assert (await r.json())["points"]

        code, out, err = await forget_host_cli("nobody", "--url", base, "--token", TOKEN)
        assert code == 1
        assert "HTTP 404" in err

        # the expected inventory lists it, but it is not expected again: no unreachable alert
        ticks = svc.alerting.counts["evaluations"]
        await until(lambda: svc.alerting.counts["evaluations"] >= ticks + 5)
        assert "gone-1" not in svc.alerting.health.hosts
        await until(lambda: svc.alerting.stats["outbox_backlog"] == 0)

    db = await asyncpg.connect(pg_dsn)
    try:
        assert await db.fetchval("SELECT forgotten_at IS NOT NULL FROM hosts WHERE name = 'gone-1'")
        assert await db.fetchval(
            "SELECT count(*) FROM events e JOIN hosts h ON h.id = e.host_id WHERE h.name = 'gone-1'"
        )
        reasons = await db.fetch(
            "SELECT reason FROM alert_transitions WHERE fingerprint = $1 AND kind = 'resolved'",
            gone.fingerprint,
        )
        assert [r["reason"] for r in reasons] == ["forgotten"]
        # those told are told it resolved; an alert inhibited when forgotten is not (inhibited
        # alerts are not notified): under load gone-1 may have gone unreachable before the
        # forget (stale_after), inhibiting its XID; that unreachable alert's resolution is told
        muted = await db.fetchval(
            "SELECT kind FROM alert_transitions WHERE fingerprint = $1"
            " AND kind IN ('inhibited', 'uninhibited') ORDER BY id DESC LIMIT 1",
            gone.fingerprint,
        )
        told = await db.fetch(
            "SELECT payload FROM notification_outbox WHERE payload->'labels'->>'host' = 'gone-1'"
            " AND payload->>'kind' = 'resolved'"
        )
        told_of = {json.loads(r["payload"])["fingerprint"]: json.loads(r["payload"]) for r in told}
        assert all(p["reason"] == "forgotten" for p in told_of.values())
        if muted == "inhibited":
            assert gone.fingerprint not in told_of
            assert [p["rule"] for p in told_of.values()] == ["host.unreachable"]
        else:
            assert gone.fingerprint in told_of
    finally:
        await db.close()

    # a restart does not bring it back (the fleet state is rebuilt from every stored host)
    async with collector(cfg) as svc:
        assert svc.state.host("gone-1") is None
        assert svc.state.host("stay-1") is not None
        ticks = svc.alerting.counts["evaluations"]
        await until(lambda: svc.alerting.counts["evaluations"] >= ticks + 5)
        assert "gone-1" not in svc.alerting.health.hosts
        assert not [a for a in svc.alerting.list_alerts(host="gone-1") if a.state != "resolved"]
        # it reports again: a new host, healthy, with its forgotten mark cleared
        await send(private_nats.url, [sample("gone-1", 10, time.time())])
        await until(lambda: "gone-1" in svc.alerting.health.hosts and svc.state.host("gone-1") is not None)
        await until(lambda: "gone-1" not in svc.alerting.forgotten)
        assert svc.alerting.get_alert(gone.fingerprint).state == "resolved"  # type: ignore[union-attr]
    db = await asyncpg.connect(pg_dsn)
    try:
        assert await db.fetchval("SELECT forgotten_at IS NULL FROM hosts WHERE name = 'gone-1'")
    finally:
        await db.close()


@pytest.mark.parametrize("url", ["ftp://x", "file:///etc/passwd"])
def test_forget_host_refuses_a_url_that_is_not_http(url: str) -> None:
    import subprocess  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWARDEN_")}
    p = subprocess.run(
        [console_script(), "collector", "forget-host", "h1", "--url", url, "--token", "t"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "--url" in p.stderr
