"""The API's access rules and its isolation from alerting, against a running collector (real
nats-server, real PostgreSQL): secure-by-default writes, JSON-only bodies, the Origin check on
writes and on the stream, read tokens, the audit identity from the token's name, parameters
that overflow, a /readyz that keeps PostgreSQL's text to itself, and a separate, bounded
pool for API reads that heavy /history requests cannot take from alert persistence."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from collector.api import auth, make_app, reads
from collector.config import ApiSection, ApiToken, load_collector_config
from collector.service import CollectorService
from gpuwarden.servers import NatsServer
from shared.config import Secret
from shared.errors import ConfigError
from tests.support.api import XID_HOST, running
from tests.support.wait import until

Client = TestClient[web.Request, web.Application]
ALICE = "alice-" + uuid.uuid4().hex
READER = "reader-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
async def service(
    tmp_path_factory: pytest.TempPathFactory, module_dsn: str, module_nats: NatsServer
) -> AsyncIterator[CollectorService]:
    async with running(tmp_path_factory.mktemp("security"), module_dsn, module_nats.url) as svc:
        yield svc


@contextlib.asynccontextmanager
async def serving(
    svc: CollectorService, api: ApiSection, tokens: tuple[ApiToken, ...] = (), **pool: Any
) -> AsyncIterator[Client]:
    """The API with the access policy of ``api`` and ``tokens`` (and a read pool per ``pool``)."""
    app = make_app(svc.parts.api_deps)
    app[auth.POLICY] = auth.Policy.of(api, tokens)
    if pool:
        app[reads.READS] = reads.ReadPool(svc.config, **pool)
    async with TestClient(TestServer(app)) as c:
        yield c


def named(name: str, secret: str, write: bool = True) -> ApiToken:
    return ApiToken(name, Secret(secret), write)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


SILENCE = {"matchers": ["host=nobody-here"], "duration": 60}


async def test_writes_are_refused_when_no_token_is_configured(service: CollectorService) -> None:
    async with serving(service, ApiSection()) as c:
        r = await c.post("/api/v1/silences", json=SILENCE)
        assert r.status == 403
        body = await r.json()
        assert body["error"] == "writes_disabled"
        assert "[api] tokens" in body["message"]
        assert "allow_anonymous_writes" in body["message"]
        assert (await c.delete("/api/v1/silences/x")).status == 403
        assert (await c.get("/api/v1/silences")).status == 200  # reads stay open
    async with serving(service, ApiSection(allow_anonymous_writes=True)) as c:
        r = await c.post("/api/v1/silences", json=SILENCE)
        assert r.status == 201, await r.text()
        assert (await r.json())["author"] == "anonymous"


def test_anonymous_writes_are_off_unless_configured(tmp_path: Any) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[api]\n")
    assert load_collector_config(path, env={}).api.allow_anonymous_writes is False
    path.write_text("[api]\nallow_anonymous_writes = true\nnamed_tokens = ['alice=env:A']\n")
    cfg = load_collector_config(path, env={"A": "s3cret-of-alice"})
    assert cfg.api.allow_anonymous_writes is True
    assert [(t.name, t.secret.reveal(), t.write) for t in cfg.api_tokens] == [
        ("alice", "s3cret-of-alice", True)
    ]
    for bad, key in (
        ("named_tokens = ['no-secret=']", "api.named_tokens"),
        ("named_tokens = ['a=x', 'a=y']", "api.named_tokens"),
        ("allowed_origins = ['evil.example']", "api.allowed_origins"),
        ("max_heavy_queries = 3\ndb_pool_max = 3", "api.max_heavy_queries"),
    ):
        path.write_text(f"[api]\n{bad}\n")
        with pytest.raises(ConfigError) as e:
            load_collector_config(path, env={})
        assert e.value.key == key


async def test_a_write_body_must_be_json_by_content_type(service: CollectorService) -> None:
    async with serving(service, ApiSection(), (named("alice", ALICE),)) as c:
        text = '{"matchers": ["host=nobody-here"], "duration": 60}'
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = await c.post("/api/v1/silences", data=text, headers={**bearer(ALICE), "Content-Type": ctype})
            assert r.status == 415, (ctype, await r.text())
            assert (await r.json())["parameter"] == "Content-Type"
        r = await c.post(
            "/api/v1/silences",
            data=text,
            headers={**bearer(ALICE), "Content-Type": "application/json; charset=utf-8"},
        )
        assert r.status == 201, await r.text()
        assert (
            await c.delete(f"/api/v1/silences/{(await r.json())['id']}", headers=bearer(ALICE))
        ).status == 204


async def test_writes_and_the_stream_refuse_other_origins(service: CollectorService) -> None:
    api = ApiSection(allowed_origins=("https://ops.example",))
    async with serving(service, api, (named("alice", ALICE),)) as c:
        own = f"http://{c.host}:{c.port}"
        for origin, expect in (
            ("http://evil.example", 403),
            ("null", 403),
            (f"http://{c.host}:{c.port + 1}", 403),
            (own, 201),
            ("https://ops.example", 201),
        ):
            r = await c.post("/api/v1/silences", json=SILENCE, headers={**bearer(ALICE), "Origin": origin})
            assert r.status == expect, (origin, await r.text())
            if expect == 403:
                assert (await r.json())["error"] == "forbidden_origin"
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await c.ws_connect("/api/v1/stream", origin="http://evil.example")
        assert e.value.status == 403
        async with c.ws_connect("/api/v1/stream", origin=own) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "hello"


async def test_read_tokens_guard_the_api_and_the_stream(service: CollectorService) -> None:
    tokens = (named("alice", ALICE), named("read-token-0", READER, write=False))
    async with serving(service, ApiSection(), tokens) as c:
        assert (await c.get("/api/v1/hosts")).status == 401
        assert (await c.get("/api/v1/hosts", headers=bearer("wrong-" + READER))).status == 403
        assert (await c.get("/api/v1/hosts", headers=bearer(READER))).status == 200
        assert (await c.get("/api/v1/hosts", headers=bearer(ALICE))).status == 200  # a writer reads
        for open_path in ("/healthz", "/metrics", "/api/v1/openapi.json", "/"):
            assert (await c.get(open_path)).status == 200, open_path
        r = await c.post("/api/v1/silences", json=SILENCE, headers=bearer(READER))
        assert r.status == 403  # a read token does not write
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await c.ws_connect("/api/v1/stream")
        assert e.value.status == 401
        async with c.ws_connect("/api/v1/stream", params={"access_token": READER}) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "hello"
        async with c.ws_connect("/api/v1/stream", headers=bearer(READER)) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "hello"
        assert (await c.get("/api/v1/hosts", params={"access_token": READER})).status == 401  # stream only


async def test_the_audit_identity_is_the_tokens_name_not_the_body(service: CollectorService) -> None:
    async with serving(service, ApiSection(), (named("token-0", "t-" + READER), named("alice", ALICE))) as c:
        fp = next(a.fingerprint for a in service.alerting.list_alerts(host=XID_HOST))
        r = await c.post(
            f"/api/v1/alerts/{fp}/ack", json={"by": "mallory", "comment": "c"}, headers=bearer(ALICE)
        )
        assert r.status == 200, await r.text()
        assert (await r.json())["ack"]["by"] == "alice"
        r = await c.post("/api/v1/silences", json={**SILENCE, "author": "mallory"}, headers=bearer(ALICE))
        assert r.status == 201, await r.text()
        assert (await r.json())["author"] == "alice"


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("until", "1e12"),
        ("until", "1e300"),
        ("until", "inf"),
        ("since", "-1e12"),
        ("since", "1e12"),
        ("step", "1e-300"),
        ("step", "1e300"),
        ("gpu", "9" * 30),
        ("limit", "9" * 5000),
        ("cursor", "9" * 38 + ":0"),
        ("cursor", "1700000000000000:" + "9" * 30),
        ("cursor", "١٢:0"),
    ],
)
async def test_history_parameters_that_overflow_are_400(
    service: CollectorService, param: str, value: str
) -> None:
    params = {"metric": "temp_c", param: value}
    if param in ("since", "step"):
        params.setdefault("until", str(time.time()))
    if param == "since" and value == "1e12":
        params["until"] = "2e12"
    async with serving(service, ApiSection()) as c:
        r = await c.get(f"/api/v1/hosts/{XID_HOST}/history", params=params)
        assert r.status == 400, await r.text()


async def test_readyz_keeps_postgres_error_text_to_itself(service: CollectorService, module_dsn: str) -> None:
    secret_db = "gw_no_such_db_" + uuid.uuid4().hex[:8]
    pg = dataclasses.replace(
        service.config.postgres, dsn=Secret(module_dsn.rsplit("/", 1)[0] + "/" + secret_db)
    )
    async with serving(service, ApiSection(), postgres=pg) as c:
        r = await c.get("/readyz")
        assert r.status == 503
        text = await r.text()
        assert secret_db not in text
        assert "does not exist" not in text
        assert (await r.json())["checks"]["postgres"]["ok"] is False


# ------------------------------------------------------------------ API reads vs alerting


@contextlib.asynccontextmanager
async def samples_locked(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold an exclusive lock on gpu_samples: every GPU history query blocks until released."""
    conn = await asyncpg.connect(dsn)
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("LOCK TABLE gpu_samples IN ACCESS EXCLUSIVE MODE")
        yield conn
    finally:
        await tx.rollback()
        await conn.close()


