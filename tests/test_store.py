"""Storage against a real PostgreSQL: migrations, COPY writer, idempotence, rollups, retention,
queries, state rebuild. Also home of the frame builders the other collector tests use."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest

from collector.state import load_state
from collector.store import db, migrate, partitions, queries
from collector.store.rows import GPU_FIELDS, utc
from collector.store.writer import Accepted, Rejection, Writer
from shared.frames import (
    EventFrame,
    GpuSample,
    PublishOutage,
    SampleFrame,
    replace,
    to_wire,
)
from tests.support.records import event, inventory, make_config, sample
from tests.support.tls import self_signed_ca

# ----------------------------------------------------------------------------- frame builders


def expected_gpu_row(f: SampleFrame, g: GpuSample) -> tuple[object, ...]:
    return (f.host, round(f.ts, 6), g.index, *(getattr(g, n) for n in GPU_FIELDS))


async def stored_gpu_rows(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    cols = ", ".join(f"s.{n}" for n in GPU_FIELDS)
    rows = await conn.fetch(
        f"SELECT h.name, s.ts, s.gpu_index, {cols} FROM gpu_readings s JOIN hosts h ON h.id = s.host_id"
    )
    return [(r[0], round(r[1].timestamp(), 6), *tuple(r)[2:]) for r in rows]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
async def writer(pg_dsn: str, conn: asyncpg.Connection) -> AsyncIterator[Writer]:
    w = Writer(make_config(pg_dsn).postgres)
    yield w
    await w.close()


# ----------------------------------------------------------------------------- tests


async def test_migrations_twice_are_a_no_op(pg_dsn: str) -> None:
    c = await asyncpg.connect(pg_dsn)
    try:
        assert await migrate.current_version(c) == 0
        first = await migrate.migrate(c)
        assert first == [m.version for m in migrate.migrations()]
        tables = await c.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
        assert await migrate.migrate(c) == []
        assert (
            await c.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1") == tables
        )
        assert await migrate.current_version(c) == first[-1]
    finally:
        await c.close()


@pytest.mark.parametrize("version", [8, 10])
async def test_gpu_samples_migrations_keep_the_stored_rows(pg_dsn: str, version: int) -> None:
    """Migration 0008 (narrow types) and 0010 (facts in gpu_facts) rewrite gpu_samples: rows
    stored before them (two daily partitions) read back the same through gpu_readings, a row
    takes fewer bytes, and the writer stores into the new layout."""
    c = await asyncpg.connect(pg_dsn)
    w = Writer(make_config(pg_dsn).postgres)
    try:
        await migrate.migrate(c)  # creates schema_migrations; then back to the layout before `version`
        await c.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await c.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in migrate.migrations():
            if m.version < version:
                await c.execute(m.sql)
                await c.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name
                )
        now = time.time()
        midnight = now // 86400 * 86400  # frames on both sides of it: two daily partitions
        frames = [sample("m1", s, midnight - 5 + s) for s in range(10)]
        await partitions.ensure_partitions(c, {partitions.day_of(f.ts) for f in frames})
        hid = await c.fetchval(
            "WITH p AS (INSERT INTO providers (name) VALUES ('prov-a') RETURNING id)"
            " INSERT INTO hosts (name, provider_id, first_seen, last_seen) SELECT 'm1', id, now(), now()"
            " FROM p RETURNING id"
        )
        await c.copy_records_to_table(  # rows as the writer of that layout stored them
            "gpu_samples",
            records=[
                (utc(f.ts), hid, g.index, *map(g.__getattribute__, GPU_FIELDS))
                for f in frames
                for g in f.gpus
            ],
            columns=("ts", "host_id", "gpu_index", *GPU_FIELDS),
        )
        cols = ", ".join(
            f"{name}::float8" if "temp" in name or "pct" in name else name for name in GPU_FIELDS
        )
        query = f"SELECT ts, host_id, gpu_index, {cols} FROM {{}} ORDER BY ts, gpu_index"  # noqa: S608
        before = [tuple(r) for r in await c.fetch(query.format("gpu_samples"))]
        width = await c.fetchval("SELECT avg(pg_column_size(g.*)) FROM gpu_samples g")
        assert await migrate.migrate(c) == [m.version for m in migrate.migrations() if m.version >= version]
        assert [tuple(r) for r in await c.fetch(query.format("gpu_readings"))] == before
        assert len(before) == 10 * len(frames[0].gpus)
        assert await c.fetchval("SELECT avg(pg_column_size(g.*)) FROM gpu_samples g") <= width - 30
        days = await partitions.existing_days(c)
        assert len(days["gpu_samples"]) == 2
        assert await c.fetchval("SELECT to_regclass('gpu_samples_v1')") is None
        assert await c.fetchval("SELECT to_regclass('gpu_samples_v2')") is None
        # the writer stores into the new layout
        await w.write([Accepted(sample("m1", 99, now))])
        assert await c.fetchval("SELECT count(*) FROM gpu_samples") == len(before) + len(frames[0].gpus)
    finally:
        await w.close()
        await c.close()


def simulated_samples(host: str, ts: float, n: int) -> list[SampleFrame]:
    """Sample frames as the agent's simulated backend makes them (a detail of ~5 KB: disks, NICs,
    InfiniBand ports, modules, services, checks), one a second from ``ts``."""
    from agent.gpu.simulated import SimulatedBackend
    from agent.sampler import Sequencer, build_sample
    from agent.system import SimulatedSystem

    backend = SimulatedBackend(8, host=host, seed=1)
    backend.open()
    try:
        system = SimulatedSystem(host=host, seed=1)
        seqr = Sequencer(host=host, provider="prov-a")
        return [
            build_sample(seqr, interval_s=1.0, gpus=backend.sample(), system=system.sample(), ts=ts + i)
            for i in range(n)
        ]
    finally:
        backend.close()


async def lz4_supported(c: asyncpg.Connection) -> bool:
    try:
        async with c.transaction():
            await c.execute("CREATE TEMP TABLE lz4_probe (x text COMPRESSION lz4)")
            await c.execute("DROP TABLE lz4_probe")
        return True
    except asyncpg.FeatureNotSupportedError:
        return False


async def test_host_detail_migration_keeps_the_stored_samples(pg_dsn: str) -> None:
    """Migration 0015 turns host_samples.detail from jsonb into json (lz4 where the server has
    it): samples stored before it (two daily partitions) read back the same, the partitions
    made before and after it take the new compression, and the writer stores into the new type."""
    c = await asyncpg.connect(pg_dsn)
    try:
        await migrate.migrate(c)
        await c.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await c.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in migrate.migrations():
            if m.version < 15:
                await c.execute(m.sql)
                await c.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name
                )
        midnight = time.time() // 86400 * 86400
        frames = simulated_samples("d1", midnight - 3, 6)  # both sides of midnight
        await partitions.ensure_partitions(c, {partitions.day_of(f.ts) for f in frames})
        w = Writer(make_config(pg_dsn).postgres)  # the writer as it ran before 0015 (jsonb)
        try:
            assert len((await w.write([Accepted(f) for f in frames[:3]])).new) == 3
            assert len((await w.write([Accepted(f) for f in frames[3:]])).new) == 3
        finally:
            await w.close()
        assert await c.fetchval("SELECT min(length(detail::text)) FROM host_samples") > 2500  # toasted

        async def read() -> list[SampleFrame]:
            return sorted(await queries.latest_samples(c, midnight - 60), key=lambda f: f.ts)

        before = await read()
        assert [f.seq for f in before] == [frames[-1].seq]  # the newest of the host
        detail_before = [
            json.loads(r[0]) for r in await c.fetch("SELECT detail FROM host_samples ORDER BY ts")
        ]
        assert await migrate.migrate(c) == [m.version for m in migrate.migrations() if m.version >= 15]
        assert await read() == before
        assert [
            json.loads(r[0]) for r in await c.fetch("SELECT detail FROM host_samples ORDER BY ts")
        ] == detail_before
        assert before[0].system is not None
        assert before[0].system.ib_ports  # the node part came back
        assert (
            await c.fetchval(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = 'host_samples'::regclass AND attname = 'detail'"
            )
            == "json"
        )
        method = "l" if await lz4_supported(c) else ""
        later = simulated_samples("d1", midnight + 86400 + 5, 2)  # a partition made after 0015
        await partitions.ensure_partitions(c, {partitions.day_of(f.ts) for f in later})
        compression = await c.fetch(
            "SELECT a.attrelid::regclass::text AS rel, a.attcompression::text AS m FROM pg_attribute a"
            " JOIN pg_inherits i ON i.inhrelid = a.attrelid"
            " WHERE i.inhparent = 'host_samples'::regclass AND a.attname = 'detail'"
        )
        assert len(compression) == 3
        assert {r["m"] for r in compression} == {method}
        w = Writer(make_config(pg_dsn).postgres)
        try:
            assert len((await w.write([Accepted(f) for f in later])).new) == 2
        finally:
            await w.close()
        assert [f.seq for f in await read()] == [later[-1].seq]
        if method:
            new = await c.fetch(
                "SELECT DISTINCT pg_column_compression(detail) AS m FROM host_samples WHERE ts > $1",
                utc(midnight + 86400),
            )
            assert [r["m"] for r in new] == ["lz4"]
    finally:
        await c.close()


async def test_infiniband_ports_are_stored_as_arrays_and_read_back_in_both_forms(
    conn: asyncpg.Connection, writer: Writer
) -> None:
    """detail.node.ib_ports is stored as arrays in IbPort's field order (a simulated host's 8
    ports: ~3.4 KB as maps, ~1 KB as arrays); a sample reads back with the ports it was sent
    with, and so does a row written before, with the ports as maps."""
    (frame,) = simulated_samples("ib1", time.time() - 30, 1)
    assert frame.system is not None
    assert len(frame.system.ib_ports) == 8
    assert len((await writer.write([Accepted(frame)])).new) == 1
    stored = json.loads(await conn.fetchval("SELECT detail FROM host_samples"))
    assert stored["node"]["ib_ports"][0] == list(msgspec.structs.astuple(frame.system.ib_ports[0]))
    assert len(json.dumps(stored, separators=(",", ":"))) < 2500

    async def ports() -> object:
        (back,) = await queries.latest_samples(conn, frame.ts - 60)
        assert back.system is not None
        assert back.system.kernel_log == frame.system.kernel_log  # the rest of the node part
        return back.system.ib_ports

    assert await ports() == frame.system.ib_ports
    stored["node"]["ib_ports"] = [to_wire(p) for p in frame.system.ib_ports]  # as written before
    await conn.execute("UPDATE host_samples SET detail = $1", json.dumps(stored))
    assert await ports() == frame.system.ib_ports


async def test_new_hosts_of_a_batch_are_resolved_in_one_transaction(
    pg_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch meeting 300 hosts the writer does not know (a new fleet, or a restart with a
    backlog) upserts them and their providers in one transaction, not one commit each; a
    host that moved to another provider is updated; two writers upserting the same hosts at
    once, in opposite orders, neither deadlock nor make two rows of a host."""
    now = time.time()
    await conn.execute("INSERT INTO providers (name) VALUES ('prov-0')")  # one provider known already
    frames = [sample(f"n{h:03d}", 1, now - 10, provider=f"prov-{h % 3}", gpus=1) for h in range(300)]
    opened = 0
    real = asyncpg.Connection.transaction

    def counted(self: asyncpg.Connection, *args: object, **kw: object) -> object:
        nonlocal opened
        opened += 1
        return real(self, *args, **kw)

    w = Writer(make_config(pg_dsn).postgres)
    try:
        monkeypatch.setattr(asyncpg.Connection, "transaction", counted)
        assert len((await w.write([Accepted(f) for f in frames])).new) == 300
        monkeypatch.undo()
        # the day's partitions, the hosts, the facts, the batch itself: four, whatever the number
        # of hosts (one per host before: 303)
        assert opened == 4
        stored = {
            r["name"]: r["p"]
            for r in await conn.fetch(
                "SELECT h.name, p.name AS p FROM hosts h JOIN providers p ON p.id = h.provider_id"
            )
        }
        assert stored == {f.host: f.provider for f in frames}
        assert await conn.fetchval("SELECT count(*) FROM providers") == 3
        moved = sample("n001", 2, now - 9, provider="prov-new", gpus=1)
        assert len((await w.write([Accepted(moved)])).new) == 1
        assert (
            await conn.fetchval(
                "SELECT p.name FROM hosts h JOIN providers p ON p.id = h.provider_id WHERE h.name = 'n001'"
            )
            == "prov-new"
        )
    finally:
        await w.close()
    later = [sample(f"m{h:03d}", 1, now - 5, provider=f"prov-m{h % 7}", gpus=1) for h in range(200)]
    w1, w2 = Writer(make_config(pg_dsn).postgres), Writer(make_config(pg_dsn).postgres)
    try:
        r1, r2 = await asyncio.gather(
            w1.write([Accepted(f) for f in later]), w2.write([Accepted(f) for f in reversed(later)])
        )
        assert len(r1.new) + len(r2.new) == 200  # each frame stored once, by one of them
        assert await conn.fetchval("SELECT count(*) FROM hosts WHERE name LIKE 'm%'") == 200
        assert w1._hosts["m007"] == w2._hosts["m007"]
    finally:
        await w1.close()
        await w2.close()


