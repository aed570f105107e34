"""Fencing tokens in PostgreSQL: what makes a lost lease harmless to the outbox.

``take`` raises a bucket's token to the lease revision of its new owner (never lowers it);
``check`` (inside the caller's transaction) refuses the transaction when a bucket's token is
no longer the caller's; ``claim`` marks one pending notification as being sent by the owner
whose token still holds. A member paused past its lease thus cannot write alerts or outbox
rows, nor claim a row for sending, once the new owner raised the token.

The rows are the group's (``group``: its KV bucket, ``[collector] group_kv``): two groups
writing into one database each have their own token per bucket (migration 0013).

A member paused *inside* such a transaction keeps its ``FOR SHARE`` locks until it resumes or
PostgreSQL ends its session (``idle_in_transaction_session_timeout``, set on a member's pool):
the taker raises with a ``lock_timeout`` (``take(..., wait=)``) and takes that bucket at a later
round instead of waiting for it.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from shared.errors import GpuwardenError


class FencedError(GpuwardenError):
    """A bucket's fencing token moved on: this member no longer owns it."""

    def __init__(self, buckets: list[int]) -> None:
        super().__init__(f"buckets {buckets} are owned by another member now (fenced)")
        self.buckets = buckets


# the bucket's row stayed locked past ``take``'s ``wait`` (SQLSTATE 55P03, lock_not_available)
LockTimeout = asyncpg.LockNotAvailableError
_TAKE = (
    "INSERT INTO group_fences (group_kv, bucket, token, member) VALUES ($4, $1, $2, $3)"
    " ON CONFLICT (group_kv, bucket) DO UPDATE SET token = EXCLUDED.token, member = EXCLUDED.member,"
    " taken_at = now() WHERE group_fences.token < EXCLUDED.token RETURNING token"
)


async def take(
    conn: asyncpg.Connection, bucket: int, token: int, member: str, *, group: str, wait: float | None = None
) -> bool:
    """Raise ``group``'s token of ``bucket`` to ``token``; False when a larger token is already
    there. With ``wait`` (seconds): in a transaction whose ``lock_timeout`` is ``wait``, raising
    :data:`LockTimeout` when the row stays locked longer (a write in flight holds it)."""
    if wait is None:
        return await conn.fetchval(_TAKE, bucket, token, member, group) is not None
    async with conn.transaction():
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{max(1, round(wait * 1000))}ms")
        return await conn.fetchval(_TAKE, bucket, token, member, group) is not None


async def check(conn: asyncpg.Connection, tokens: Mapping[int, int], *, group: str) -> None:
    """In a transaction: raise :class:`FencedError` unless every bucket of ``tokens`` still has
    the given token in ``group`` (locked FOR SHARE until the transaction ends)."""
    if not tokens:
        return
    rows = await conn.fetch(
        "SELECT bucket, token FROM group_fences WHERE group_kv = $2 AND bucket = ANY($1::int[]) FOR SHARE",
        list(tokens),
        group,
    )
    have = {r["bucket"]: r["token"] for r in rows}
    bad = sorted(b for b, t in tokens.items() if have.get(b) != t)
    if bad:
        raise FencedError(bad)


async def claim(
    conn: asyncpg.Connection, row_id: int, bucket: int, token: int, member: str, *, group: str
) -> bool:
    """Claim a pending outbox row for sending: True only while ``token`` is ``group``'s token of
    ``bucket``, and the row is the group's (or no group's: written before migration 0013)."""
    got = await conn.fetchval(
        "UPDATE notification_outbox SET claimed_by = $4, claim_token = $3 WHERE id = $1"
        " AND status = 'pending' AND (group_kv IS NULL OR group_kv = $5)"
        " AND EXISTS (SELECT 1 FROM group_fences g WHERE g.group_kv = $5 AND g.bucket = $2"
        " AND g.token = $3) RETURNING id",
        row_id, bucket, token, member, group,
    )  # fmt: skip
    return got is not None


async def own(conn: asyncpg.Connection, row_ids: list[int], group: str) -> None:
    """Mark outbox rows just written (in the caller's transaction) as ``group``'s."""
    if row_ids:
        await conn.execute(
            "UPDATE notification_outbox SET group_kv = $2 WHERE id = ANY($1::bigint[])", row_ids, group
        )
