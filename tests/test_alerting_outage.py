"""The monitor's own outages are not the fleet's (issue 16), against real servers.

* PostgreSQL stopped under a live fleet (simulated agents, 0.5 s samples), a fatal XID during
  the outage: the XID is paged while PostgreSQL is still down (fail-open) and escalates on time
  meanwhile, no host alert and no
  provider incident, one collector self-alert (resolved when PostgreSQL is back); afterwards the
  XID's alert and its notification are in PostgreSQL once and no host's stored history has a gap.
* NATS stopped under a live fleet: no host alert and no provider incident, a collector
  self-alert, nothing lost, the agents' outage reports visible in the host API.
* The dead man's switch: a real collector process beats to a local receiver; SIGSTOP stops the
  beats, SIGCONT resumes them.

Outages are ~10 s here instead of the 30-40 s of the issue, with thresholds shortened to match
(``[health] stale_after = "2s"``, ``[selfcheck] grace = "1s"``): the same conditions are shown
(each outage outlasts stale_after several times over).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from agent.fleet import Fleet
from agent.gpu.base import GpuEvent
from agent.sampler import build_event
from collector.api import make_app
from collector.service import CollectorService
from collector.store import migrate
from gpuwarden.servers import NatsServer, PostgresServer, free_port
from shared.config import NatsConfig
from shared.frames import encode
from tests.support.collector import Receiver, collector, webhook_toml, write_config
from tests.support.local_http import Handler, LocalHttp
from tests.support.wait import until

OUTAGE_S = 10.0
ESCALATE = """
[[notify.webhook]]
name = "manager"
url = "{}"
[[escalation.policy]]
name = "xid"
match = {{ rule = "gpu.xid" }}
levels = [{{ after = "0s", notify = ["hook"] }}, {{ after = "2s", notify = ["manager"] }}]
[[escalation.policy]]
name = "rest"
levels = [{{ after = "0s", notify = ["hook"] }}]
"""
BODY = '[health]\nstale_after = "2s"\n[selfcheck]\ngrace = "1s"\n'


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


async def _migrated(dsn: str) -> None:
    c = await asyncpg.connect(dsn)
    try:
        await migrate.migrate(c)
    finally:
        await c.close()


def _fleet(url: str, hosts: int = 4) -> Fleet:
    cfg = NatsConfig(servers=(url,), reconnect_wait=0.2, reconnect_wait_max=1.0, buffer_frames=10_000)
    return Fleet(cfg, hosts=hosts, gpus=2, interval=0.5)


def _xid(fleet: Fleet, xid: int = 79) -> str:
    """A fatal XID on the first host's GPU 0, published the way the agent does (urgent)."""
    h = fleet.hosts[0]
    uuid = h.backend.inventory().gpus[0].uuid
    frame = build_event(h.seqr, GpuEvent("xid", time.time(), "simulated", 0, uuid, xid=xid), 1)
    fleet.publisher.publish(h.seqr.subjects[1], encode(frame), urgent=True)
    return h.seqr.host


def _fired(svc: CollectorService, rule_prefix: str) -> list[str]:
    return [a.rule for a in svc.alerting.list_alerts() if a.rule.startswith(rule_prefix)]


def _provider_incidents(svc: CollectorService) -> list[dict[str, Any]]:
    return [i for i in svc.alerting.list_incidents() if i["host"] is None]


async def _shows_its_own_outage(svc: CollectorService, cause: str) -> None:
    """/readyz and /metrics say what the collector's own problem is."""
    reg = CollectorRegistry()
    reg.register(svc.parts.api_deps.metrics)
    assert reg.get_sample_value("gpuwarden_collector_pipeline_impaired") == 1.0
    labels = {"check": "collector.pipeline", "cause": cause}
    assert reg.get_sample_value("gpuwarden_collector_self_problem", labels) == 1.0
    async with TestClient(TestServer(make_app(svc.parts.api_deps))) as client:
        r = await client.get("/readyz")
        body = await r.json()
    assert body["self"]["impaired_since"] is not None
    assert [p["cause"] for p in body["self"]["problems"]] == [cause]


def _hook_rules(rx: Receiver) -> list[tuple[str, str]]:
    return [(status, name) for status, name, _ in rx.alerts()]


