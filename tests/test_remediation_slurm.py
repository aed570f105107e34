"""Remediation end to end with a real Slurm: a simulated fleet over real NATS, PostgreSQL,
the collector and a private slurmctld (munge, gpuwarden.slurm.PrivateSlurm) whose nodes are
named after the simulated hosts.

- auto: a fatal XID drains the node with gpuwarden's reason (``sinfo -R``); when the fault
  clears and the validation exec succeeds the node is resumed; an operator's drain of another
  node is never resumed;
- dry_run changes nothing in Slurm and records the plan; approve waits, then acts on an
  approval through the API (with a write token);
- a provider-wide outage trips the circuit breaker at its share: no more drains, one page.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.fleet import host_name
from collector.api import auth, make_app
from collector.config import ApiToken
from collector.remediation import store
from collector.service import CollectorService
from gpuwarden.servers import NatsServer
from gpuwarden.slurm import PrivateSlurm
from shared.config import Secret
from tests.support.collector import Receiver, collector, webhook_toml, write_config
from tests.support.slurm import HOSTS, fleet_running, rule_toml
from tests.support.wait import until

NODES = [host_name(i) for i in range(HOSTS)]
TOKEN = "remediation-test-token"
BASE = """
[alerts]
for = "1s"
[health]
stale_after = "30s"
[health.gpu]
xid_window = "4s"
"""


def _app(svc: CollectorService, tokens: tuple[ApiToken, ...]) -> web.Application:
    """The API with ``tokens`` instead of the configured ones."""
    app = make_app(svc.parts.api_deps)
    app[auth.POLICY] = auth.Policy.of(svc.config.api, tokens)
    return app


@pytest.fixture(scope="module")
def slurm() -> Iterator[PrivateSlurm]:
    with PrivateSlurm(NODES) as s:
        yield s


def drained(s: PrivateSlurm, node: str) -> bool:
    return "DRAIN" in s.state(node)


def remediation_toml(s: PrivateSlurm, rules: str, extra: str = "") -> str:
    return f"""