async def test_frames_land_once_with_their_values(conn: asyncpg.Connection, writer: Writer) -> None:
    now = time.time()
    frames = [sample(f"h{h}", s, now - 100 + s) for h in range(3) for s in range(20)]
    result = await writer.write([Accepted(f) for f in frames])
    assert len(result.new) == 60
    assert result.duplicates == 0
    assert result.gpu_rows == 480
    again = await writer.write([Accepted(f) for f in frames[:30]] + [Accepted(frames[0])])
    assert again.new == []
    assert again.duplicates == 31
    assert again.gpu_rows == 0

    expected = sorted(expected_gpu_row(f, g) for f in frames for g in f.gpus)
    assert sorted(await stored_gpu_rows(conn)) == expected
    assert await conn.fetchval("SELECT count(*) FROM host_samples") == 60
    # unavailable is NULL, never NaN or -1
    assert await conn.fetchval("SELECT count(*) FROM gpu_readings WHERE pcie_replay_count IS NOT NULL") == 0
    detail = json.loads(await conn.fetchval("SELECT detail FROM host_samples LIMIT 1"))
    assert detail["procs"] == [
        [0, [[100, "python", 2**30, "job-7", None, None]]]
    ]  # GPU 0's processes (no MIG)
    hosts = await conn.fetch(
        "SELECT h.name, p.name AS p FROM hosts h JOIN providers p ON p.id = h.provider_id"
    )
    assert sorted((r["name"], r["p"]) for r in hosts) == [
        ("h0", "prov-a"),
        ("h1", "prov-a"),
        ("h2", "prov-a"),
    ]
    assert await conn.fetchval("SELECT count(*) FROM gpus") == 24


