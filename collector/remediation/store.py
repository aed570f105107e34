"""Remediation state and audit in PostgreSQL (migration 0006_remediation)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from collector.remediation.engine import FINAL, Action, BreakerState, Event, RemediationState


async def load(conn: asyncpg.Connection, since: float) -> RemediationState:
    """Open actions, final ones updated since ``since`` (cooldown, breaker window) and the breakers."""
    st = RemediationState()
    rows = await conn.fetch(
        "SELECT record FROM remediation_actions WHERE NOT (state = ANY($1::text[])) OR updated_at >= $2",
        sorted(FINAL),
        since,
    )
    for r in rows:
        a = Action.from_dict(json.loads(r["record"]))
        st.actions[a.id] = a
    for r in await conn.fetch("SELECT record FROM remediation_breakers"):
        b = BreakerState.from_dict(json.loads(r["record"]))
        st.breakers[b.provider] = b
    return st


async def save(
    conn: asyncpg.Connection,
    actions: Iterable[Action],
    breakers: Iterable[BreakerState],
    events: Sequence[Event],
) -> None:
    """Write changed actions and breakers and append the audit events, in one transaction."""
    async with conn.transaction():
        await conn.executemany(
            """INSERT INTO remediation_actions
                 (id, rule, fingerprint, host, provider, node, mode, state, created_at, updated_at, record)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb)
               ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, updated_at = EXCLUDED.updated_at,
                 record = EXCLUDED.record""",
            [
                (
                    a.id,
                    a.rule,
                    a.fingerprint,
                    a.host,
                    a.provider,
                    a.node,
                    a.mode,
                    a.state,
                    a.created_at,
                    a.updated_at,
                    json.dumps(a.to_dict()),
                )
                for a in actions
            ],
        )
        await conn.executemany(
            """INSERT INTO remediation_breakers (provider, record) VALUES ($1, $2::jsonb)
               ON CONFLICT (provider) DO UPDATE SET record = EXCLUDED.record""",
            [(b.provider, json.dumps(b.to_dict())) for b in breakers],
        )
        await conn.executemany(
            """INSERT INTO remediation_audit
                 (action_id, at, event, who, why, step, exit_code, output, provider)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            [
                (
                    e.action_id,
                    e.at,
                    e.event,
                    e.who,
                    e.why[:2000],
                    e.step[:2000],
                    e.exit_code,
                    e.output[-4096:],
                    e.provider,
                )
                for e in events
            ],
        )


async def list_actions(
    conn: asyncpg.Connection, *, state: str | None = None, host: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT record FROM remediation_actions
           WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR host = $2)
           ORDER BY created_at DESC, id LIMIT $3""",
        state,
        host,
        limit,
    )
    return [json.loads(r["record"]) for r in rows]


async def get_action(conn: asyncpg.Connection, aid: str) -> dict[str, Any] | None:
    rec = await conn.fetchval("SELECT record FROM remediation_actions WHERE id = $1", aid)
    return json.loads(rec) if rec is not None else None


async def audit(conn: asyncpg.Connection, aid: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT action_id, at, event, who, why, step, exit_code, output, provider
           FROM remediation_audit WHERE ($1::text IS NULL OR action_id = $1) ORDER BY id DESC LIMIT $2""",
        aid,
        limit,
    )
    return [dict(r) for r in reversed(rows)]