async def api_sessions_waiting(conn: asyncpg.Connection, n: int = 2) -> bool:
    """At least ``n`` of the API's sessions wait on a lock (another API read of gpu_samples may
    wait beside the admitted history queries: it failed once in a full run waiting for exactly 2).

    ``conn`` holds the lock inside a transaction, where PostgreSQL reads pg_stat_activity once
    and keeps that snapshot to the transaction's end: cleared first, or a first look taken
    before the API's sessions reached the lock (slow to connect on a busy machine) is all
    every later look sees."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    waiting: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gpuwarden-api'"
        " AND wait_event_type = 'Lock' AND datname = current_database()"
    )
    return waiting >= n


async def test_heavy_history_requests_never_delay_alert_persistence(
    service: CollectorService, module_dsn: str
) -> None:
    assert service.pool is not None
    path = f"/api/v1/hosts/{XID_HOST}/history"
    params = {"metric": "temp_c", "since": "0"}
    async with serving(
        service, ApiSection(), (named("alice", ALICE),), max_size=3, max_heavy=2, statement_timeout=600.0
    ) as c:
        read_pool = c.app[reads.READS]
        async with samples_locked(module_dsn) as locker:
            n = service.config.postgres.pool_max + 2  # more than the alerting pool has connections
            tasks = [asyncio.create_task(c.get(path, params=params)) for _ in range(n)]
            await until(lambda: sum(t.done() for t in tasks) == n - 2, 60)
            refused = [t.result() for t in tasks if t.done()]
            assert all(r.status == 503 and r.headers["Retry-After"] for r in refused)
            assert [(await r.json())["error"] for r in refused] == ["busy"] * (n - 2)
            # the admitted two are blocked inside PostgreSQL, on the lock
            await until(lambda: api_sessions_waiting(locker), 60)
            assert read_pool.pool is not None
            assert read_pool.pool is not service.pool
            # alerting persists while every admitted API read is stuck: a silence is committed
            s = await asyncio.wait_for(
                service.alerting.add_silence(["host=nobody-here"], None, time.time() + 60, "test", ""), 60
            )
            assert await locker.fetchval("SELECT count(*) FROM silences WHERE id = $1", s.id) == 1
            r = await c.get("/readyz")  # a light read still finds a connection
            assert (await r.json())["checks"]["postgres"]["ok"], await r.text()
            assert sum(t.done() for t in tasks) == n - 2  # the two are still waiting
        assert sorted(r.status for r in await asyncio.gather(*tasks)) == [200, 200] + [503] * (n - 2)
        metrics = await (await c.get("/metrics")).text()
        assert f"gpuwarden_api_history_refused_total {float(n - 2)}" in metrics
        assert "gpuwarden_api_history_running 0.0" in metrics


async def test_the_statement_timeout_cancels_a_stuck_history_query(
    service: CollectorService, module_dsn: str
) -> None:
    async with serving(service, ApiSection(), statement_timeout=0.2) as c:
        async with samples_locked(module_dsn):
            r = await c.get(f"/api/v1/hosts/{XID_HOST}/history", params={"metric": "temp_c", "since": "0"})
            assert r.status == 503, await r.text()
            body = await r.json()
            assert "statement_timeout" in body["message"]
            assert r.headers["Retry-After"]
        assert c.app[reads.READS].timeouts == 1
        assert "gpuwarden_api_statement_timeouts_total 1.0" in await (await c.get("/metrics")).text()
        r = await c.get(f"/api/v1/hosts/{XID_HOST}/history", params={"metric": "temp_c", "since": "0"})
        assert r.status == 200
