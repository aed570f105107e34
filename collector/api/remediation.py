"""Remediation routes (docs/api.md, "Remediation"): the actions and their audit trail,
approve/deny, the circuit breakers and their reset. Writes go through the API's auth
middleware (:mod:`collector.api.auth`): a write token, whose name is the audit's ``who``."""

from __future__ import annotations

import logging
from typing import Final

import asyncpg
from aiohttp import web

from collector.api import auth
from collector.api.deps import DEPS
from collector.api.errors import ApiError, bad, body_str, json_body, not_found, query_int, query_str
from collector.remediation import store
from collector.remediation.engine import AWAITING, FINAL, OPEN
from collector.remediation.service import Remediator

log = logging.getLogger(__name__)
ACTION_STATES: Final = tuple(sorted(FINAL | OPEN))


def _rem(request: web.Request) -> Remediator:
    return request.app[DEPS].remediation


def _pool(request: web.Request) -> asyncpg.Pool:
    pool = request.app[DEPS].pool()
    if pool is None:
        raise ApiError(503, "unavailable", "PostgreSQL is not connected")
    return pool


async def list_actions(request: web.Request) -> web.Response:
    q = request.query
    state = query_str(q, "state", ACTION_STATES)
    host = q.get("host") or None
    limit = query_int(q, "limit", 200, 1, 1000)
    assert limit is not None
    async with _pool(request).acquire() as conn:
        items = await store.list_actions(conn, state=state, host=host, limit=limit)
    return web.json_response({"items": items, "remediation": _rem(request).view()})


async def get_action(request: web.Request) -> web.Response:
    aid = request.match_info["id"]
    async with _pool(request).acquire() as conn:
        rec = await store.get_action(conn, aid)
        if rec is None:
            raise not_found("action", aid)
        rec["audit"] = await store.audit(conn, aid)
    return web.json_response(rec)


async def _decide(request: web.Request, approve: bool) -> web.Response:
    who = auth.identity(request)
    aid = request.match_info["id"]
    body = await json_body(request)
    comment = body_str(body, "comment", "", 2000)
    rem = _rem(request)
    if aid not in rem.state.actions:
        raise not_found("action", aid)
    if rem.state.actions[aid].state != AWAITING:
        raise ApiError(
            409, "conflict", f"action {aid} is {rem.state.actions[aid].state}, not awaiting approval"
        )
    view = await rem.decide(aid, approve, who, comment)
    log.info("remediation action %s %s by %s", aid, "approved" if approve else "denied", who)
    return web.json_response(view)


async def approve(request: web.Request) -> web.Response:
    return await _decide(request, True)


async def deny(request: web.Request) -> web.Response:
    return await _decide(request, False)


async def get_remediation(request: web.Request) -> web.Response:
    return web.json_response(_rem(request).view())


async def reset_breaker(request: web.Request) -> web.Response:
    who = auth.identity(request)
    provider = request.match_info["provider"]
    rem = _rem(request)
    if provider not in rem.state.breakers:
        raise not_found("breaker", provider)
    if len(provider) > 200:
        raise bad("provider", "too long")
    view = await rem.reset_breaker(provider, who)
    log.info("remediation circuit breaker of %s reset by %s", provider, who)
    return web.json_response(view)


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/v1/actions", list_actions)
    r.add_get("/api/v1/actions/{id}", get_action)
    r.add_post("/api/v1/actions/{id}/approve", approve)
    r.add_post("/api/v1/actions/{id}/deny", deny)
    r.add_get("/api/v1/remediation", get_remediation)
    r.add_post("/api/v1/remediation/breakers/{provider}/reset", reset_breaker)