async def test_postgres_outage_pages_from_memory_and_blames_the_collector_not_the_fleet(
    tmp_path: Path, own_pg: PostgresServer, private_nats: NatsServer
) -> None:
    dsn = own_pg.dsn()
    await _migrated(dsn)
    fleet = _fleet(private_nats.url)
    async with Receiver() as rx, Receiver() as mgr:
        cfg = write_config(
            tmp_path, dsn, private_nats.url, BODY + webhook_toml(rx.url) + ESCALATE.format(mgr.url)
        )
        async with collector(cfg) as svc:
            await fleet.start()
            run = asyncio.create_task(fleet.run())
            try:
                await until(lambda: len(svc.alerting.health.hosts) == 4 and svc.ingest.stats.batches > 4)
                await asyncio.to_thread(own_pg.stop, "immediate")
                stopped = time.monotonic()
                await until(lambda: svc.alerting.self_status.impaired_since is not None)
                # the collector's own alert is delivered while PostgreSQL is down (fail-open)
                await until(lambda: ("firing", "collector.pipeline") in _hook_rules(rx))
                (own,) = [
                    a for a in rx.bodies() if a["alerts"][0]["labels"]["alertname"] == "collector.pipeline"
                ]
                assert (
                    "cannot store: PostgreSQL unreachable since" in own["alerts"][0]["annotations"]["summary"]
                )
                await _shows_its_own_outage(svc, "postgres")
                host = _xid(fleet)
                await until(lambda: ("firing", "gpu.xid") in _hook_rules(rx))
                assert own_pg.proc is None or own_pg.proc.poll() is not None  # paged while still down
                # escalation timers keep running: unacknowledged, the XID reaches level 1 (2 s later)
                await until(lambda: ("firing", "gpu.xid") in _hook_rules(mgr))
                assert own_pg.proc is None or own_pg.proc.poll() is not None
                assert svc.alerting.pg_down()
                # hold the outage well past stale_after: no host is blamed for the collector's fault
                await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
                assert _fired(svc, "host.") == []
                assert _provider_incidents(svc) == []
                await asyncio.to_thread(own_pg.start)
                await until(lambda: ("resolved", "collector.pipeline") in _hook_rules(rx), timeout=60)
                await until(lambda: svc.alerting.self_status.impaired_since is None, timeout=60)
                await until(lambda: svc.ingest.stats.consumer_pending == 0 and not svc.alerting.pg_down())
                resumed = time.monotonic()
                # staleness resumes from fresh arrivals: still no host alert a few stale_afters later
                await until(lambda: time.monotonic() - resumed > 5.0)
                assert _fired(svc, "host.") == []
                assert _provider_incidents(svc) == []
                await until(lambda: svc.alerting._early_open == 0)  # every early page is in PostgreSQL
            finally:
                fleet.stop()
                await run
                await fleet.close()
    rules = _hook_rules(rx)
    assert rules.count(("firing", "gpu.xid")) == 1
    assert rules.count(("firing", "collector.pipeline")) == 1
    assert rules.count(("resolved", "collector.pipeline")) == 1
    assert not [r for r in rules if r[1].startswith("host.")]
    c = await asyncpg.connect(dsn)
    try:
        xid = await c.fetch(
            "SELECT fingerprint, state FROM alerts WHERE rule = 'gpu.xid' AND labels->>'host' = $1", host
        )
        rows = await c.fetch(
            "SELECT status FROM notification_outbox WHERE channel = 'hook' AND payload->>'rule' = 'gpu.xid'"
            " AND payload->>'kind' = 'firing'"
        )
        self_rows = await c.fetch(
            "SELECT payload->>'kind' AS kind, status FROM notification_outbox"
            " WHERE channel = 'hook' AND payload->>'rule' = 'collector.pipeline' ORDER BY id"
        )
        gaps = await c.fetch(
            "SELECT h.name, count(*) AS n, max(s.seq) - min(s.seq) + 1 AS span FROM host_samples s"
            " JOIN hosts h ON h.id = s.host_id GROUP BY h.name, s.boot_id"
        )
        events = await c.fetchval("SELECT count(*) FROM events WHERE xid = 79")
        escalated = await c.fetch(
            "SELECT status FROM notification_outbox WHERE channel = 'manager'"
            " AND payload->>'rule' = 'gpu.xid'"
        )
    finally:
        await c.close()
    assert len(xid) == 1
    assert [r["status"] for r in rows] == ["sent"]  # recorded once, with the id it was sent under
    assert [(r["kind"], r["status"]) for r in self_rows] == [("firing", "sent"), ("resolved", "sent")]
    assert len(gaps) == 4
    for g in gaps:  # samples and events share the sequence: a host's samples span it without holes
        assert g["span"] - g["n"] <= (1 if g["name"] == host else 0) + 1, dict(g)  # + its inventory
    assert events == 1
    assert [r["status"] for r in escalated] == ["sent"]  # escalated during the outage, recorded once
    assert [r for r in _hook_rules(mgr) if r[1] == "gpu.xid"] == [("firing", "gpu.xid")]