async def test_rollups_count_each_sample_once(conn: asyncpg.Connection, writer: Writer) -> None:
    base = math.floor(time.time() / 60) * 60 - 600
    frames = [sample("r1", s, base + s, gpus=2) for s in range(180)]  # 3 minutes at 1 s
    await writer.write([Accepted(f) for f in frames[:100]])
    await writer.write([Accepted(f) for f in frames[50:]])  # overlaps: 50 redelivered
    # written once per minute, not with every batch: until then each minute is marked pending
    assert await conn.fetchval("SELECT count(*) FROM gpu_rollup_1m") == 0
    assert await conn.fetchval("SELECT count(*) FROM gpu_rollup_pending") == 3
    assert len(writer.rollups_due()) == 2  # the host has sent samples well after 2 of its 3 minutes
    assert await writer.flush_rollups() == 2
    assert await writer.flush_rollups(everything=True) == 1
    assert await conn.fetchval("SELECT count(*) FROM gpu_rollup_pending") == 0
    await writer.write([Accepted(f) for f in frames[100:150]])  # redelivered again: nothing new
    assert writer.rollups_due(everything=True) == []
    # marks left by a crash (read by a new connection) are written once their host is seen again:
    # the same figures
    await conn.execute("INSERT INTO gpu_rollup_pending SELECT DISTINCT host_id, minute FROM gpu_rollup_1m")
    await writer.reset()
    await writer.connection()
    assert await writer.flush_rollups(everything=True) == 0  # r1 not seen by this writer yet
    await writer.write([Accepted(frames[0])])  # redelivered: nothing new, but r1 is known again
    assert await writer.flush_rollups(everything=True) == 3
    rows = await conn.fetch(
        "SELECT gpu_index, minute, n, temp_c_min, temp_c_max, temp_c_sum, temp_c_n FROM gpu_rollup_1m"
        " ORDER BY gpu_index, minute"
    )
    assert len(rows) == 6
    for r in rows:
        m0 = r["minute"].timestamp()
        temps = [
            g.temp_c for f in frames if m0 <= f.ts < m0 + 60 for g in f.gpus if g.index == r["gpu_index"]
        ]
        assert r["n"] == r["temp_c_n"] == len(temps) == 60
        assert r["temp_c_min"] == min(temps)
        assert r["temp_c_max"] == max(temps)
        assert r["temp_c_sum"] == pytest.approx(sum(temps))


