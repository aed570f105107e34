"""The HTTP API against a running collector: real nats-server (JetStream), real PostgreSQL,
frames published on NATS and consumed, the health and alert engines, aiohttp's test client.

Shared by test_api_openapi.py (the module-scoped collector is built by ``running``).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from collector.api import make_app
from collector.api.stream import QUEUE
from collector.config import load_collector_config
from collector.health.rollup import rollup
from collector.service import CollectorService
from gpuwarden.servers import NatsServer, free_port
from shared.errors import ConfigError
from tests.support.api import AUTH, HOSTS, XID_HOST, running
from tests.support.collector import send
from tests.support.records import event
from tests.support.wait import until


@pytest.fixture(scope="module")
async def service(
    tmp_path_factory: pytest.TempPathFactory, module_dsn: str, module_nats: NatsServer
) -> AsyncIterator[CollectorService]:
    async with running(tmp_path_factory.mktemp("api"), module_dsn, module_nats.url) as svc:
        yield svc


@pytest.fixture
async def client(service: CollectorService) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(make_app(service.parts.api_deps))) as c:
        yield c


Client = TestClient[web.Request, web.Application]


async def get(client: Client, path: str, expect: int = 200, **params: Any) -> Any:
    r = await client.get(path, params=params)
    assert r.status == expect, await r.text()
    return await r.json()


async def test_health_and_readiness(client: Client) -> None:
    assert await get(client, "/healthz") == {"status": "ok"}
    ready = await get(client, "/readyz")
    assert ready["status"] == "ready"
    assert ready["checks"]["nats"]["ok"]
    assert ready["checks"]["postgres"]["ok"]


async def test_providers_with_counts_filters_and_pages(client: Client) -> None:
    body = await get(client, "/api/v1/providers")
    names = [p["name"] for p in body["items"]]
    assert names == ["prov-a", "prov-b"]
    a = body["items"][0]
    assert a["hosts"] == 3
    assert a["gpus"] == 24
    assert sum(a["hosts_by_status"].values()) == 3
    assert a["gpus_usable"] <= 24
    first = await get(client, "/api/v1/providers", limit=1)
    assert [p["name"] for p in first["items"]] == ["prov-a"]
    assert first["total"] == 2
    second = await get(client, "/api/v1/providers", limit=1, cursor=first["next_cursor"])
    assert [p["name"] for p in second["items"]] == ["prov-b"]
    assert second["next_cursor"] is None
    one = await get(client, "/api/v1/providers/prov-b")
    assert one["hosts"] == 2
    err = await get(client, "/api/v1/providers/nope", 404)
    assert err["parameter"] == "provider"


async def test_hosts_list_filters_and_errors(client: Client) -> None:
    body = await get(client, "/api/v1/hosts", provider="prov-a")
    assert [h["name"] for h in body["items"]] == HOSTS["prov-a"]
    assert all(h["gpus"] == 8 for h in body["items"])
    everything = await get(client, "/api/v1/hosts")
    assert everything["total"] == 5
    crit = await get(client, "/api/v1/hosts", status="critical")
    assert XID_HOST in [h["name"] for h in crit["items"]]
    assert all(h["status"] == "critical" for h in crit["items"])
    err = await get(client, "/api/v1/hosts", 400, status="purple")
    assert err["parameter"] == "status"
    err = await get(client, "/api/v1/hosts", 400, limit="0")
    assert err["parameter"] == "limit"
    err = await get(client, "/api/v1/hosts", 400, cursor="x")
    assert err["parameter"] == "cursor"
    assert (await get(client, "/api/v1/hosts", 404, provider="nope"))["parameter"] == "provider"


async def test_host_detail_has_gpus_readings_health_and_xids(client: Client) -> None:
    h = await get(client, f"/api/v1/hosts/{XID_HOST}")
    assert h["provider"] == "prov-a"
    assert len(h["gpu_list"]) == 8
    g2 = h["gpu_list"][2]
    assert g2["xids"] == {"79": 1} or g2["xids"].get("79", 0) >= 1
    assert g2["status"] == "critical"
    assert g2["problems"]
    g0 = h["gpu_list"][0]
    assert g0["readings"]["temp_c"] is not None
    assert g0["readings"]["power_w"] is not None
    assert h["system"]["cpu_count"] == 64
    assert h["driver_version"] == "550.54.15"
    assert any(e["xid"] == 79 for e in h["events"])
    assert (await get(client, "/api/v1/hosts/nope", 404))["parameter"] == "host"


async def test_history_raw_paginated_aggregated_and_errors(client: Client) -> None:
    path = "/api/v1/hosts/a-0/history"
    since = time.time() - 600
    body = await get(client, path, metric="temp_c", gpu="0", since=str(since))
    assert body["source"] == "raw"
    assert len(body["points"]) == 3
    assert all(p["gpu"] == 0 and p["value"] is not None for p in body["points"])
    p1 = await get(client, path, metric="temp_c", gpu="0", since=str(since), limit="2")
    assert len(p1["points"]) == 2
    assert p1["next_cursor"]
    p2 = await get(
        client, path, metric="temp_c", gpu="0", since=str(since), limit="2", cursor=p1["next_cursor"]
    )
    assert [p["ts"] for p in p1["points"] + p2["points"]] == [p["ts"] for p in body["points"]]
    agg = await get(client, path, metric="temp_c", since=str(since), step="600")
    assert agg["points"]
    assert sum(p["count"] for p in agg["points"]) == 3 * 8
    host_metric = await get(client, path, metric="cpu_pct", since=str(since))
    assert host_metric["points"]
    assert host_metric["points"][0]["gpu"] is None
    assert (await get(client, path, 400))["parameter"] == "metric"
    assert (await get(client, path, 400, metric="bogus"))["parameter"] == "metric"
    assert (await get(client, path, 400, metric="temp_c", since="abc"))["parameter"] == "since"
    assert (await get(client, path, 400, metric="temp_c", since="10", until="5"))["parameter"] == "until"
    assert (await get(client, path, 400, metric="temp_c", step="-1"))["parameter"] == "step"
    assert (await get(client, path, 400, metric="cpu_pct", gpu="1"))["parameter"] == "gpu"
    assert (await get(client, "/api/v1/hosts/nope/history", 404, metric="temp_c"))["parameter"] == "host"


async def test_alerts_list_filters_and_unknown(client: Client) -> None:
    body = await get(client, "/api/v1/alerts", host=XID_HOST)
    xid = [a for a in body["items"] if a["labels"].get("gpu") == "2" and a["labels"].get("xid") == "79"]
    assert xid
    assert xid[0]["severity"] == "critical"
    assert xid[0]["advice"]
    assert xid[0]["state"] == "firing"
    none = await get(client, "/api/v1/alerts", host=XID_HOST, severity="info")
    assert all(a["severity"] == "info" for a in none["items"])
    assert (await get(client, "/api/v1/alerts", 400, state="sleepy"))["parameter"] == "state"
    assert (await get(client, "/api/v1/alerts", 400, severity="meh"))["parameter"] == "severity"
    one = await get(client, f"/api/v1/alerts/{xid[0]['id']}")
    assert one["id"] == xid[0]["id"]
    assert (await get(client, "/api/v1/alerts/ffff", 404))["parameter"] == "alert"
    incidents = await get(client, "/api/v1/incidents", open="true")
    assert any(i["open"] for i in incidents["items"])


async def test_ack_needs_a_valid_token_and_changes_the_state(client: Client) -> None:
    alerts = (await get(client, "/api/v1/alerts", host=XID_HOST, state="firing"))["items"]
    fp = next(a["id"] for a in alerts if a["labels"].get("xid") == "79")
    r = await client.post(f"/api/v1/alerts/{fp}/ack", json={})
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = await client.post(f"/api/v1/alerts/{fp}/ack", json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status == 403
    r = await client.post("/api/v1/alerts/ffff/ack", json={}, headers=AUTH)
    assert r.status == 404
    r = await client.post(
        f"/api/v1/alerts/{fp}/ack", data=b"[1,", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status == 400
    assert (await r.json())["parameter"] == "body"
    r = await client.post(f"/api/v1/alerts/{fp}/ack", json={"by": "alice", "comment": "on it"}, headers=AUTH)
    assert r.status == 200, await r.text()
    view = await r.json()
    assert view["flags"]["acknowledged"]
    assert view["ack"]["by"] == "token-0"  # the token's name, not the body's "by"
    acked = await get(client, "/api/v1/alerts", state="acknowledged")
    assert fp in [a["id"] for a in acked["items"]]


async def test_an_incident_is_one_item_and_its_ack_acknowledges_its_members(
    service: CollectorService, client: Client, module_nats: NatsServer
) -> None:
    await send(module_nats.url, [event("b-1", 4, time.time(), provider="prov-b", xid=48)])
    await until(lambda: any(a.state == "firing" for a in service.alerting.list_alerts(host="b-1")))
    incs = (await get(client, "/api/v1/incidents", open="true"))["items"]
    inc = next(i for i in incs if i["host"] == "b-1")
    assert not inc["acknowledged"]
    assert inc["unacknowledged"] >= 1
    assert "gpu.xid" in {m["rule"] for m in inc["members"]}
    assert (await get(client, f"/api/v1/incidents/{inc['id']}"))["id"] == inc["id"]
    assert (await get(client, "/api/v1/incidents/nope", 404))["parameter"] == "incident"
    r = await client.post(f"/api/v1/incidents/{inc['id']}/ack", json={})
    assert r.status == 401
    r = await client.post("/api/v1/incidents/nope/ack", json={}, headers=AUTH)
    assert r.status == 404
    async with client.ws_connect("/api/v1/stream", params={"host": "b-1", "type": "incident"}) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        r = await client.post(f"/api/v1/incidents/{inc['id']}/ack", json={"comment": "on it"}, headers=AUTH)
        assert r.status == 200, await r.text()
        # the WebSocket carries the incident's change: the ack's update, or its opening sent
        # after the ack (the stream sends an item's state as it is when sent, so the ack's own
        # update can be folded into it); members joining later are not acknowledged
        # (docs/api.md), so updates of theirs may follow with "acknowledged": false
        while True:
            msg = await ws.receive_json(timeout=10)
            assert (msg["type"], msg["incident"]["id"]) == ("incident", inc["id"]), msg
            assert msg["change"] in ("opened", "updated"), msg
            if msg["incident"]["acknowledged"]:
                break
    view = await r.json()
    assert view["acknowledged"]
    assert view["ack"]["by"] == "token-0"
    assert all(m["acknowledged"] and m["ack_incident"] == inc["id"] for m in view["members"])
    alert = await get(client, f"/api/v1/alerts/{view['members'][0]['id']}")
    assert alert["ack"]["incident"] == inc["id"]  # the alert says it was acknowledged with the incident
    folded = (await get(client, "/api/v1/alerts", host="b-1", fold="true"))["items"]
    xid = next(a for a in folded if a["rule"] == "gpu.xid")
    assert xid["group"] == "b-1 GPU 2 gpu.xid"
    assert xid["folded"] == []  # nothing inhibited under it


async def test_silences_create_list_expire(client: Client) -> None:
    r = await client.post("/api/v1/silences", json={"matchers": ["host=b-0"], "duration": 60})
    assert r.status == 401
    r = await client.post("/api/v1/silences", json={"matchers": ["host=~("], "duration": 60}, headers=AUTH)
    assert r.status == 400
    assert (await r.json())["parameter"] == "matchers[0]"
    r = await client.post("/api/v1/silences", json={"matchers": ["host=b-0"]}, headers=AUTH)
    assert r.status == 400
    assert (await r.json())["parameter"] == "ends_at"
    r = await client.post(
        "/api/v1/silences", json={"matchers": ["host=b-0"], "duration": 60, "comment": "maint"}, headers=AUTH
    )
    assert r.status == 201, await r.text()
    sid = (await r.json())["id"]
    listed = await get(client, "/api/v1/silences", active="true")
    assert sid in [s["id"] for s in listed["items"]]
    assert (await client.delete(f"/api/v1/silences/{sid}")).status == 401
    assert (await client.delete(f"/api/v1/silences/{sid}", headers=AUTH)).status == 204
    assert (await client.delete(f"/api/v1/silences/{sid}", headers=AUTH)).status == 404
    listed = await get(client, "/api/v1/silences", active="true")
    assert sid not in [s["id"] for s in listed["items"]]


async def test_unknown_route_and_method_are_json_errors(client: Client) -> None:
    assert (await get(client, "/api/v1/nothing", 404))["error"] == "not_found"
    r = await client.put("/api/v1/alerts")
    assert r.status == 405
    assert (await r.json())["error"]


async def test_stream_delivers_filtered_live_events(service: CollectorService, client: Client) -> None:
    async with client.ws_connect("/api/v1/stream", params={"host": "b-1", "type": "alert"}) as ws:
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "hello"
        assert hello["filters"]["host"] == ["b-1"]
        await send(
            service.config.nats.servers[0],
            [
                event("b-0", 50, time.time(), provider="prov-b"),
                event("b-1", 50, time.time(), provider="prov-b"),
            ],
        )
        msg = await ws.receive_json(timeout=10)
        assert msg["type"] == "alert"
        assert msg["host"] == "b-1"
        assert msg["alert"]["labels"]["host"] == "b-1"
    r = await client.get("/api/v1/stream", params={"severity": "loud"})
    assert r.status == 400
    assert (await r.json())["parameter"] == "severity"


async def test_a_client_that_falls_behind_is_closed_with_1013(service: CollectorService) -> None:
    app = make_app(service.parts.api_deps)
    app[QUEUE] = 5
    async with TestClient(TestServer(app)) as c, c.ws_connect("/api/v1/stream") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        await until(lambda: service.alerting.broadcaster.subscribers >= 1)
        before = service.alerting.broadcaster.dropped_subscribers
        for i in range(50):  # faster than any client: the collector never waits
            service.alerting.broadcaster.publish({"type": "health", "host": f"x{i}", "severity": "warning"})
        assert service.alerting.broadcaster.dropped_subscribers == before + 1
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                break
        assert ws.close_code == 1013


async def test_the_incremental_rollup_matches_a_full_one(service: CollectorService) -> None:
    live = service.parts.live
    await live.refresh()
    full = rollup(service.alerting.health, service.alerting.health_engine.config.provider)
    assert live.current().providers == full.providers
    assert live.current().hosts == full.hosts
    assert live.names("prov-a") == HOSTS["prov-a"]


# a collector of their own beside the module's: its own database too (a second group writing
# into the module's database would take the buckets' fencing tokens from the module's collector)
def _config(tmp: Path, dsn: str, nats_url: str, listen: str) -> Any:
    (tmp / "c.toml").write_text(f'[collector]\nlisten = "{listen}"\ndurable = "srv{uuid.uuid4().hex[:8]}"\n')
    return load_collector_config(
        tmp / "c.toml", env={}, flags={"postgres.dsn": dsn, "nats.servers": [nats_url]}
    )


async def test_the_service_serves_the_api_on_its_listen_address(
    tmp_path: Path, pg_dsn: str, module_nats: NatsServer
) -> None:
    port = free_port()
    svc = CollectorService(_config(tmp_path, pg_dsn, module_nats.url, f"127.0.0.1:{port}"), api=True)
    api = svc.api
    assert api is not None
    await svc.startup()
    try:
        assert api.port == port
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{api.port}/healthz") as r,
        ):
            assert r.status == 200
    finally:
        await svc.shutdown()
    assert api.runner is None


async def test_a_busy_listen_port_is_a_clear_configuration_error(
    tmp_path: Path, pg_dsn: str, module_nats: NatsServer
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        svc = CollectorService(_config(tmp_path, pg_dsn, module_nats.url, f"127.0.0.1:{port}"), api=True)
        try:
            with pytest.raises(ConfigError) as e:
                await svc.startup()
            assert e.value.key == "collector.listen"
        finally:
            await svc.shutdown()
