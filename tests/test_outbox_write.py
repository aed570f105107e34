"""The outbox rows of an alert step, written in one statement (collector.store.alerts.save)."""

from __future__ import annotations

import json

import asyncpg

from collector.store import alerts as pg
from collector.store.alerts import Changes


async def outbox(conn: asyncpg.Connection) -> dict[str, tuple[int, str, str | None, str]]:
    rows = await conn.fetch("SELECT id, delivery_key, channel, group_kv, status FROM notification_outbox")
    return {r["delivery_key"]: (r["id"], r["channel"], r["group_kv"], r["status"]) for r in rows}


async def test_a_steps_deliveries_are_written_in_its_order_once_each(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """New keys become pending rows, in the step's order (ascending ids), returned for delivery;
    a key stored by an earlier step, or twice in this one, is written and returned once; an early
    delivery (handed to its channel while PostgreSQL was down) is written with its outcome and
    not returned; in a caller's transaction (a collector group's step) the rows are the group's
    and nothing is visible before that transaction commits."""
    first = await pg.save(conn, 5, Changes(deliveries=[("webhook", "k-old", {"n": 0})]))
    assert [(r.channel, r.key, r.payload) for r in first] == [("webhook", "k-old", {"n": 0})]
    step = [
        ("webhook", "k1", {"n": 1}),
        ("slack", "k2", {"n": 2}),
        ("webhook", "k-old", {"n": 3}),
        ("webhook", "k1", {"n": 4}),
        ("slack", "k3", {"n": 5}),
    ]
    rows = await pg.save(conn, 5, Changes(deliveries=step))
    assert [(r.channel, r.key, r.payload) for r in rows] == [
        ("webhook", "k1", {"n": 1}),
        ("slack", "k2", {"n": 2}),
        ("slack", "k3", {"n": 5}),
    ]
    ids = [r.id for r in rows]
    assert ids == sorted(ids)
    assert ids[0] > first[0].id
    stored = await outbox(conn)
    assert stored["k1"] == (ids[0], "webhook", None, "pending")
    assert stored["k-old"] == (first[0].id, "webhook", None, "pending")
    assert len(stored) == 4

    other = await asyncpg.connect(pg_dsn)
    try:
        async with conn.transaction():
            rows = await pg.save(
                conn,
                6,
                Changes(deliveries=[("webhook", "k4", {"n": 6}), ("webhook", "k5", {"n": 7})]),
                early={"k5": None},
                group="grp-a",
            )
            assert [r.key for r in rows] == ["k4"]
            assert set(await outbox(other)) == {"k-old", "k1", "k2", "k3"}  # not committed yet
    finally:
        await other.close()
    stored = await outbox(conn)
    assert stored["k4"] == (rows[0].id, "webhook", "grp-a", "pending")
    assert stored["k5"][3] == "pending"  # in flight when its step was written: its outcome comes later


async def test_health_snapshots_of_several_partitions_are_written_at_once(conn: asyncpg.Connection) -> None:
    """A step's health snapshots (one per bucket whose alerts changed) go in one statement and
    read back as written; a second write replaces them."""
    snaps = {7: {"hosts": {"h1": {"status": "healthy", "t": 1.5}}}, 3: {"hosts": {}}}
    await pg.save_health_many(conn, snaps)
    await pg.save_health_many(conn, {})
    rows = {r["partition"]: r["data"] for r in await conn.fetch("SELECT partition, data FROM health_state")}
    assert {p: json.loads(d) for p, d in rows.items()} == snaps
    await pg.save_health_many(conn, {7: {"hosts": {}}})
    assert json.loads(await conn.fetchval("SELECT data FROM health_state WHERE partition = 7")) == {
        "hosts": {}
    }
