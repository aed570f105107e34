"""Who may write and read through the HTTP API, and from which web origins (docs/api.md).

:func:`guard` is a middleware in front of every route, so a route added later is covered
without doing anything:

- **Writes** (any method but ``GET``/``HEAD``/``OPTIONS``): a browser's ``Origin`` must be the
  page's own (its ``host[:port]`` equals the request's ``Host``) or one of ``[api]
  allowed_origins``; then a write token (``Authorization: Bearer``); then a body, if any, must
  be ``Content-Type: application/json`` (415 otherwise: a cross-site HTML form or a "simple"
  ``fetch`` cannot send that type without a CORS preflight, which this server never grants).
  With no write token configured, writes are refused (403 naming ``[api] tokens``) unless
  ``[api] allow_anonymous_writes = true``.
- **The stream** (``GET /api/v1/stream``, a WebSocket, which browsers open cross-site without
  CORS): the same ``Origin`` check.
- **Reads** under ``/api/v1`` (but the OpenAPI document): open, unless ``[api] read_tokens``
  is set; then they need a read or a write token. A browser cannot set a header on a
  WebSocket, so the stream also takes the token as ``?access_token=`` (RFC 6750).

The caller's identity for the audit trail (``by`` of an acknowledgement, ``author`` of a
silence) is the name of the token it presented (``[api] named_tokens``, else ``token-N``),
never something the request body says.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from collector.api.errors import ApiError, Handler
from collector.config import ApiSection, ApiToken

log = logging.getLogger(__name__)
SAFE: Final = frozenset({"GET", "HEAD", "OPTIONS"})
STREAM: Final = "/api/v1/stream"
OPEN_READS: Final = frozenset({"/api/v1/openapi.json"})
IDENTITY: Final = web.RequestKey("identity", str)  # the authenticated caller's name
ANONYMOUS: Final = "anonymous"


@dataclass(frozen=True, slots=True)
class Policy:
    """The API's access policy, built from ``[api]`` and its resolved tokens."""

    tokens: tuple[tuple[str, bytes, bool], ...] = ()  # name, secret, may write
    allow_anonymous_writes: bool = False
    allowed_origins: frozenset[str] = frozenset()

    @classmethod
    def of(cls, api: ApiSection, tokens: Iterable[ApiToken]) -> Policy:
        return cls(
            tuple((t.name, t.secret.reveal().encode(), t.write) for t in tokens),
            api.allow_anonymous_writes,
            frozenset(o.rstrip("/").lower() for o in api.allowed_origins),
        )

    @property
    def writable(self) -> bool:
        return any(w for _, _, w in self.tokens)

    @property
    def reads_need_token(self) -> bool:
        return any(not w for _, _, w in self.tokens)

    def find(self, given: str) -> tuple[str, bool] | None:
        """The (name, may write) of the token ``given``: every configured token is compared,
        each in constant time, whichever matches."""
        got = given.encode()
        found = None
        for name, secret, write in self.tokens:
            if hmac.compare_digest(got, secret) and found is None:
                found = (name, write)
        return found


POLICY: Final = web.AppKey("access_policy", Policy)


def origin_allowed(request: web.Request, policy: Policy) -> bool:
    """No ``Origin`` (not a browser: curl, scripts, Prometheus), the request's own origin
    (``Origin``'s host[:port] is the ``Host`` header), or one of ``[api] allowed_origins``."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in policy.allowed_origins:
        return True
    scheme, sep, netloc = origin.partition("://")
    host = request.headers.get("Host", "").strip().lower()
    return bool(sep) and scheme in ("http", "https") and bool(host) and netloc == host


def _bearer(request: web.Request, query_ok: bool) -> str | None:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "unauthorized", "expected Authorization: Bearer <token>", None, CHALLENGE)
        return given.strip()
    if query_ok:
        return request.query.get("access_token") or None
    return None


CHALLENGE: Final = {"WWW-Authenticate": "Bearer"}


def authenticate(request: web.Request, *, write: bool) -> str:
    """The caller's name (the token's), or an :class:`ApiError`: 403 when writes are off (no
    token configured), 401 without a token, 403 with an unknown token or a read token for a
    write. Remembered on the request."""
    known = request.get(IDENTITY)
    if isinstance(known, str):
        return known
    policy = request.app[POLICY]
    given = _bearer(request, query_ok=request.path == STREAM)
    if given is None:
        if write and policy.allow_anonymous_writes:
            name = ANONYMOUS
        elif write and not policy.writable:
            raise ApiError(
                403,
                "writes_disabled",
                "writes are disabled: no API token is configured; set [api] tokens (or"
                " named_tokens), or [api] allow_anonymous_writes = true to accept anonymous writes",
            )
        else:
            raise ApiError(401, "unauthorized", "a bearer token is required", None, CHALLENGE)
    else:
        found = policy.find(given)
        if found is None:
            raise ApiError(403, "forbidden", "the bearer token is not valid")
        name, may_write = found
        if write and not may_write:
            raise ApiError(403, "forbidden", f"token {name!r} is a read token; writes need a write token")
    request[IDENTITY] = name
    return name


def _json_type(request: web.Request) -> None:
    ctype = request.headers.get("Content-Type")
    if ctype is None and not request.body_exists:
        return  # a write without a body (DELETE, or an ack with no fields)
    media = (ctype or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"a request body must be Content-Type: application/json, got {ctype or 'none'!r}",
            "Content-Type",
        )


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Origin, token and Content-Type checks in front of every matched route (see the module)."""
    if request.match_info.http_exception is not None:
        return await handler(request)  # no such route or method: the 404/405 comes from there
    policy = request.app[POLICY]
    path = request.path
    if request.method not in SAFE:
        if not origin_allowed(request, policy):
            raise ApiError(403, "forbidden_origin", _origin_message(request), "Origin")
        authenticate(request, write=True)
        _json_type(request)
    elif path.startswith("/api/v1/") and path not in OPEN_READS:
        if path == STREAM and not origin_allowed(request, policy):
            raise ApiError(403, "forbidden_origin", _origin_message(request), "Origin")
        if policy.reads_need_token:
            authenticate(request, write=False)
    return await handler(request)


def _origin_message(request: web.Request) -> str:
    origin = request.headers.get("Origin", "")[:200]
    return f"requests from origin {origin!r} are not accepted here; add it to [api] allowed_origins"


def identity(request: web.Request) -> str:
    """The authenticated caller of a write (the guard has run); ``anonymous`` if allowed."""
    return authenticate(request, write=True)
