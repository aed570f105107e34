"""Collector group: a member's own alerts (the self-check's, of no bucket) stay with it through a
regroup, so that what fired is resolved and told so.

Real PostgreSQL (alert state, fencing tokens, the outbox); one member's engine runner and store
as :mod:`collector.wiring` assembles them, its leases a plain dict (bucket -> fencing token) as
in tests/test_group_health.py, and its NATS connection a flag the test sets (the self-check
reads only whether it is connected). A NATS outage long enough for the leases to age out takes
every bucket from a group of one: the regroup that follows reloads only the buckets held.
Before, it dropped the firing ``collector.pipeline`` alert with them, and when NATS was back its
resolution was never told (tests/test_alerting_outage.py as a group of one)."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from collector.group import fence
from collector.group.scope import Scope
from collector.group.store import GroupAlertStore
from tests.support.collector import load_toml
from tests.support.runner import CONFIG as RUNNER_CONFIG
from tests.support.runner import Recorder, build_runner
from tests.support.wait import until

BUCKET = 9
CONFIG = 'durable = "own"\n[alerting]\ntick = "100ms"\n[selfcheck]\ngrace = "0s"\n' + RUNNER_CONFIG


def told(channel: Recorder, rule: str) -> list[str]:
    return [p["status"] for p in channel.payloads if p.get("rule") == rule]


async def test_a_self_alert_kept_through_losing_every_bucket_is_resolved_when_the_problem_ends(
    conn: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    cfg = load_toml(tmp_path, pg_dsn, None, CONFIG)
    held: dict[int, int] = {}
    scope = Scope(64, lambda b: b in held, lambda: dict(held))
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    store = GroupAlertStore(lambda: pool, scope, "g")
    connected = True
    runner, channel, _ = build_runner(cfg, store, scope=scope, nats_connected=lambda: connected)
    store.incidents = lambda: runner.alerts_state.incidents
    store.health = lambda: (runner.health, runner.health_engine.healthy_for)
    try:
        assert await fence.take(conn, BUCKET, 1, "m", group="g")
        held[BUCKET] = 1
        await runner.start()
        connected = False  # the member's NATS connection is down
        await until(lambda: told(channel, "collector.pipeline") == ["firing"], what="the self-alert told")

        held.clear()  # the leases aged out meanwhile: every bucket lost
        await runner.regroup(lambda: store.reload(()))
        pipeline = [a for a in runner.list_alerts(state="firing") if a.rule == "collector.pipeline"]
        assert len(pipeline) == 1, "the member's own alert was dropped with the buckets"

        connected = True  # NATS is back; its buckets are taken again
        assert await fence.take(conn, BUCKET, 2, "m", group="g")
        held[BUCKET] = 2
        await runner.regroup(lambda: store.reload([BUCKET]))
        await until(
            lambda: told(channel, "collector.pipeline") == ["firing", "resolved"], what="the resolution told"
        )
        assert [a.rule for a in runner.list_alerts(state="firing")] == []
        fp = pipeline[0].fingerprint
        # written, not only told
        assert await conn.fetchval("SELECT state FROM alerts WHERE fingerprint = $1", fp) == "resolved"
    finally:
        await runner.stop()
        await pool.close()