async def test_events_and_inventory_are_idempotent(conn: asyncpg.Connection, writer: Writer) -> None:
    now = time.time()
    inv = inventory("e1", 1, now - 10, gpus=4)
    evs = [event("e1", s, now - 5 + s * 0.1) for s in range(2, 6)]
    r1 = await writer.write([Accepted(inv), *map(Accepted, evs)])
    r2 = await writer.write([Accepted(inv), *map(Accepted, evs)])
    assert len(r1.new) == 5
    assert r2.new == []
    assert r2.duplicates == 5
    rows = await conn.fetch("SELECT seq, xid, count, gpu_index FROM events ORDER BY seq")
    assert [(r["seq"], r["xid"], r["count"], r["gpu_index"]) for r in rows] == [
        (s, 79, s, 2) for s in range(2, 6)
    ]
    changes = await conn.fetch("SELECT change FROM gpu_inventory_changes")
    assert [c["change"] for c in changes] == ["added"] * 4
    # a newer inventory with one GPU gone records a removal; the older one redelivered changes nothing
    await writer.write([Accepted(inventory("e1", 9, now - 1, gpus=3))])
    await writer.write([Accepted(inventory("e1", 1, now - 10, gpus=4))])
    assert await conn.fetchval("SELECT count(*) FROM gpu_inventory_changes WHERE change = 'removed'") == 1
    assert await conn.fetchval("SELECT count(*) FROM gpus WHERE present") == 3


