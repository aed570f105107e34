"""The collector's HTTP API (aiohttp): REST under ``/api/v1``, the live stream, ``/metrics``,
``/healthz``/``/readyz`` and the dashboard page. See ``docs/api.md``.

:func:`make_app` builds the application around :class:`collector.api.deps.ApiDeps` (the read
and command interfaces of the collector's parts); :class:`ApiServer` is the part that serves
it on ``[collector] listen`` while the collector runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from collector.alerts.model import ALERT_STATES, SEVERITIES
from collector.api import auth, reads, remediation, stream, views
from collector.api.deps import DEPS, ApiDeps
from collector.api.errors import (
    MAX_TIME,
    ApiError,
    bad,
    body_str,
    body_time,
    checked_params,
    json_body,
    json_errors,
    not_found,
    page,
    query_bool,
    query_float,
    query_int,
    query_str,
)
from collector.api.openapi import document
from collector.health.model import STATUSES
from collector.metrics import Select, accepts_gzip, gzip_pieces, plain_pieces
from collector.store import db, queries
from shared.errors import ConfigError

log = logging.getLogger(__name__)
READY: Final[web.AppKey[dict[str, Any]]] = web.AppKey("ready")
API_REGISTRY: Final = web.AppKey("api_registry", CollectorRegistry)
STATIC: Final = Path(__file__).parent / "static"
STALL_AFTER: Final = 60.0  # consumer stalled: messages pending and no batch committed for this long


def make_app(deps: ApiDeps) -> web.Application:
    """The application over ``deps``."""
    app = web.Application(middlewares=[json_errors, auth.guard, checked_params], client_max_size=1 << 20)
    app[DEPS] = deps
    app[auth.POLICY] = auth.Policy.of(deps.config.api, deps.config.api_tokens)
    app[READY] = {"batches": -1, "changed": time.monotonic()}
    app[reads.READS] = reads.ReadPool(deps.config)
    app[API_REGISTRY] = CollectorRegistry()
    app[API_REGISTRY].register(reads.ReadPoolCollector(app))
    for c in deps.collectors:
        app[API_REGISTRY].register(c)
    app.cleanup_ctx.append(run_refresher)
    app.cleanup_ctx.append(run_metrics_ahead)
    app.cleanup_ctx.append(reads.lifetime)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/api/v1/openapi.json", openapi)
    r.add_get("/api/v1/providers", list_providers)
    r.add_get("/api/v1/providers/{provider}", get_provider)
    r.add_get("/api/v1/hosts", list_hosts)
    r.add_get("/api/v1/hosts/{host}", get_host)
    r.add_delete("/api/v1/hosts/{host}", forget_host)
    r.add_get("/api/v1/hosts/{host}/history", history)
    r.add_get("/api/v1/alerts", list_alerts)
    r.add_get("/api/v1/alerts/{id}", get_alert)
    r.add_post("/api/v1/alerts/{id}/ack", ack_alert)
    r.add_get("/api/v1/silences", list_silences)
    r.add_post("/api/v1/silences", add_silence)
    r.add_delete("/api/v1/silences/{id}", delete_silence)
    r.add_get("/api/v1/incidents", list_incidents)
    r.add_get("/api/v1/incidents/{id}", get_incident)
    r.add_post("/api/v1/incidents/{id}/ack", ack_incident)
    remediation.add_routes(r)
    r.add_get("/api/v1/stream", stream.handler)
    r.add_get("/", index)
    r.add_static("/static/", STATIC, name="static")
    return app


def _deps(request: web.Request) -> ApiDeps:
    return request.app[DEPS]


async def run_refresher(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: refresh the live rollup every second while the application serves."""
    live = app[DEPS].live

    async def loop() -> None:
        while True:
            await live.refresh()
            await asyncio.sleep(1.0)

    task = asyncio.create_task(loop(), name="api-rollup")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_metrics_ahead(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: render each regularly scraped selection of ``/metrics`` shortly before its
    next scrape (``FleetCollector.due``), so the scrape renders only what changed since."""
    fc = app[DEPS].metrics

    async def loop() -> None:
        while True:
            await asyncio.sleep(0.25)
            for sel, gzip in fc.due(time.monotonic()):
                await asyncio.to_thread(fc.render_ahead, fc.snapshot(), sel, gzip)

    task = asyncio.create_task(loop(), name="api-metrics-ahead")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def require_token(request: web.Request) -> str:
    """The caller's identity for the audit trail: the name of its write token (``token-N`` or
    the name given in ``[api] named_tokens``), never the token; ``anonymous`` only with
    ``[api] allow_anonymous_writes``. 401/403 otherwise (see :mod:`collector.api.auth`)."""
    return auth.identity(request)


# ------------------------------------------------------------------ health and metrics


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = _deps(request)
    checks: dict[str, dict[str, Any]] = {}
    checks["nats"] = {"ok": deps.nats_connected()}
    pg_ok, pg_err = False, None
    try:  # through the API's own pool: a probe never takes a connection from alerting
        async with asyncio.timeout(2.0):
            pool = await request.app[reads.READS].get()
            await pool.fetchval("SELECT 1")
        pg_ok = True
    except ApiError:
        pg_err = "not reachable"
    except db.ERRORS + (TimeoutError,) as e:
        pg_err = type(e).__name__  # the server's text stays in the log, not in a public reply
        log.warning("readiness: PostgreSQL check failed: %s", e)
    checks["postgres"] = {"ok": pg_ok, "error": pg_err}
    st = deps.ingest_stats()
    mark = request.app[READY]
    now = time.monotonic()
    if st.batches != mark["batches"]:
        mark["batches"], mark["changed"] = st.batches, now
    stalled = st.consumer_pending > 0 and now - mark["changed"] > STALL_AFTER
    checks["consumer"] = {
        "ok": not stalled,
        "pending": st.consumer_pending,
        "batches": st.batches,
        "stream_lost": st.stream_lost,  # dropped by the stream (full or aged out) before we got them
    }
    ok = all(c["ok"] for c in checks.values())
    # the collector's own health (collector.selfcheck): reported; only the checks above decide readiness
    own = deps.alerts.self_report()
    return web.json_response(
        {"status": "ready" if ok else "not_ready", "checks": checks, "self": own}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.StreamResponse:
    fc = _deps(request).metrics
    q = request.query
    shards = query_int(q, "shards", 1, 1, 4096) or 1
    shard = query_int(q, "shard", 0, 0, shards - 1) or 0
    sel = Select(query_str(q, "provider"), shard, shards)
    gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    started = time.monotonic()
    snap = fc.snapshot()  # the state is read here, on the event loop; rendered in a thread
    extra = generate_latest(request.app[API_REGISTRY]) if sel.with_collector else b""
    pieces = await asyncio.to_thread(fc.scrape, snap, sel, gzip, extra)
    fc.scraped(sel, gzip, started, time.monotonic() - started)
    resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"})
    if gzip:
        resp.headers["Content-Encoding"] = "gzip"
    await resp.prepare(request)
    if request.method != "HEAD":  # written a chunk at a time: the body is never built whole
        for data in gzip_pieces(pieces) if gzip else plain_pieces(pieces):  # type: ignore[arg-type]
            await resp.write(data)
    await resp.write_eof()
    return resp


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


# ------------------------------------------------------------------ providers and hosts


async def list_providers(request: web.Request) -> web.Response:
    deps = _deps(request)
    fleet = deps.live.current()
    items = [
        views.provider_view(n, fleet.providers.get(n), deps.fleet)
        for n in views.provider_names(fleet, deps.fleet)
    ]
    status = query_str(request.query, "status", STATUSES)
    if status is not None:
        items = [p for p in items if p["status"] == status]
    return web.json_response(page(request, items))


async def get_provider(request: web.Request) -> web.Response:
    deps = _deps(request)
    name = request.match_info["provider"]
    fleet = deps.live.current()
    if name not in fleet.providers and name not in deps.fleet.providers:
        raise not_found("provider", name)
    return web.json_response(views.provider_view(name, fleet.providers.get(name), deps.fleet))


async def list_hosts(request: web.Request) -> web.Response:
    deps = _deps(request)
    q = request.query
    provider = query_str(q, "provider")
    status = query_str(q, "status", STATUSES)
    live = deps.live
    fleet = live.current()
    if provider is not None and provider not in fleet.providers and provider not in deps.fleet.providers:
        raise not_found("provider", provider)
    hosts, state = fleet.hosts, deps.fleet.hosts
    if state.keys() == hosts.keys():
        names = live.names(provider)  # the usual case: every host both reported and judged
    else:
        names = views.host_names(fleet, deps.fleet, provider)
    items = []
    for name in names:
        hh = hosts.get(name)
        if status is not None and (hh.status if hh is not None else "unknown") != status:
            continue
        items.append(views.host_summary(name, hh, state.get(name)))
    return web.json_response(page(request, items))


async def get_host(request: web.Request) -> web.Response:
    deps = _deps(request)
    name = request.match_info["host"]
    hh = deps.alerts.host_health(name)
    hs = deps.fleet.host(name)
    if hh is None and hs is None:
        raise not_found("host", name)
    engine_host = deps.alerts.health.hosts.get(name)
    xids: dict[int, dict[int, int]] = {}
    if engine_host is not None:
        xids = {i: {c: r.count for c, r in g.xids.items()} for i, g in engine_host.gpus.items()}
    return web.json_response(views.host_detail(name, hh, hs, xids))


async def forget_host(request: web.Request) -> web.Response:
    """Forget a decommissioned host: out of the fleet and the expected state, its alerts
    resolved (reason ``forgotten``), its history kept. It comes back as new if it reports."""
    who = require_token(request)
    name = request.match_info["host"]
    try:
        result = await _deps(request).alerts.forget_host(name)
    except KeyError:
        raise not_found("host", name) from None
    except ConfigError as e:
        raise ApiError(409, "conflict", e.message, e.key) from None
    log.info("host %r forgotten by %s", name, who)
    return web.json_response(result)


async def history(request: web.Request) -> web.Response:
    name = request.match_info["host"]
    q = request.query
    metric = query_str(q, "metric")
    if metric is None:
        raise bad("metric", "metric is required (e.g. temp_c, util_gpu_pct, power_w)")
    if metric not in queries.GPU_METRICS and metric not in queries.HOST_METRICS:
        raise bad("metric", f"unknown metric {metric!r}")
    gpu = query_int(q, "gpu", None, 0, 1023)
    now = time.time()
    until = query_float(q, "until", now)
    assert until is not None
    since = query_float(q, "since", until - 3600.0)
    assert since is not None
    if not until > since:
        raise bad("until", "until must be after since")
    step = query_float(q, "step", None, 1e-3, MAX_TIME)
    if step is not None and (until - since) / step > queries.MAX_POINTS:
        raise bad("step", f"step must be positive and give at most {queries.MAX_POINTS} points")
    limit = query_int(q, "limit", 1000, 1, queries.MAX_PAGE)
    cursor = query_str(q, "cursor")
    if cursor is not None and not queries.valid_cursor(cursor):
        raise bad("cursor", f"bad cursor {cursor[:50]!r}")
    if metric in queries.HOST_METRICS and gpu is not None:
        raise bad("gpu", f"{metric} is a host metric; do not give a GPU")
    read_pool = request.app[reads.READS]
    async with read_pool.heavy() as pool:  # the API's own pool, a bounded number at a time
        try:
            result = await queries.history(
                pool, name, metric, since, until, step=step, gpu=gpu, cursor=cursor, limit=limit or 1000
            )
        except queries.UnknownHostError:
            raise not_found("host", name) from None
        except queries.QueryError as e:
            raise bad("query", str(e)) from None
        except db.ERRORS as e:
            raise read_pool.query_error(e) from None
    return web.json_response(
        {
            "host": name,
            "metric": metric,
            "since": since,
            "until": until,
            "step": step,
            "source": result.source,
            "points": [
                {"ts": p.ts, "gpu": p.gpu, "value": p.value, "min": p.min, "max": p.max, "count": p.count}
                for p in result.points
            ],
            "next_cursor": result.next_cursor,
        }
    )


# ------------------------------------------------------------------ alerts, silences, incidents


async def list_alerts(request: web.Request) -> web.Response:
    al = _deps(request).alerts
    q = request.query
    state = query_str(q, "state", ALERT_STATES)
    severity = query_str(q, "severity", SEVERITIES)
    try:
        alerts = al.list_alerts(
            state=state, provider=query_str(q, "provider"), host=query_str(q, "host"), severity=severity
        )
    except ConfigError as e:
        raise bad(e.key, e.message) from None
    if query_bool(q, "fold"):  # one item per root: what it inhibits folded under it
        return web.json_response(page(request, views.folded_views(alerts, al.inhibited_by_root())))
    return web.json_response(page(request, [views.alert_view(a) for a in alerts]))


async def get_alert(request: web.Request) -> web.Response:
    fp = request.match_info["id"]
    a = _deps(request).alerts.get_alert(fp)
    if a is None:
        raise not_found("alert", fp)
    return web.json_response(views.alert_view(a))


async def _ack_request(request: web.Request) -> tuple[str, str, float | None, str]:
    """An acknowledgement's ``(id, by, until, comment)``; ``by`` is the token's name: a body's
    "by" is not trusted (docs/api.md)."""
    by = require_token(request)
    what = request.match_info["id"]
    body = await json_body(request)
    comment = body_str(body, "comment", "", 2000)
    return what, by, body_time(body, "until"), comment


async def ack_alert(request: web.Request) -> web.Response:
    fp, by, until, comment = await _ack_request(request)
    try:
        view = await _deps(request).alerts.ack(fp, by, until, comment)
    except KeyError:
        raise not_found("alert", fp) from None
    log.info("alert %s acknowledged by %s", fp, by)
    return web.json_response(view)


async def list_silences(request: web.Request) -> web.Response:
    items = views.silence_views(*_deps(request).alerts.silences(), time.time())
    active = query_bool(request.query, "active")
    if active is not None:
        items = [s for s in items if bool(s.get("active")) == active]
    return web.json_response(page(request, items))


async def add_silence(request: web.Request) -> web.Response:
    who = require_token(request)
    al = _deps(request).alerts
    body = await json_body(request)
    matchers = body.get("matchers")
    if not isinstance(matchers, list) or not all(isinstance(m, str) and len(m) < 500 for m in matchers):
        raise bad("matchers", "matchers must be a list of strings like 'host=gpu-0001' or 'host=~gpu-0[0-9]'")
    if not matchers or len(matchers) > 50:
        raise bad("matchers", "a silence needs 1 to 50 matchers")
    starts = body_time(body, "starts_at")
    ends = body_time(body, "ends_at")
    duration = body.get("duration")
    if ends is None:
        if (
            isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not 0 < duration <= 10 * 365 * 86400
        ):
            raise bad("ends_at", "give ends_at (Unix seconds) or duration (seconds, positive)")
        ends = (starts if starts is not None else time.time()) + float(duration)
    author = who  # the token's name: a body's "author" is not trusted (docs/api.md)
    comment = body_str(body, "comment", "", 2000)
    try:
        s = await al.add_silence(list(matchers), starts, ends, author, comment)
    except ConfigError as e:
        raise bad(e.key, e.message) from None
    log.info("silence %s added by %s", s.id, author)
    return web.json_response(views.silence_view(s, "api", time.time()), status=201)


async def delete_silence(request: web.Request) -> web.Response:
    require_token(request)
    sid = request.match_info["id"]
    if not await _deps(request).alerts.expire_silence(sid):
        raise not_found("silence", sid)
    return web.Response(status=204)


async def get_incident(request: web.Request) -> web.Response:
    iid = request.match_info["id"]
    view = _deps(request).alerts.get_incident(iid)
    if view is None:
        raise not_found("incident", iid)
    return web.json_response(view)


async def ack_incident(request: web.Request) -> web.Response:
    iid, by, until, comment = await _ack_request(request)
    try:
        view = await _deps(request).alerts.ack_incident(iid, by, until, comment)
    except KeyError:
        raise not_found("open incident", iid) from None
    log.info("incident %s acknowledged by %s", iid, by)
    return web.json_response(view)


async def list_incidents(request: web.Request) -> web.Response:
    open_only = query_bool(request.query, "open")
    items = _deps(request).alerts.list_incidents(open_only=bool(open_only))
    if open_only is False:
        items = [i for i in items if not i["open"]]
    return web.json_response(page(request, items))


# ------------------------------------------------------------------ serving


class ApiServer:
    """The part that serves the API on ``[collector] listen`` while the collector runs.
    Port 0 picks a free port; :attr:`port` is the bound one once started."""

    def __init__(self, deps: ApiDeps) -> None:
        self.deps = deps
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        listen = self.deps.config.collector.listen
        app = make_app(self.deps)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError("collector.listen", f"cannot listen on {listen}: {e}") from e
        self.runner = runner
        self.port = _bound_port(runner, int(port))
        log.info("API and dashboard on port %d", self.port)
        policy = auth.Policy.of(self.deps.config.api, self.deps.config.api_tokens)
        if policy.allow_anonymous_writes:
            log.warning("API: anonymous writes are accepted ([api] allow_anonymous_writes = true)")
        elif not policy.writable:
            log.warning("API: writes are disabled until a token is configured ([api] tokens)")

    async def stop(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    """The port the runner listens on (the one picked for port 0), from its public addresses."""
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return asked
