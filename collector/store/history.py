"""The ``gpu_history`` table: fault history per physical GPU across boots (effects only; the
decisions are in :mod:`collector.health.history`)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import asyncpg

from collector.health.history import BoardHistory


async def load_history(conn: asyncpg.Connection) -> list[BoardHistory]:
    """Every tracked board."""
    rows = await conn.fetch(
        "SELECT board, serial, uuid, provider, host, gpu, boots, dropped, fatal,"
        " extract(epoch FROM updated_at)::float8 AS updated_at FROM gpu_history"
    )
    return [
        BoardHistory.from_dict({**dict(r), "boots": json.loads(r["boots"]), "fatal": json.loads(r["fatal"])})
        for r in rows
    ]


async def save_history(
    conn: asyncpg.Connection, changed: Sequence[BoardHistory], gone: Sequence[str]
) -> None:
    """Upsert ``changed`` and delete the boards named in ``gone``, in one transaction."""
    if not changed and not gone:
        return
    async with conn.transaction():
        if changed:
            await conn.executemany(
                "INSERT INTO gpu_history (board, serial, uuid, provider, host, gpu, boots, dropped, fatal,"
                " updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9::jsonb, to_timestamp($10))"
                " ON CONFLICT (board) DO UPDATE SET serial = EXCLUDED.serial, uuid = EXCLUDED.uuid,"
                " provider = EXCLUDED.provider, host = EXCLUDED.host, gpu = EXCLUDED.gpu,"
                " boots = EXCLUDED.boots, dropped = EXCLUDED.dropped, fatal = EXCLUDED.fatal,"
                " updated_at = EXCLUDED.updated_at",
                [
                    (
                        b.board,
                        b.serial,
                        b.uuid,
                        b.provider,
                        b.host,
                        b.gpu,
                        json.dumps(d["boots"]),
                        b.dropped,
                        json.dumps(d["fatal"]),
                        b.updated_at,
                    )
                    for b in changed
                    for d in (b.to_dict(),)
                ],
            )
        if gone:
            await conn.execute("DELETE FROM gpu_history WHERE board = ANY($1::text[])", list(gone))