async def test_unstorable_frames_are_rejected_not_retried(conn: asyncpg.Connection, writer: Writer) -> None:
    now = time.time()
    good = sample("u1", 1, now, gpus=1)
    bad = sample("u1", 2, now, gpus=1)
    bad = replace(bad, gpus=(GpuSample(index=0, uuid="GPU-u1-0", ecc_sbe_volatile=(1 << 64) - 1),))
    nul = EventFrame(host="u1", provider="prov-a", boot_id="boot-1", seq=3, ts=now, message="a\x00b")
    result = await writer.write([Accepted(good), Accepted(bad, "subj", 77, 10, b"head"), Accepted(nul)])
    assert [f.seq for f in result.new] == [1]
    assert sorted((r.reason, r.field) for r in result.rejected) == [
        ("unstorable", "gpus[0].ecc_sbe_volatile"),
        ("unstorable", "message"),
    ]
    assert await conn.fetchval("SELECT count(*) FROM gpu_samples") == 1
    assert await conn.fetchval("SELECT count(*) FROM rejected_frames WHERE reason = 'unstorable'") == 2
    # rejected frames are idempotent on their stream sequence
    await writer.write([], [Rejection("s", "malformed", None, 3, b"abc", 77)])
    assert await conn.fetchval("SELECT count(*) FROM rejected_frames WHERE stream_seq = 77") == 1