async def test_nats_outage_blames_the_collector_and_shows_the_agents_outage_reports(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    fleet = _fleet(private_nats.url, hosts=3)
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, private_nats.url, BODY + webhook_toml(rx.url))
        async with collector(cfg) as svc:
            await fleet.start()
            run = asyncio.create_task(fleet.run())
            try:
                await until(lambda: len(svc.alerting.health.hosts) == 3 and svc.ingest.stats.batches > 4)
                await asyncio.to_thread(private_nats.stop)
                stopped = time.monotonic()
                await until(lambda: svc.alerting.self_status.impaired_since is not None)
                await until(lambda: any(p.cause == "nats" for p in svc.alerting.self_status.problems))
                await _shows_its_own_outage(svc, "nats")
                await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
                assert _fired(svc, "host.") == []
                assert _provider_incidents(svc) == []
                await asyncio.to_thread(private_nats.start)
                # the self-alert, recorded in PostgreSQL; told on the webhook once NATS-side is back
                await until(lambda: ("firing", "collector.pipeline") in _hook_rules(rx), timeout=60)
                await until(lambda: ("resolved", "collector.pipeline") in _hook_rules(rx), timeout=60)
                names = [h.seqr.host for h in fleet.hosts]
                await until(
                    lambda: all((h := svc.state.host(n)) is not None and h.outage is not None for n in names),
                    timeout=60,
                )
                resumed = time.monotonic()
                await until(lambda: time.monotonic() - resumed > 5.0)
                assert _fired(svc, "host.") == []
                assert _provider_incidents(svc) == []
            finally:
                fleet.stop()
                await run
                await fleet.close()
            from collector.api.views import host_detail

            for n in names:
                hs = svc.state.host(n)
                view = host_detail(n, svc.alerting.host_health(n), hs, {})["publish_outage"]
                assert view is not None
                assert view["seconds"] >= OUTAGE_S - 1
                assert view["buffered_frames"] > 0
                assert view["dropped_frames"] == 0
    assert not [r for r in _hook_rules(rx) if r[1].startswith("host.")]
    assert fleet.publisher.stats.dropped == 0
    c = await asyncpg.connect(pg_dsn)
    try:
        spans = await c.fetch(
            "SELECT h.name, count(*) AS n, max(s.seq) - min(s.seq) + 1 AS span FROM host_samples s"
            " JOIN hosts h ON h.id = s.host_id WHERE h.name = ANY($1::text[]) GROUP BY h.name, s.boot_id",
            names,
        )
    finally:
        await c.close()
    assert len(spans) == 3
    for s in spans:  # nothing lost: every sample of every host stored (its inventory takes one seq)
        assert s["span"] - s["n"] <= 1, dict(s)


class Beats(LocalHttp):
    """A local heartbeat receiver: counts POSTs."""

    def __init__(self) -> None:
        self.count = 0
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/beat"

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.count += 1
        return web.Response(status=200)

    def routes(self) -> list[tuple[str, Handler]]:
        return [("/beat", self.handle)]


