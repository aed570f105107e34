"""JSON errors and request parameter parsing for the HTTP API.

Every error body is ``{"error": <short code>, "message": <text>, "parameter": <name or null>}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from aiohttp import web

from shared.config import parse_bool
from shared.errors import ConfigError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT: Final = 10_000
DEFAULT_LIMIT: Final = 1000
MAX_TIME: Final = 1e11  # Unix seconds (year 5138): every time a request gives is below this


class ApiError(web.HTTPException):
    """An HTTP error with a JSON body naming what was wrong."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        parameter: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_code = status
        super().__init__(
            headers=headers,
            text=json.dumps({"error": error, "message": message, "parameter": parameter}),
            content_type="application/json",
        )


def bad(parameter: str, message: str) -> ApiError:
    return ApiError(400, "bad_request", message, parameter)


def not_found(what: str, name: str) -> ApiError:
    return ApiError(404, "not_found", f"unknown {what} {name!r}", what)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's own HTTP errors (404 route, 405 method, ...) into the JSON error body."""
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPException as e:
        if e.status_code < 400:
            raise
        reason = e.reason or "error"
        raise ApiError(e.status_code, reason.lower().replace(" ", "_"), reason) from e


MAX_PARAM: Final = 1000  # characters in a query or path parameter (host names are at most 253)


@web.middleware
async def checked_params(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every query and path parameter of every route, before its handler: a NUL character
    (PostgreSQL's text cannot hold one) or more than ``MAX_PARAM`` characters is a 400 naming
    the parameter, so no handler hands such a string to SQL."""
    for where, params in (("query", request.query), ("path", request.match_info)):
        for name, v in params.items():
            if "\x00" in v:
                raise bad(name, f"{where} parameter {name} must not contain a NUL character")
            if len(v) > MAX_PARAM:
                raise bad(name, f"{where} parameter {name} must be at most {MAX_PARAM} characters")
    return await handler(request)


def query_str(q: Mapping[str, str], name: str, choices: tuple[str, ...] | None = None) -> str | None:
    v = q.get(name)
    if v is None or v == "":
        return None
    if choices is not None and v not in choices:
        raise bad(name, f"{name} must be one of {', '.join(choices)}, got {v!r}")
    return v


def query_float(
    q: Mapping[str, str], name: str, default: float | None = None, lo: float = 0.0, hi: float = MAX_TIME
) -> float | None:
    """A number of seconds (a Unix time by default: ``0 <= v < MAX_TIME``), 400 outside."""
    v = q.get(name)
    if v is None or v == "":
        return default
    try:
        f = float(v)
    except ValueError:
        raise bad(name, f"{name} must be a number, got {v[:50]!r}") from None
    if not math.isfinite(f) or not lo <= f < hi:
        raise bad(name, f"{name} must be a number of seconds from {lo:g} to below {hi:g}, got {v[:50]!r}")
    return f


def query_int(q: Mapping[str, str], name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = q.get(name)
    if v is None or v == "":
        return default
    if len(v) > 20:
        raise bad(name, f"{name} must be between {lo} and {hi}")
    try:
        i = int(v)
    except ValueError:
        raise bad(name, f"{name} must be an integer, got {v!r}") from None
    if not lo <= i <= hi:
        raise bad(name, f"{name} must be between {lo} and {hi}, got {i}")
    return i


def query_bool(q: Mapping[str, str], name: str) -> bool | None:
    v = q.get(name)
    if v is None or v == "":
        return None
    try:
        return parse_bool(v, name)
    except ConfigError:
        raise bad(name, f"{name} must be true or false, got {v!r}") from None


def page(request: web.Request, items: list[Any]) -> dict[str, Any]:
    """``limit``/``cursor`` pagination over an ordered list: the cursor is an opaque offset."""
    q = request.query
    limit = query_int(q, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    assert limit is not None
    raw = q.get("cursor")
    start = 0
    if raw:
        if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
            raise bad("cursor", f"bad cursor {raw!r}")
        start = int(raw)
    chunk = items[start : start + limit]
    nxt = str(start + limit) if start + limit < len(items) else None
    return {"items": chunk, "total": len(items), "next_cursor": nxt}


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise bad("body", "the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    return body


def body_str(body: Mapping[str, Any], name: str, default: str | None = None, max_len: int = 1000) -> str:
    v = body.get(name, default)
    if v is None and default is not None:
        v = default
    if not isinstance(v, str):
        raise bad(name, f"{name} must be a string")
    if len(v) > max_len:
        raise bad(name, f"{name} must be at most {max_len} characters")
    if "\x00" in v:
        raise bad(name, f"{name} must not contain a NUL character")
    return v


def body_time(body: Mapping[str, Any], name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0 <= v < MAX_TIME:
        raise bad(name, f"{name} must be a Unix time in seconds")
    return float(v)
