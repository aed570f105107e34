"""The OpenAPI 3 document of the HTTP API (served at ``/api/v1/openapi.json``).

Written by hand next to the routes; ``tests/test_api_openapi.py`` checks that every route
is in it and that real responses validate against its schemas, and runs schemathesis on it.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from collector.alerts.model import ALERT_STATES, SEVERITIES
from collector.health.actions import ACTIONS
from collector.health.model import STATUSES
from collector.remediation.engine import FINAL, OPEN

Schema = dict[str, Any]
NUM: Final[Schema] = {"type": "number"}
NNUM: Final[Schema] = {"type": ["number", "null"]}
INT: Final[Schema] = {"type": "integer"}
STR: Final[Schema] = {"type": "string"}
NSTR: Final[Schema] = {"type": ["string", "null"]}
BOOL: Final[Schema] = {"type": "boolean"}
STATUS: Final[Schema] = {"type": "string", "enum": list(STATUSES)}
COUNTS: Final[Schema] = {"type": "object", "additionalProperties": {"type": "integer"}}


def obj(props: dict[str, Schema], required: list[str] | None = None, extra: bool = True) -> Schema:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": extra,
    }


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def paged(item: str) -> Schema:
    return obj({"items": {"type": "array", "items": ref(item)}, "total": INT, "next_cursor": NSTR})


PROBLEM = obj(
    {
        "check": STR,
        "status": STATUS,
        "summary": STR,
        "advice": STR,
        "labels": {"type": "object"},
        "since": NUM,
    }
)
SCHEMAS: Final[dict[str, Schema]] = {
    "Error": obj({"error": STR, "message": STR, "parameter": NSTR}),
    "Provider": obj(
        {
            "name": STR,
            "status": STATUS,
            "hosts": INT,
            "hosts_by_status": COUNTS,
            "gpus": INT,
            "gpus_by_status": COUNTS,
            "gpus_usable": INT,
            "usable_pct": NUM,
            "critical_pct": NUM,
            "driver_versions": COUNTS,
            "driver_majority": NSTR,
            "driver_drift": {"type": "array", "items": obj({"host": STR, "driver_version": STR})},
        }
    ),
    "HostSummary": obj(
        {
            "name": STR,
            "provider": STR,
            "status": STATUS,
            "stale": BOOL,
            "last_seen": NNUM,
            "gpus": INT,
            "gpus_by_status": COUNTS,
            "gpus_usable": INT,
        }
    ),
    "Problem": PROBLEM,
    "Action": obj(
        {
            "id": STR,
            "rule": STR,
            "fingerprint": STR,
            "episode": INT,
            "alert_rule": STR,
            "action": STR,
            "severity": STR,
            "provider": STR,
            "host": STR,
            "node": STR,
            "mode": {"type": "string", "enum": ["dry_run", "approve", "auto"]},
            "state": {"type": "string", "enum": sorted(FINAL | OPEN)},
            "created_at": NUM,
            "updated_at": NUM,
            "phase": STR,
            "step": INT,
            "started_at": NNUM,
            "drained": BOOL,
            "reason": STR,
            "by": STR,
            "labels": {"type": "object", "additionalProperties": STR},
        }
    ),
    "AuditEvent": obj(
        {
            "action_id": NSTR,
            "at": NUM,
            "event": STR,
            "who": STR,
            "why": STR,
            "step": STR,
            "exit_code": {"type": ["integer", "null"]},
            "output": STR,
            "provider": STR,
        }
    ),
    "Remediation": obj(
        {
            "enabled": BOOL,
            "rules": {"type": "array", "items": obj({"name": STR, "mode": STR, "steps": {"type": "array"}})},
            "breakers": {
                "type": "array",
                "items": obj(
                    {
                        "provider": STR,
                        "open": BOOL,
                        "tripped_at": NNUM,
                        "reason": STR,
                        "hosts": {"type": "object"},
                    },
                    required=["provider", "open", "reason"],
                ),
            },
            "running": INT,
            "max_running": INT,
        }
    ),
    "Gpu": obj(
        {
            "index": INT,
            "uuid": STR,
            "name": NSTR,
            "status": STATUS,
            "usable": BOOL,
            "lost": BOOL,
            "stale": BOOL,
            "readings": {"type": "object"},
            "xids": COUNTS,
            "processes": {
                "type": "array",
                "items": obj(
                    {
                        "pid": INT,
                        "name": NSTR,
                        "used_mem_bytes": {"type": ["integer", "null"]},
                        "container": NSTR,
                    }
                ),
            },
            "problems": {"type": "array", "items": ref("Problem")},
            "mig": {
                "type": "array",
                "items": obj(
                    {
                        "gpu_instance_id": INT,
                        "compute_instance_id": INT,
                        "profile": NSTR,
                        "uuid": NSTR,
                        "mem_total_bytes": {"type": ["integer", "null"]},
                        "mem_used_bytes": {"type": ["integer", "null"]},
                        "util_gpu_pct": NNUM,
                        "pids": {"type": "array", "items": INT},
                    }
                ),
            },
        }
    ),
    "Alert": obj(
        {
            "id": STR,
            "rule": STR,
            "labels": {"type": "object", "additionalProperties": STR},
            "severity": STR,
            "state": STR,
            "flags": obj({"acknowledged": BOOL, "silenced": BOOL, "inhibited": BOOL, "flapping": BOOL}),
            "summary": STR,
            "advice": STR,
            "value": NNUM,
            "action": {"type": "string", "enum": list(ACTIONS)},
            "started_at": NUM,
            "fired_at": NNUM,
            "resolved_at": NNUM,
            "escalation": obj({"policy": NSTR, "level": INT, "channels": {"type": "array"}}),
            "incident": NSTR,
            "reason": {
                "type": ["string", "null"],
                "enum": ["replaced", "moved", "forgotten", "evicted", None],
            },
            "ack": {"type": ["object", "null"]},
        },
        required=[
            "id",
            "rule",
            "labels",
            "severity",
            "state",
            "flags",
            "summary",
            "advice",
            "started_at",
            "escalation",
            "ack",
        ],
    ),
    "Silence": obj(
        {
            "id": STR,
            "matchers": {"type": "array"},
            "starts_at": NUM,
            "ends_at": NNUM,
            "active": BOOL,
            "source": STR,
        },
        required=["id", "matchers", "active", "source"],
    ),
    "Incident": obj(
        {
            "id": STR,
            "open": BOOL,
            "provider": STR,
            "host": NSTR,
            "hosts": {"type": "array", "items": STR},
            "alerts": {"type": "array", "items": STR},
            "members": {"type": "array", "items": {"type": "object"}},
            "acknowledged": BOOL,
            "unacknowledged": INT,
            "ack": {"type": ["object", "null"]},
            "updates": INT,
            "pending": {"type": "array", "items": STR},
        },
        required=["id", "open", "members", "acknowledged", "ack"],
    ),
}
SCHEMAS["Host"] = {
    "allOf": [
        ref("HostSummary"),
        obj(
            {
                "sample_ts": NNUM,
                "gpu_list": {"type": "array", "items": ref("Gpu")},
                "system": {"type": ["object", "null"]},
                "checks": {"type": "array"},
                "problems": {"type": "array", "items": ref("Problem")},
                "events": {"type": "array"},
                "driver_version": NSTR,
                "publish_outage": {
                    "type": ["object", "null"],
                    "properties": {
                        "since": NUM,
                        "until": NUM,
                        "seconds": NUM,
                        "buffered_frames": INT,
                        "dropped_frames": INT,
                    },
                },
            }
        ),
    ]
}
SCHEMAS["History"] = obj(
    {
        "host": STR,
        "metric": STR,
        "since": NUM,
        "until": NUM,
        "step": NNUM,
        "source": STR,
        "points": {
            "type": "array",
            "items": obj(
                {
                    "ts": NUM,
                    "gpu": {"type": ["integer", "null"]},
                    "value": NNUM,
                    "min": NNUM,
                    "max": NNUM,
                    "count": INT,
                }
            ),
        },
        "next_cursor": NSTR,
    }
)


def param(name: str, where: str = "query", schema: Schema | None = None, required: bool = False) -> Schema:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema or STR}


def reply(schema: Schema | None, description: str = "OK") -> Schema:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERR = reply(ref("Error"), "error")
PAGE = [param("limit", schema={"type": "integer", "minimum": 1, "maximum": 10000}), param("cursor")]
SECURITY: Final[list[dict[str, list[str]]]] = [{"bearer": []}]
READ_SECURITY: Final[list[dict[str, list[str]]]] = [{}, {"bearer": []}]  # a token when read_tokens is set
TIME: Final[Schema] = {"type": "number", "minimum": 0, "exclusiveMaximum": 1e11}


def op(
    summary: str,
    ok: Schema,
    params: list[Schema] | None = None,
    errors: tuple[int, ...] = (400,),
    status: str = "200",
    body: Schema | None = None,
    write: bool = False,
    public: bool = False,
) -> Schema:
    out: Schema = {"summary": summary, "parameters": params or [], "responses": {status: ok}}
    if params and 400 not in errors:  # a NUL or an over-long parameter (errors.checked_params)
        errors = (400, *errors)
    for code in errors:
        out["responses"][str(code)] = ERR
    if write:  # a token is required; 403 also for another web origin or when writes are disabled
        out["security"] = SECURITY
        out["responses"]["401"] = ERR
        out["responses"]["403"] = ERR
        if body is not None:
            out["responses"]["415"] = ERR  # a body that is not Content-Type: application/json
    else:  # reads: open unless [api] read_tokens is set; public ones always open
        out["security"] = [] if public else READ_SECURITY
    if body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return out


STATUS_Q = param("status", schema=STATUS)
PATHS: Final[dict[str, Schema]] = {
    "/healthz": {"get": op("Alive", reply(obj({"status": STR})), errors=(), public=True)},
    "/readyz": {
        "get": op(
            "Ready: NATS connected, PostgreSQL reachable, consumer not stalled",
            reply(obj({"status": STR, "checks": {"type": "object"}})),
            errors=(503,),
            public=True,
        )
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text exposition format; gzip when accepted): all, one "
            "provider's hosts, or one shard of the hosts (docs/api.md, Prometheus metrics)",
            "parameters": [
                param("provider"),
                param("shard", schema={"type": "integer", "minimum": 0, "maximum": 4095}),
                param("shards", schema={"type": "integer", "minimum": 1, "maximum": 4096}),
            ],
            "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": STR}}},
                "400": ERR,
            },
        }
    },
    "/api/v1/openapi.json": {"get": op("This document", reply({"type": "object"}), errors=(), public=True)},
    "/api/v1/providers": {
        "get": op("Providers with status and capacity", reply(paged("Provider")), [STATUS_Q, *PAGE])
    },
    "/api/v1/providers/{provider}": {
        "get": op("One provider", reply(ref("Provider")), [param("provider", "path")], errors=(404,))
    },
    "/api/v1/hosts": {
        "get": op(
            "Hosts (optionally of one provider) with status",
            reply(paged("HostSummary")),
            [param("provider"), STATUS_Q, *PAGE],
            errors=(400, 404),
        )
    },
    "/api/v1/hosts/{host}": {
        "get": op(
            "One host: GPUs, readings, health, system, checks, events",
            reply(ref("Host")),
            [param("host", "path")],
            errors=(404,),
        ),
        "delete": op(
            "Forget a decommissioned host: its alerts resolve (reason forgotten), its history stays",
            reply(
                obj(
                    {
                        "host": STR,
                        "forgotten": BOOL,
                        "alerts_resolved": INT,
                        "in_inventory": BOOL,
                        "forget_pending": BOOL,
                    },
                    ["host", "forgotten"],  # a group with no owner answering: forget_pending instead
                )
            ),
            [param("host", "path")],
            errors=(404, 409),
            write=True,
        ),
    },
    "/api/v1/hosts/{host}/history": {
        "get": op(
            "History of one metric (raw and paginated without step, else aggregated per step)",
            reply(ref("History")),
            [
                param("host", "path"),
                param("metric", required=True),
                param("gpu", schema={"type": "integer", "minimum": 0, "maximum": 1023}),
                param("since", schema=TIME),
                param("until", schema=TIME),
                param("step", schema={"type": "number", "minimum": 0.001, "exclusiveMaximum": 1e11}),
                param("limit", schema={"type": "integer", "minimum": 1, "maximum": 10000}),
                param("cursor"),
            ],
            errors=(400, 404, 503),  # 503 + Retry-After: [api] max_heavy_queries running, or timed out
        )
    },
    "/api/v1/alerts": {
        "get": op(
            "Alerts, newest first",
            reply(paged("Alert")),
            [
                param("state", schema={"type": "string", "enum": list(ALERT_STATES)}),
                param("provider"),
                param("host"),
                param("severity", schema={"type": "string", "enum": list(SEVERITIES)}),
                param("fold", schema=BOOL),
                *PAGE,
            ],
        )
    },
    "/api/v1/alerts/{id}": {
        "get": op("One alert", reply(ref("Alert")), [param("id", "path")], errors=(404,))
    },
    "/api/v1/alerts/{id}/ack": {
        "post": op(
            "Acknowledge an alert and the alerts it inhibits (stops their escalation)",
            reply(ref("Alert")),
            [param("id", "path")],
            errors=(400, 404),
            write=True,
            body=obj(
                {
                    "by": {**STR, "deprecated": True, "description": "ignored: the token's name is recorded"},
                    "comment": STR,
                    "until": {"type": ["number", "null"]},
                },
                required=[],
            ),
        )
    },
    "/api/v1/silences": {
        "get": op(
            "Silences (config and API)", reply(paged("Silence")), [param("active", schema=BOOL), *PAGE]
        ),
        "post": op(
            "Add a silence",
            reply(ref("Silence"), "created"),
            status="201",
            write=True,
            body=obj(
                {
                    "matchers": {"type": "array", "items": STR, "minItems": 1},
                    "starts_at": NUM,
                    "ends_at": NUM,
                    "duration": NUM,
                    "author": {
                        **STR,
                        "deprecated": True,
                        "description": "ignored: the token's name is recorded",
                    },
                    "comment": STR,
                },
                required=["matchers"],
            ),
        ),
    },
    "/api/v1/silences/{id}": {
        "delete": op(
            "Expire a silence",
            reply(None, "expired"),
            [param("id", "path")],
            status="204",
            errors=(404,),
            write=True,
        )
    },
    "/api/v1/incidents": {
        "get": op("Incidents, newest first", reply(paged("Incident")), [param("open", schema=BOOL), *PAGE])
    },
    "/api/v1/incidents/{id}": {
        "get": op("One incident, its members", reply(ref("Incident")), [param("id", "path")], errors=(404,))
    },
    "/api/v1/incidents/{id}/ack": {
        "post": op(
            "Acknowledge an open incident: each of its members not yet acknowledged is acknowledged",
            reply(ref("Incident")),
            [param("id", "path")],
            errors=(400, 404),
            write=True,
            body=obj({"comment": STR, "until": {"type": ["number", "null"]}}, required=[]),
        )
    },
    "/api/v1/actions": {
        "get": op(
            "Remediation actions, newest first, with the remediation summary",
            reply(
                obj({"items": {"type": "array", "items": ref("Action")}, "remediation": ref("Remediation")})
            ),
            [
                param("state", schema={"type": "string", "enum": sorted(FINAL | OPEN)}),
                param("host"),
                param("limit", schema={"type": "integer", "minimum": 1, "maximum": 1000}),
            ],
            errors=(400, 503),
        )
    },
    "/api/v1/actions/{id}": {
        "get": op(
            "One action and its audit trail (proposed, approved, denied, started, step_ok, step_failed,"
            " failed, undone, done)",
            reply({**ref("Action"), "description": "plus audit: [AuditEvent]"}),
            [param("id", "path")],
            errors=(404, 503),
        )
    },
    "/api/v1/actions/{id}/approve": {
        "post": op(
            "Approve an action awaiting approval (mode approve): it runs",
            reply(ref("Action")),
            [param("id", "path")],
            errors=(400, 404, 409),
            write=True,
            body=obj({"comment": STR}, required=[]),
        )
    },
    "/api/v1/actions/{id}/deny": {
        "post": op(
            "Deny an action awaiting approval: it never runs",
            reply(ref("Action")),
            [param("id", "path")],
            errors=(400, 404, 409),
            write=True,
            body=obj({"comment": STR}, required=[]),
        )
    },
    "/api/v1/remediation": {
        "get": op("Remediation rules, circuit breakers, running actions", reply(ref("Remediation")))
    },
    "/api/v1/remediation/breakers/{provider}/reset": {
        "post": op(
            "Reset a provider's circuit breaker (closes it, forgets the hosts in its window)",
            reply(obj({"provider": STR, "tripped_at": NNUM, "reason": STR, "hosts": {"type": "object"}})),
            [param("provider", "path")],
            errors=(400, 404),
            write=True,
        )
    },
    "/api/v1/stream": {
        "get": {
            "summary": "WebSocket: live health changes, alert transitions and incidents",
            "description": "Upgrade to a WebSocket. Filters: provider, host, severity, type"
            " (comma-separated). A client that falls behind is closed with code 1013. A browser's"
            " Origin must be the page's own or in [api] allowed_origins (403). With [api]"
            " read_tokens set, a token is needed: the Authorization header or access_token.",
            "parameters": [
                param("provider"),
                param("host"),
                param("severity"),
                param("type"),
                param("access_token"),
            ],
            "security": READ_SECURITY,
            "responses": {"101": {"description": "switching protocols"}, "400": ERR, "401": ERR, "403": ERR},
        }
    },
    "/": {
        "get": {
            "summary": "The dashboard page",
            "responses": {"200": {"description": "OK", "content": {"text/html": {"schema": STR}}}},
        }
    },
}


def document() -> dict[str, Any]:
    """A fresh copy of the document (callers may modify it)."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {"title": "gpuwarden collector API", "version": "1"},
            "paths": PATHS,
            "components": {
                "schemas": SCHEMAS,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }
    )