async def test_retention_drops_old_partitions(conn: asyncpg.Connection, writer: Writer) -> None:
    now = time.time()
    today = partitions.day_of(now)
    old = now - 20 * 86400
    await writer.write([Accepted(sample("old", 1, old, gpus=1)), Accepted(sample("old", 2, now, gpus=1))])
    await writer.flush_rollups(everything=True)
    created = await partitions.ensure_partitions(conn, partitions.days_ahead(today, 3))
    assert len(created) == 6  # today's existed; 3 days ahead x 2 tables
    assert await partitions.ensure_partitions(conn, partitions.days_ahead(today, 3)) == []
    dropped = await partitions.apply_retention(conn, now, retention_days=14, rollup_retention_days=180)
    old_day = partitions.day_of(old)
    assert sorted(dropped) == sorted(partitions.partition_name(t, old_day) for t in partitions.SAMPLE_TABLES)
    days = await partitions.existing_days(conn)
    assert all(min(d) >= today - timedelta(days=14) for d in days.values())
    assert await conn.fetchval("SELECT count(*) FROM gpu_samples") == 1  # today's sample stays
    assert [r[0] for r in await conn.fetch("SELECT day FROM gpu_facts")] == [today]  # the old day's went
    # rollups of the old day are kept (180 days), and trimmed past that
    assert await conn.fetchval("SELECT count(*) FROM gpu_rollup_1m") == 2
    await partitions.apply_retention(conn, now + 200 * 86400, 14, 180)
    assert await conn.fetchval("SELECT count(*) FROM gpu_rollup_1m") == 0


async def test_history_queries(conn: asyncpg.Connection, writer: Writer) -> None:
    start = math.floor(time.time() / 3600) * 3600 - 7200
    frames = [sample("q1", s, start + s * 5, gpus=2) for s in range(240)]  # 20 min at 5 s
    await writer.write([Accepted(f) for f in frames])
    until = start + 1200
    # raw, paginated with a cursor: every sample once, in order
    seen, cursor = [], None
    while True:
        page = await queries.history(conn, "q1", "temp_c", start, until, cursor=cursor, limit=100)
        seen += page.points
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [(p.ts, p.gpu, p.value) for p in seen] == [
        (f.ts, g.index, g.temp_c) for f in frames for g in f.gpus
    ]
    # step 60 s: from the rollups; step 30 s: aggregated from raw samples; both agree with the data,
    # before the rollups are written (minutes marked pending are read from the samples) and after
    for flush in (False, True):
        if flush:
            assert await writer.flush_rollups(everything=True) == 20  # 20 minutes of one host
        for step, source in ((60, "rollup_1m"), (30, "raw_agg"), (300, "rollup_1m")):
            for gpu in (1, None):
                page = await queries.history(conn, "q1", "temp_c", start, until, step=step, gpu=gpu)
                assert page.source == source
                assert len(page.points) == 1200 // step * (1 if gpu is not None else 2)
                for p in page.points:
                    vals = [f.gpus[p.gpu or 0].temp_c for f in frames if p.ts <= f.ts < p.ts + step]
                    assert p.count == len(vals)
                    assert p.min == min(vals)
                    assert p.max == max(vals)
                    assert p.value == pytest.approx(sum(vals) / len(vals))
    host_page = await queries.history(conn, "q1", "cpu_pct", start, until, step=600)
    assert [p.value for p in host_page.points] == [12.5, 12.5]
    with pytest.raises(queries.QueryError):
        await queries.history(conn, "q1", "temp_c; DROP TABLE hosts", start, until)
    with pytest.raises(queries.UnknownHostError):
        await queries.history(conn, "nope", "temp_c", start, until)