async def test_heartbeat_stops_when_the_collector_is_stopped_and_resumes(
    tmp_path: Path, pg_dsn: str, nats_url: str
) -> None:
    async with Beats() as beats:
        cfg = tmp_path / "collector.toml"
        cfg.write_text(
            f'[collector]\nlisten = "127.0.0.1:{free_port()}"\ndurable = "hb{os.getpid()}"\n'
            f'[postgres]\ndsn = "{pg_dsn}"\n[nats]\nservers = ["{nats_url}"]\n'
            '[alerting]\ntick = "100ms"\n'
            f'[selfcheck]\nheartbeat_url = "{beats.url}"\nheartbeat_interval = "200ms"\n'
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpuwarden",
            "collector",
            "run",
            "--config",
            str(cfg),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await until(lambda: beats.count >= 3, timeout=60)
            os.kill(proc.pid, signal.SIGSTOP)
            await asyncio.sleep(1.0)  # a beat already on the wire may still land
            stopped_at = beats.count
            await asyncio.sleep(2.0)  # ten intervals: a free-running sender would have beaten
            assert beats.count == stopped_at
            os.kill(proc.pid, signal.SIGCONT)
            await until(lambda: beats.count >= stopped_at + 3, timeout=30)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_a_wedged_alerting_loop_stops_the_heartbeat(tmp_path: Path, pg_dsn: str, nats_url: str) -> None:
    """The process is alive (API, ingest, event loop) but the alerting loop cannot progress
    (its evaluation lock held): no beat goes out until it progresses again."""
    async with Beats() as beats:
        body = f'[selfcheck]\nheartbeat_url = "{beats.url}"\nheartbeat_interval = "100ms"\n'
        cfg = write_config(tmp_path, pg_dsn, nats_url, body)
        async with collector(cfg) as svc:
            await until(lambda: beats.count >= 3)
            async with svc.alerting._lock:  # the next tick waits here: the loop is wedged
                await asyncio.sleep(0.5)  # a beat already on the wire may still land
                wedged_at = beats.count
                await asyncio.sleep(1.5)  # fifteen intervals
                assert beats.count == wedged_at
                assert not svc.should_exit.is_set()  # the process itself runs on
            await until(lambda: beats.count >= wedged_at + 3)


async def test_pages_spooled_while_postgres_was_down_are_recorded_at_the_next_start(
    tmp_path: Path, pg_dsn: str, nats_url: str
) -> None:
    """A collector that stopped before PostgreSQL came back left its early deliveries in the
    spool: the next start writes them to the outbox as they ended (sent, or failed with a dead
    letter) and empties the spool; a row already pending under the same key is completed."""
    from collector.notify.outbox import OutboxRow, Outcome, Spool

    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir / "notify-spool-0.jsonl")
    payload = {"kind": "firing", "rule": "gpu.xid", "at": time.time()}
    pending_key = f"spool-test/{time.time()}/pending/hook"
    c = await asyncpg.connect(pg_dsn)
    try:
        await migrate.migrate(c)
        await c.execute(
            "INSERT INTO notification_outbox (partition, channel, delivery_key, payload)"
            " VALUES (0, 'hook', $1, $2)",
            pending_key,
            json.dumps(payload),
        )
    finally:
        await c.close()
    sent_key, failed_key = f"spool-test/{time.time()}/sent/hook", f"spool-test/{time.time()}/failed/hook"
    spool.append(OutboxRow(0, "hook", sent_key, payload), Outcome("sent", 1, None, time.time()))
    spool.append(OutboxRow(0, "hook", failed_key, payload), Outcome("failed", 3, "HTTP 500", time.time()))
    spool.append(OutboxRow(0, "hook", pending_key, payload), Outcome("sent", 2, None, time.time()))
    async with Receiver() as rx:
        cfg = write_config(
            tmp_path, pg_dsn, nats_url, webhook_toml(rx.url), alerting=f'spool = "{spool_dir}"'
        )
        async with collector(cfg):
            pass
        assert rx.received == []  # recorded, not sent again
    assert not spool.path.exists()  # type: ignore[union-attr]
    c = await asyncpg.connect(pg_dsn)
    try:
        rows = {
            r["delivery_key"]: (r["status"], r["attempts"])
            for r in await c.fetch(
                "SELECT delivery_key, status, attempts FROM notification_outbox"
                " WHERE delivery_key LIKE 'spool-test/%'"
            )
        }
        dead = await c.fetchval(
            "SELECT count(*) FROM notification_dead_letter d JOIN notification_outbox o ON o.id = d.outbox_id"
            " WHERE o.delivery_key = $1",
            failed_key,
        )
    finally:
        await c.close()
    assert rows == {sent_key: ("sent", 1), failed_key: ("failed", 3), pending_key: ("sent", 2)}
    assert dead == 1
