"""The collector's HTTP API (aiohttp): REST under ``/api/v1``, the live stream, ``/metrics``,
``/healthz``/``/readyz`` and the dashboard page. See ``docs/api.md``.

:func:`make_app` builds the application around a :class:`collector.service.CollectorService`
(the in-memory state, the alerting, the PostgreSQL pool); :func:`install` adds start/stop hooks
that serve it on ``[collector] listen``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from collector.alerting import STATES
from collector.api import auth, reads, remediation, stream, views
from collector.api.errors import (
    MAX_TIME,
    ApiError,
    bad,
    body_str,
    body_time,
    json_body,
    json_errors,
    not_found,
    page,
    query_bool,
    query_float,
    query_int,
    query_str,
)
from collector.api.live import LIVE, LiveRollup, run_refresher
from collector.api.openapi import document
from collector.config import ApiToken
from collector.health.model import STATUSES
from collector.metrics import FleetCollector, Select, accepts_gzip, gzip_pieces, plain_pieces
from collector.store import queries
from shared.errors import ConfigError

if TYPE_CHECKING:
    from collector.service import CollectorService

log = logging.getLogger(__name__)
SERVICE: Final[web.AppKey[CollectorService]] = web.AppKey("service")
REGISTRY: Final = web.AppKey("registry", CollectorRegistry)
FLEET_COLLECTOR: Final[web.AppKey[FleetCollector | None]] = web.AppKey("fleet_collector")
READY: Final[web.AppKey[dict[str, Any]]] = web.AppKey("ready")
API_REGISTRY: Final = web.AppKey("api_registry", CollectorRegistry)
STATIC: Final = Path(__file__).parent / "static"
SEVERITIES: Final = ("critical", "warning", "info")
STALL_AFTER: Final = 60.0  # consumer stalled: messages pending and no batch committed for this long


def make_app(
    service: CollectorService,
    *,
    registry: CollectorRegistry | None = None,
    tokens: tuple[ApiToken, ...] | None = None,
) -> web.Application:
    """The application; ``registry`` receives the fleet metrics (a fresh one by default);
    ``tokens`` replace the configured ``[api]`` tokens."""
    app = web.Application(middlewares=[json_errors, auth.guard], client_max_size=1 << 20)
    app[SERVICE] = service
    fleet_collector = None
    if registry is None:
        registry = CollectorRegistry()  # collected at scrape time only
        fleet_collector = FleetCollector(service)
        registry.register(fleet_collector)
    app[REGISTRY] = registry
    app[FLEET_COLLECTOR] = fleet_collector
    app[auth.POLICY] = auth.Policy.of(
        service.config.api, service.config.api_tokens if tokens is None else tokens
    )
    app[READY] = {"batches": -1, "changed": time.monotonic()}
    app[LIVE] = LiveRollup.of(service)
    app[reads.READS] = reads.ReadPool(service)
    app[API_REGISTRY] = CollectorRegistry()
    app[API_REGISTRY].register(reads.ReadPoolCollector(app))
    app.cleanup_ctx.append(run_refresher)
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


def _svc(request: web.Request) -> CollectorService:
    return request.app[SERVICE]


def require_token(request: web.Request) -> str:
    """The caller's identity for the audit trail: the name of its write token (``token-N`` or
    the name given in ``[api] named_tokens``), never the token; ``anonymous`` only with
    ``[api] allow_anonymous_writes``. 401/403 otherwise (see :mod:`collector.api.auth`)."""
    return auth.identity(request)


# ------------------------------------------------------------------ health and metrics


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = _svc(request)
    checks: dict[str, dict[str, Any]] = {}
    nc = svc.nc
    checks["nats"] = {"ok": bool(nc is not None and nc.is_connected)}
    pg_ok, pg_err = False, None
    try:  # through the API's own pool: a probe never takes a connection from alerting
        async with asyncio.timeout(2.0):
            pool = await request.app[reads.READS].get()
            await pool.fetchval("SELECT 1")
        pg_ok = True
    except ApiError:
        pg_err = "not reachable"
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        pg_err = type(e).__name__  # the server's text stays in the log, not in a public reply
        log.warning("readiness: PostgreSQL check failed: %s", e)
    checks["postgres"] = {"ok": pg_ok, "error": pg_err}
    st = svc.ingest.stats
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
    own = svc.alerting.self_status.as_dict()
    d = svc.alerting.deliverer
    own["notify_backlog"] = d.backlog() if d else 0
    own["heartbeat"] = {"configured": svc.alerting.heartbeat.url is not None,
                        "sent": svc.alerting.heartbeat.sent, "failures": svc.alerting.heartbeat.failures,
                        "last_sent_at": svc.alerting.heartbeat.last_sent_at}  # fmt: skip
    return web.json_response(
        {"status": "ready" if ok else "not_ready", "checks": checks, "self": own}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.StreamResponse:
    fc = request.app[FLEET_COLLECTOR]
    if fc is None:
        body = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
        body += generate_latest(request.app[API_REGISTRY])  # the API's own figures (a few lines)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
    q = request.query
    shards = query_int(q, "shards", 1, 1, 4096) or 1
    shard = query_int(q, "shard", 0, 0, shards - 1) or 0
    sel = Select(query_str(q, "provider"), shard, shards)
    gzip = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    snap = fc.snapshot()  # the state is read here, on the event loop; rendered in a thread
    extra = generate_latest(request.app[API_REGISTRY]) if sel.with_collector else b""
    pieces = await asyncio.to_thread(fc.scrape, snap, sel, gzip, extra)
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
    svc = _svc(request)
    fleet = request.app[LIVE].current()
    items = [
        views.provider_view(n, fleet.providers.get(n), svc.state)
        for n in views.provider_names(fleet, svc.state)
    ]
    status = query_str(request.query, "status", STATUSES)
    if status is not None:
        items = [p for p in items if p["status"] == status]
    return web.json_response(page(request, items))


async def get_provider(request: web.Request) -> web.Response:
    svc = _svc(request)
    name = request.match_info["provider"]
    fleet = request.app[LIVE].current()
    if name not in fleet.providers and name not in svc.state.providers:
        raise not_found("provider", name)
    return web.json_response(views.provider_view(name, fleet.providers.get(name), svc.state))


async def list_hosts(request: web.Request) -> web.Response:
    svc = _svc(request)
    q = request.query
    provider = query_str(q, "provider")
    status = query_str(q, "status", STATUSES)
    live = request.app[LIVE]
    fleet = live.current()
    if provider is not None and provider not in fleet.providers and provider not in svc.state.providers:
        raise not_found("provider", provider)
    hosts, state = fleet.hosts, svc.state.hosts
    if state.keys() == hosts.keys():
        names = live.names(provider)  # the usual case: every host both reported and judged
    else:
        names = views.host_names(fleet, svc.state, provider)
    items = []
    for name in names:
        hh = hosts.get(name)
        if status is not None and (hh.status if hh is not None else "unknown") != status:
            continue
        items.append(views.host_summary(name, hh, state.get(name)))
    return web.json_response(page(request, items))


async def get_host(request: web.Request) -> web.Response:
    svc = _svc(request)
    name = request.match_info["host"]
    hh = svc.alerting.host_health(name)
    hs = svc.state.host(name)
    if hh is None and hs is None:
        raise not_found("host", name)
    engine_host = svc.alerting.health.hosts.get(name)
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
        result = await _svc(request).alerting.forget_host(name)
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
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
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
    svc = _svc(request)
    q = request.query
    state = query_str(q, "state", STATES)
    severity = query_str(q, "severity", SEVERITIES)
    try:
        alerts = svc.alerting.list_alerts(
            state=state, provider=query_str(q, "provider"), host=query_str(q, "host"), severity=severity
        )
    except ConfigError as e:
        raise bad(e.key, e.message) from None
    if query_bool(q, "fold"):  # one item per root: what it inhibits folded under it
        return web.json_response(page(request, svc.alerting.list_folded(alerts)))
    view = svc.alerting.alert_view
    return web.json_response(page(request, [view(a) for a in alerts]))


async def get_alert(request: web.Request) -> web.Response:
    svc = _svc(request)
    fp = request.match_info["id"]
    a = svc.alerting.get_alert(fp)
    if a is None:
        raise not_found("alert", fp)
    return web.json_response(svc.alerting.alert_view(a))


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
    svc = _svc(request)
    if svc.alerting.get_alert(fp) is None:
        raise not_found("alert", fp)
    try:
        view = await svc.alerting.ack(fp, by, until, comment)
    except KeyError:
        raise not_found("alert", fp) from None
    log.info("alert %s acknowledged by %s", fp, by)
    return web.json_response(view)


async def list_silences(request: web.Request) -> web.Response:
    items = _svc(request).alerting.list_silences()
    active = query_bool(request.query, "active")
    if active is not None:
        items = [s for s in items if bool(s.get("active")) == active]
    return web.json_response(page(request, items))


async def add_silence(request: web.Request) -> web.Response:
    who = require_token(request)
    svc = _svc(request)
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
        s = await svc.alerting.add_silence(list(matchers), starts, ends, author, comment)
    except ConfigError as e:
        raise bad(e.key, e.message) from None
    log.info("silence %s added by %s", s.get("id"), author)
    return web.json_response(s, status=201)


async def delete_silence(request: web.Request) -> web.Response:
    require_token(request)
    sid = request.match_info["id"]
    if not await _svc(request).alerting.expire_silence(sid):
        raise not_found("silence", sid)
    return web.Response(status=204)


async def get_incident(request: web.Request) -> web.Response:
    iid = request.match_info["id"]
    view = _svc(request).alerting.get_incident(iid)
    if view is None:
        raise not_found("incident", iid)
    return web.json_response(view)


async def ack_incident(request: web.Request) -> web.Response:
    iid, by, until, comment = await _ack_request(request)
    svc = _svc(request)
    try:
        view = await svc.alerting.ack_incident(iid, by, until, comment)
    except KeyError:
        raise not_found("open incident", iid) from None
    log.info("incident %s acknowledged by %s", iid, by)
    return web.json_response(view)


async def list_incidents(request: web.Request) -> web.Response:
    open_only = query_bool(request.query, "open")
    items = _svc(request).alerting.list_incidents(open_only=bool(open_only))
    if open_only is False:
        items = [i for i in items if not i["open"]]
    return web.json_response(page(request, items))


# ------------------------------------------------------------------ serving


class ApiServer:
    """Serves the API on ``[collector] listen`` while the service runs (its start/stop hooks).
    Port 0 picks a free port; :attr:`port` is the bound one once started."""

    def __init__(self, service: CollectorService) -> None:
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        service.startup_hooks.append(self.start)
        service.shutdown_hooks.insert(0, self.stop)

    async def start(self, svc: CollectorService) -> None:
        runner = web.AppRunner(make_app(svc), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        host, _, port = svc.config.collector.listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(
                "collector.listen", f"cannot listen on {svc.config.collector.listen}: {e}"
            ) from e
        self.runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        log.info("API and dashboard on port %d", self.port)
        policy = auth.Policy.of(svc.config.api, svc.config.api_tokens)
        if policy.allow_anonymous_writes:
            log.warning("API: anonymous writes are accepted ([api] allow_anonymous_writes = true)")
        elif not policy.writable:
            log.warning("API: writes are disabled until a token is configured ([api] tokens)")

    async def stop(self, svc: CollectorService) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()


def install(service: CollectorService) -> ApiServer:
    """Serve the API on ``[collector] listen`` while ``service`` runs."""
    return ApiServer(service)