async def test_gpu_facts_read_back_exactly_in_any_order(conn: asyncpg.Connection, pg_dsn: str) -> None:
    """What rarely changes is stored once per distinct set of values (gpu_facts) and each sample
    names its set: the history of a fact reads every sample's own value, whatever the order and
    batches frames arrive in, redelivered or after a restart (a fresh writer)."""
    start = math.floor(time.time() / 3600) * 3600 - 7200  # 150 s inside one hour: one day

    def frame(s: int) -> SampleFrame:
        f = sample("fx", s, start + s * 5, gpus=2)
        limit = 600.0 if 10 <= s < 20 else 700.0  # changes, then changes back
        gpus = tuple(
            replace(g, power_limit_w=limit, ecc_sbe_volatile=s // 15 % 2, nvlink_crc_errors=7) for g in f.gpus
        )
        return replace(f, gpus=gpus)

    frames = [frame(s) for s in range(30)]
    shuffled = frames[:]
    random.Random(3).shuffle(shuffled)
    w1 = Writer(make_config(pg_dsn).postgres)
    try:
        for i in range(0, 30, 7):
            await w1.write([Accepted(f) for f in shuffled[i : i + 7]])
        assert (await w1.write([Accepted(f) for f in frames])).duplicates == 30
    finally:
        await w1.close()
    w2 = Writer(make_config(pg_dsn).postgres)  # knows no facts ids: finds the stored ones
    try:
        late = [frame(s) for s in (30, 31)]
        await w2.write([Accepted(f) for f in late])
    finally:
        await w2.close()
    frames += late
    # (700, 0), (600, 0), (600, 1), (700, 1) per GPU; the late frames (700, 0) add nothing
    assert await conn.fetchval("SELECT count(*) FROM gpu_facts") == 4 * 2
    for metric in ("power_limit_w", "ecc_sbe_volatile", "nvlink_crc_errors", "temp_c"):
        page = await queries.history(conn, "fx", metric, start, start + 200)
        assert [(p.ts, p.gpu, p.value) for p in page.points] == [
            (f.ts, g.index, getattr(g, metric)) for f in frames for g in f.gpus
        ]
        page = await queries.history(conn, "fx", metric, start, start + 200, step=50, gpu=1)
        for p in page.points:
            vals = [getattr(f.gpus[1], metric) for f in frames if p.ts <= f.ts < p.ts + 50]
            assert (p.count, p.min, p.max) == (len(vals), min(vals), max(vals))
    state = await load_state(conn)
    assert state.hosts["fx"].sample is not None
    assert state.hosts["fx"].sample.gpus == late[-1].gpus  # rebuilt at start with its facts


async def test_state_rebuilds_from_postgres(conn: asyncpg.Connection, writer: Writer) -> None:
    now = round(time.time(), 3)  # PostgreSQL keeps microseconds
    frames = [
        *(sample(f"s{h}", s, now - 30 + s, provider=f"prov-{h % 2}") for h in range(4) for s in range(5)),
        inventory("s0", 10, now - 1, provider="prov-0"),
        event("s1", 11, now - 2, provider="prov-1"),
        sample("s3", 12, now - 2, provider="prov-1", system=False),
    ]
    outage = PublishOutage(since=now - 60, until=now - 27, buffered_frames=33, dropped_frames=2)
    frames[14] = replace(frames[14], outage=outage)  # s2's newest sample carries a report
    await writer.write([Accepted(f) for f in frames])
    state = await load_state(conn)
    assert state.hosts["s2"].outage == outage  # stored with its sample and read back
    assert [(p.name, p.hosts) for p in await queries.providers(conn)] == [("prov-0", 2), ("prov-1", 2)]
    assert [h.name for h in await queries.hosts(conn, "prov-1")] == ["s1", "s3"]
    assert sorted(state.providers) == ["prov-0", "prov-1"]
    assert sorted(state.providers["prov-1"]) == ["s1", "s3"]
    for h in range(3):
        assert state.hosts[f"s{h}"].sample == frames[h * 5 + 4]  # the newest, equal field by field
    assert state.hosts["s3"].sample == frames[-1]  # no system block stays None
    assert state.hosts["s0"].inventory == frames[20]
    assert list(state.hosts["s1"].events) == [frames[21]]
    assert state.hosts["s2"].gpu_count == 8


async def test_connect_kwargs_and_transient_errors(pg_dsn: str) -> None:
    cfg = make_config(pg_dsn, **{"postgres.sslmode": "disable"})
    kwargs = db.connect_kwargs(cfg.postgres)
    assert kwargs["ssl"] == "disable"
    assert kwargs["dsn"] == pg_dsn
    c = await db.connect(cfg.postgres)
    assert await c.fetchval("SHOW timezone") == "UTC"
    await c.close()
    assert db.is_transient(ConnectionRefusedError())
    assert not db.is_transient(ValueError("bad data"))
    assert datetime.now(UTC).tzinfo is UTC


def test_tls_options_build_the_right_ssl_argument(tmp_path: object) -> None:
    import ssl

    from shared.errors import ConfigError

    def ssl_of(**flags: object) -> object:
        return db.connect_kwargs(make_config("postgresql://db/x", **flags).postgres).get("ssl")

    assert ssl_of() is None  # whatever the DSN says
    assert ssl_of(**{"postgres.sslmode": "prefer"}) == "prefer"
    required = ssl_of(**{"postgres.sslmode": "require"})
    assert isinstance(required, ssl.SSLContext)
    assert required.verify_mode == ssl.CERT_NONE
    with pytest.raises(ConfigError, match="TLS"):
        ssl_of(**{"postgres.sslmode": "verify-full", "postgres.sslrootcert": "/nonexistent/ca.pem"})


def test_a_configured_ca_without_sslmode_verifies_the_server_name(tmp_path: Path) -> None:
    """``sslrootcert`` alone means ``verify-full`` (chain and host name), not ``verify-ca``."""
    import ssl

    ca = self_signed_ca(tmp_path / "ca.key", tmp_path / "ca.pem", "test-ca")

    def ctx_of(**flags: object) -> ssl.SSLContext:
        got = db.connect_kwargs(make_config("postgresql://db/x", **flags).postgres).get("ssl")
        assert isinstance(got, ssl.SSLContext)
        return got

    default = ctx_of(**{"postgres.sslrootcert": str(ca)})
    assert default.verify_mode == ssl.CERT_REQUIRED
    assert default.check_hostname
    ca_only = ctx_of(**{"postgres.sslrootcert": str(ca), "postgres.sslmode": "verify-ca"})
    assert ca_only.verify_mode == ssl.CERT_REQUIRED
    assert not ca_only.check_hostname  # asked for explicitly


def test_two_migrations_numbered_alike_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two changes that each add migration N (landed in parallel): one would never run, and
    every migrate would fail on its version; refused by name instead."""
    assert len({m.version for m in migrate.migrations()}) == len(migrate.migrations())
    (tmp_path / "migrations").mkdir()
    for name in ("0001_a.sql", "0002_b.sql", "0002_c.sql"):
        (tmp_path / "migrations" / name).write_text("SELECT 1;")
    monkeypatch.setattr(migrate.resources, "files", lambda _pkg: tmp_path)
    with pytest.raises(RuntimeError, match="share a version number with another: 0002_"):
        migrate.migrations()
