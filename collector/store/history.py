"""The ``gpu_history`` table: fault history per physical GPU across boots (effects only; the
decisions are in :mod:`collector.health.history`)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import asyncpg

from collector.health.history import BoardHistory, merge, still_needed

_SELECT = (
    "SELECT board, serial, uuid, provider, host, gpu, boots, dropped, fatal,"
    " extract(epoch FROM updated_at)::float8 AS updated_at FROM gpu_history"
)


_CREATE = (
    "INSERT INTO gpu_history (board, updated_at) SELECT b, to_timestamp(0)"
    " FROM unnest($1::text[]) AS b ON CONFLICT (board) DO NOTHING"
)


def _board(r: asyncpg.Record) -> BoardHistory:
    return BoardHistory.from_dict(
        {**dict(r), "boots": json.loads(r["boots"]), "fatal": json.loads(r["fatal"])}
    )


async def load_history(conn: asyncpg.Connection) -> list[BoardHistory]:
    """Every tracked board."""
    return [_board(r) for r in await conn.fetch(_SELECT)]


async def save_history(
    conn: asyncpg.Connection,
    changed: Sequence[BoardHistory],
    gone: Sequence[tuple[str, float]],
    cutoff: float = 0.0,
) -> list[BoardHistory]:
    """Merge ``changed`` into the stored boards and delete the boards named in ``gone`` (each
    with the newest fatal XID its writer had seen), in one transaction; returns the boards as
    written.

    Several writers (a collector group's members, an old and a new holder of a bucket) each
    hold the fleet's history, so a row is never overwritten with one writer's view: the rows
    are locked and merged by event identity (:func:`collector.health.history.merge`: no fatal
    XID lost, none counted twice), and a forgotten board's row is deleted only when it holds
    no fatal XID newer than what its writer had seen (:func:`~collector.health.history.still_needed`).
    Fatal XIDs stored before ``cutoff`` (aged out of ``rma_history``) are dropped."""
    if not changed and not gone:
        return []
    names = sorted({b.board for b in changed} | {name for name, _ in gone})
    async with conn.transaction():
        # a row for each new board first (a second writer of it waits here for the first's commit)
        await conn.execute(_CREATE, sorted({b.board for b in changed}))
        rows = await conn.fetch(
            _SELECT + " WHERE board = ANY($1::text[]) ORDER BY board FOR UPDATE",
            names,
        )
        stored = {b.board: b for b in map(_board, rows)}
        lost = sorted({b.board for b in changed} - stored.keys())
        if lost:  # deleted by another writer (its host forgotten) between the two statements: this
            # writer has news of them, so they are made again (this transaction's own rows now)
            await conn.execute(_CREATE, lost)
            again = await conn.fetch(
                _SELECT + " WHERE board = ANY($1::text[]) ORDER BY board FOR UPDATE", lost
            )
            stored.update((b.board, b) for b in map(_board, again))
        written = [merge(stored[b.board], b, cutoff) for b in changed]
        if written:
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
                    for b in written
                    for d in (b.to_dict(),)
                ],
            )
        drop = [name for name, known in gone if name in stored and not still_needed(stored[name], known)]
        if drop:
            await conn.execute("DELETE FROM gpu_history WHERE board = ANY($1::text[])", drop)
    return written
