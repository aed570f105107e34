"""The OpenAPI document matches the implementation: every route is in it, every response of a
walk over the API validates against its schema, and schemathesis (property-based requests
generated from the document, against the real server on a free port) finds no 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, settings

from collector.api import make_app
from collector.api.openapi import document
from collector.service import CollectorService
from gpuwarden.servers import NatsServer
from tests.support.api import AUTH, XID_HOST, running

Client = TestClient[web.Request, web.Application]


@pytest.fixture(scope="module")
async def service(
    tmp_path_factory: pytest.TempPathFactory, module_dsn: str, module_nats: NatsServer
) -> AsyncIterator[CollectorService]:
    async with running(tmp_path_factory.mktemp("openapi"), module_dsn, module_nats.url) as svc:
        yield svc


@contextlib.asynccontextmanager
async def serving(svc: CollectorService) -> AsyncIterator[Client]:
    async with TestClient(TestServer(make_app(svc.parts.api_deps))) as c:
        yield c


async def test_every_route_is_documented_and_every_documented_path_is_routed(
    service: CollectorService,
) -> None:
    doc = document()
    routes: set[tuple[str, str]] = set()
    for r in make_app(service.parts.api_deps).router.routes():
        info = r.get_info()
        path = info.get("path") or info.get("formatter")
        if r.method in ("HEAD", "*") or path is None or "prefix" in info:
            continue
        routes.add((path, r.method.lower()))
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def response_schema(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    responses = doc["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, not documented"
    content = responses[str(status)].get("content", {})
    return content.get("application/json", {}).get("schema", {})


def template(doc: dict[str, Any], url_path: str) -> str:
    for p in doc["paths"]:
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", p), url_path):
            return p
    raise AssertionError(f"{url_path} matches no documented path")


async def test_responses_validate_against_the_document(service: CollectorService) -> None:
    doc = document()
    async with serving(service) as c:
        fp = service.alerting.list_alerts(host=XID_HOST)[0].fingerprint
        calls: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
            ("get", "/healthz", None, {}),
            ("get", "/readyz", None, {}),
            ("get", "/api/v1/openapi.json", None, {}),
            ("get", "/api/v1/providers", None, {}),
            ("get", "/api/v1/providers/prov-a", None, {}),
            ("get", "/api/v1/providers/nope", None, {}),
            ("get", "/api/v1/hosts?provider=prov-a", None, {}),
            ("get", "/api/v1/hosts?status=bad", None, {}),
            ("get", f"/api/v1/hosts/{XID_HOST}", None, {}),
            ("get", "/api/v1/hosts/nope", None, {}),
            ("get", f"/api/v1/hosts/{XID_HOST}/history?metric=temp_c&since=0", None, {}),
            ("get", f"/api/v1/hosts/{XID_HOST}/history?metric=temp_c&since=0&step=60", None, {}),
            ("get", f"/api/v1/hosts/{XID_HOST}/history?metric=nope", None, {}),
            ("get", "/api/v1/alerts", None, {}),
            ("get", f"/api/v1/alerts/{fp}", None, {}),
            ("get", "/api/v1/alerts/nope", None, {}),
            ("post", f"/api/v1/alerts/{fp}/ack", {"by": "bob"}, AUTH),
            ("post", f"/api/v1/alerts/{fp}/ack", {}, {}),
            ("post", "/api/v1/silences", {"matchers": ["host=a-2"], "duration": 30}, AUTH),
            ("post", "/api/v1/silences", {"matchers": []}, AUTH),
            ("get", "/api/v1/silences", None, {}),
            ("get", "/api/v1/incidents", None, {}),
            ("delete", "/api/v1/silences/nope", None, AUTH),
        ]
        seen: set[int] = set()
        for method, url, body, headers in calls:
            r = await c.request(method, url, json=body, headers=headers)
            path = template(doc, url.split("?")[0])
            schema = response_schema(doc, path, method, r.status)
            seen.add(r.status)
            if schema:
                data = await r.json()
                errors = list(validator(doc, schema).iter_errors(data))
                assert not errors, f"{method} {url}: {errors[0].message} at {list(errors[0].path)}"
        assert {200, 201, 400, 401, 404} <= seen
        metrics = await c.get("/metrics")
        assert metrics.status == 200
        assert metrics.headers["Content-Type"].startswith("text/plain")


async def test_every_parameter_with_a_nul_or_too_long_is_a_400_naming_it(service: CollectorService) -> None:
    from urllib.parse import quote

    from collector.api.errors import MAX_PARAM

    doc = document()
    tried: list[str] = []
    async with serving(service) as c:
        for path, ops in doc["paths"].items():
            for method, spec in ops.items():
                headers = AUTH if method in ("post", "delete") else {}
                params = spec.get("parameters", [])
                for p in params:
                    for bad_value in ("a\x00b", "h" * (MAX_PARAM + 1)):
                        url, query = path, {}
                        for other in params:  # the other path parameters: a plain value
                            if other["in"] == "path":
                                v = bad_value if other is p else "x"
                                url = url.replace("{" + other["name"] + "}", quote(v, safe=""))
                        if p["in"] == "query":
                            query[p["name"]] = bad_value
                        body_in = {} if method == "post" else None
                        r = await c.request(method, url, params=query, headers=headers, json=body_in)
                        body = await r.json()
                        assert r.status == 400, (method, path, p["name"], r.status, body)
                        assert body["error"] == "bad_request"
                        assert body["parameter"] == p["name"], body
                        assert "400" in spec["responses"], (method, path)
                        tried.append(f"{method} {path} {p['name']}")
    assert "get /api/v1/actions host" in tried
    assert "get /api/v1/hosts/{host} host" in tried
    assert len(tried) > 40


async def test_schemathesis_finds_no_server_error(service: CollectorService) -> None:
    doc = document()
    for path in ("/api/v1/stream", "/", "/metrics"):
        doc["paths"].pop(path)  # a WebSocket, the page, the text exposition: not JSON operations
    schema = schemathesis.openapi.from_dict(doc)
    async with serving(service) as c:
        base = str(c.make_url("")).rstrip("/")
        failures: list[str] = []

        def run_all() -> int:
            calls = 0
            for result in schema.get_all_operations():
                op = result.ok()

                @settings(
                    max_examples=25,
                    deadline=None,
                    database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=op.as_strategy())
                def check(case: Any) -> None:
                    nonlocal calls
                    calls += 1
                    headers = dict(case.headers or {})
                    if case.method.upper() in ("POST", "DELETE"):
                        headers.update(AUTH)
                    case.headers = headers
                    response = case.call(base_url=base, timeout=10)
                    if response.status_code >= 500:
                        failures.append(
                            f"{case.method} {case.formatted_path} {case.query} -> {response.status_code}"
                        )

                check()
            return calls

        calls = await asyncio.to_thread(run_all)
    assert calls > 100
    assert not failures, json.dumps(failures[:5])