[remediation]
max_running = 4
cooldown = "1h"
{extra}
[remediation.slurm]
conf = "{s.conf}"
{rules}"""


async def actions(svc: CollectorService, **kw: Any) -> list[dict[str, Any]]:
    assert svc.pool is not None
    async with svc.pool.acquire() as conn:
        return await store.list_actions(conn, **kw)


async def audit(svc: CollectorService, aid: str | None = None) -> list[dict[str, Any]]:
    assert svc.pool is not None
    async with svc.pool.acquire() as conn:
        return await store.audit(conn, aid)


async def test_auto_drains_on_fatal_xid_resumes_after_validation_and_never_undoes_an_operator_drain(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, slurm: PrivateSlurm
) -> None:
    ours, theirs = host_name(1), host_name(2)
    slurm.start_slurmd(ours)
    slurm.start_slurmd(theirs)
    slurm.drain(theirs, "operator: reseating GPU 3")
    validated = tmp_path
    rules = rule_toml("fatal-xid", ["rule=gpu.xid", "action=~drain_.*"], "auto", validated)
    extra = "[remediation.breaker]\nmax_share = 0.5\n"
    cfg = write_config(tmp_path, pg_dsn, private_nats.url, BASE + remediation_toml(slurm, rules, extra))
    faults = [f"{ours}/gpu1:xid=79@1s", f"{theirs}/gpu0:xid=79@1s", f"{host_name(3)}/gpu0:xid=13@1s"]
    async with (
        collector(cfg) as svc,
        fleet_running(private_nats.url, faults, 120, known=svc.alerting.health.provider_hosts),
    ):
        await until(lambda: ours in slurm.reasons() and drained(slurm, ours), timeout=30)
        reason = slurm.reasons()[ours]
        acts = {a["host"]: a for a in await actions(svc)}
        assert reason == f"gpuwarden: fatal-xid {acts[ours]['fingerprint']}"
        assert acts[ours]["action"] == "drain_and_reboot"
        assert acts[ours]["mode"] == "auto"
        assert host_name(3) not in acts  # XID 13 asks for restart_job: no rule matches

        async def resumed() -> bool:
            a = {x["host"]: x for x in await actions(svc)}
            return a.get(ours, {}).get("state") == "done" and a.get(theirs, {}).get("state") == "done"

        try:
            await until(resumed, timeout=60)
        except AssertionError:  # what held it: the actions, and the hosts' alerts
            held = [a for a in svc.alerting.list_alerts() if a.labels.get("host") in (ours, theirs)]
            raise AssertionError((await actions(svc), held)) from None
        assert not drained(slurm, ours)
        assert ours not in slurm.reasons()
        alert = json.loads(
            (validated / f"{ours}.json").read_text()
        )  # the validation step had the alert on stdin
        assert alert["rule"] == "gpu.xid"
        assert alert["labels"]["host"] == ours
        assert alert["action"] == "drain_and_reboot"
        # the operator's drain is untouched: still drained, still their reason
        assert drained(slurm, theirs)
        assert slurm.reasons()[theirs] == "operator: reseating GPU 3"
        acts = {a["host"]: a for a in await actions(svc)}
        assert acts[theirs]["drained"] is False
        ev_ours = [e["event"] for e in await audit(svc, acts[ours]["id"])]
        ev_theirs = await audit(svc, acts[theirs]["id"])
    for e in ("proposed", "approved", "started", "step_ok", "holding", "queued", "undone", "done"):
        assert e in ev_ours, (e, ev_ours)
    assert "undone" not in [e["event"] for e in ev_theirs]
    assert any("drained by an operator" in e["why"] for e in ev_theirs), ev_theirs


async def test_dry_run_changes_nothing_and_approve_waits_for_an_approval(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, slurm: PrivateSlurm
) -> None:
    dry, appr = host_name(4), host_name(5)
    rules = rule_toml("trial", [f"host={dry}"], "dry_run") + rule_toml("careful", [f"host={appr}"], "approve")
    cfg = write_config(tmp_path, pg_dsn, private_nats.url, BASE + remediation_toml(slurm, rules))
    faults = [f"{dry}/gpu0:xid=79@1s", f"{appr}/gpu0:xid=79@1s"]
    tokens = (ApiToken("oncall-bob", Secret(TOKEN), True),)
    async with (
        collector(cfg) as svc,
        fleet_running(private_nats.url, faults, 30),
        TestClient(TestServer(_app(svc, tokens))) as client,
    ):

        async def both() -> bool:
            a = {x["host"]: x["state"] for x in await actions(svc)}
            return a.get(dry) == "planned" and a.get(appr) == "awaiting_approval"

        await until(both, timeout=30)
        r = await client.get("/api/v1/actions")
        body = await r.json()
        by_host = {a["host"]: a for a in body["items"]}
        assert r.status == 200
        assert by_host[dry]["state"] == "planned"
        r = await client.get(f"/api/v1/actions/{by_host[dry]['id']}")
        plan = [e for e in (await r.json())["audit"] if e["event"] == "planned"]
        assert plan
        assert f"scontrol update NodeName={dry} State=DRAIN" in plan[0]["step"]
        assert not drained(slurm, dry)
        assert not drained(slurm, appr)
        aid = by_host[appr]["id"]
        r = await client.post(f"/api/v1/actions/{aid}/approve", json={})
        assert r.status == 401  # no token, nothing done
        assert not drained(slurm, appr)
        r = await client.post(
            f"/api/v1/actions/{aid}/approve",
            json={"comment": "go"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status == 200, await r.text()
        await until(lambda: drained(slurm, appr), timeout=20)
        assert slurm.reasons()[appr] == f"gpuwarden: careful {by_host[appr]['fingerprint']}"
        ev = [(e["event"], e["who"]) for e in await audit(svc, aid)]
        assert ("approved", "oncall-bob") in ev
        r = await client.post(
            f"/api/v1/actions/{aid}/approve", json={}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert r.status == 409  # approved once
    assert not drained(slurm, dry)


def breaker_pages(rx: Receiver) -> list[dict[str, Any]]:
    out = []
    for body in rx.bodies():
        for a in body["alerts"]:
            rules = a["annotations"].get("rules", "").split(",")
            if a["status"] == "firing" and "remediation.breaker" in (a["labels"]["alertname"], *rules):
                out.append(a)
    return out


async def test_provider_outage_trips_the_circuit_breaker_drains_no_more_and_pages_once(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, slurm: PrivateSlurm
) -> None:
    failing = [host_name(i) for i in (6, 7, 8, 9, 0)]
    rules = rule_toml("fatal-xid", ["rule=gpu.xid", "severity=critical"], "auto")
    extra = '[remediation.breaker]\nmax_share = 0.2\nmax_hosts = 20\nwindow = "1h"\n'  # 20 % of 10: 2 hosts
    async with Receiver() as rx:
        cfg = write_config(
            tmp_path,
            pg_dsn,
            private_nats.url,
            BASE + webhook_toml(rx.url) + remediation_toml(slurm, rules, extra),
        )
        faults = [f"{h}/gpu0:xid=79@1s" for h in failing]
        tokens = (ApiToken("oncall", Secret(TOKEN), True),)
        async with (
            collector(cfg) as svc,
            fleet_running(private_nats.url, faults, 30, known=svc.alerting.health.provider_hosts),
        ):
            rem = svc.alerting.remediation

            async def decided() -> bool:
                a = await actions(svc)
                return len(a) == len(failing) and all(x["state"] in ("blocked", "done") for x in a)

            await until(decided, timeout=30)
            await until(lambda: len(breaker_pages(rx)) >= 1, timeout=20)
            await asyncio.sleep(2.0)  # not synchronisation: the time a second page would have had
            acts = await actions(svc)
            states = sorted(a["state"] for a in acts)
            assert states == ["blocked", "blocked", "blocked", "done", "done"], acts
            assert sum(drained(slurm, h) for h in failing) == 2
            assert len(breaker_pages(rx)) == 1, breaker_pages(rx)
            assert rem.state.breakers["provider-0"].tripped_at is not None
            async with TestClient(TestServer(_app(svc, tokens))) as client:
                metrics = await (await client.get("/metrics")).text()
                assert 'gpuwarden_remediation_breaker_open{provider="provider-0"} 1.0' in metrics
                assert 'gpuwarden_remediation_actions{state="blocked"} 3.0' in metrics
                r = await client.get("/api/v1/remediation")
                br = (await r.json())["breakers"]
                assert [b["open"] for b in br] == [True]
                assert "limit 2" in br[0]["reason"]
                r = await client.post(
                    "/api/v1/remediation/breakers/provider-0/reset",
                    json={},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert r.status == 200, await r.text()
            assert rem.state.breakers["provider-0"].tripped_at is None
            events = [e["event"] for e in await audit(svc)]
            assert events.count("breaker_tripped") == 1
            assert "breaker_reset" in events
    for h in failing:  # leave the module's Slurm as found
        if drained(slurm, h):
            slurm.run("scontrol", "update", f"NodeName={h}", "State=RESUME", check=False)


async def test_a_collector_restart_drains_a_node_once_and_resumes_it_once(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, slurm: PrivateSlurm
) -> None:
    host = host_name(3)
    slurm.start_slurmd(host)
    rules = rule_toml("fatal-xid", [f"host={host}", "rule=gpu.xid"], "auto", tmp_path)
    extra = "[remediation.breaker]\nmax_share = 1.0\n"
    base = BASE.replace('xid_window = "4s"', 'xid_window = "10s"')
    cfg = write_config(tmp_path, pg_dsn, private_nats.url, base + remediation_toml(slurm, rules, extra))
    async with fleet_running(private_nats.url, [f"{host}/gpu0:xid=79@1s"], 40):
        async with collector(cfg) as svc:
            await until(lambda: drained(slurm, host), timeout=30)
            first = slurm.reasons()[host]

            async def holding() -> bool:
                return [a["state"] for a in await actions(svc)] == ["holding"]

            await until(holding, timeout=20)
            (held,) = await actions(svc)
        async with collector(cfg) as svc:  # the same database: restored, decided already
            # the same action, not proposed again: still holding, or (a loaded machine's slow
            # restart outlasting the XID window) already resumed; the counts below say once each
            (back,) = await actions(svc)
            assert back["id"] == held["id"], back
            assert back["state"] in ("holding", "done"), back

            async def done() -> bool:
                return [a["state"] for a in await actions(svc)] == ["done"]

            await until(done, timeout=40)
            events = await audit(svc)
    assert not drained(slurm, host)
    assert first.startswith("gpuwarden: fatal-xid ")
    drains = [e for e in events if e["event"] == "step_ok" and e["step"] == "slurm_drain"]
    assert len(drains) == 1
    assert [e["event"] for e in events].count("proposed") == 1
    assert [e["event"] for e in events].count("undone") == 1


async def test_a_drain_interrupted_before_its_outcome_was_written_is_not_repeated(
    slurm: PrivateSlurm,
) -> None:
    """A collector that stopped after scontrol but before writing the outcome re-runs the
    step: the node is already drained with gpuwarden's reason, so nothing is done again (the
    reason keeps the first action's id), and the action owns the drain (may resume it)."""
    from collector.remediation.config import RemediationConfig, Slurm
    from collector.remediation.engine import Action
    from collector.remediation.executors import Executor

    node = host_name(4)
    slurm.drain(node, "gpuwarden: fatal-xid 1111111111111111")
    ex = Executor(RemediationConfig(slurm=Slurm(conf=str(slurm.conf))))
    act = Action(
        "a2",
        "fatal-xid",
        "2222222222222222",
        1,
        "gpu.xid",
        "drain_and_reboot",
        "critical",
        "p",
        node,
        node,
        "auto",
        "running",
        0.0,
        0.0,
    )
    res = await ex.drain(act)
    assert res.ok
    assert res.drained is True
    assert slurm.reasons()[node] == "gpuwarden: fatal-xid 1111111111111111"
    slurm.drain(node, "operator: bad PSU")  # an operator takes the node over
    act.drained = True
    res = await ex.resume(act)
    assert res.ok
    assert not res.undone
    assert drained(slurm, node)
    assert "drained by an operator" in res.why
    slurm.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
    await ex.close()
