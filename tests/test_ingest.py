"""Ingest against real nats-server (JetStream) and PostgreSQL: every frame once, bad input
counted and kept out, partitions, PostgreSQL restarted mid-stream."""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

import collector.ingest as ingest_mod
from collector.ingest import Ingest, Limits, ack_meta, check, owner, subject_verdict
from collector.store import migrate
from collector.store.rows import storage_problem
from collector.store.writer import Accepted, Rejection, Writer
from gpuwarden.servers import NatsServer, PostgresServer
from shared.frames import Frame, encode, to_wire
from shared.subjects import sample_subject
from tests.support.ingest import _count, config, publish, running, stored_keys
from tests.support.records import event, sample
from tests.support.wait import until

# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- pure checks

LIMITS = Limits(max_bytes=1 << 20, oldest_ts=0.0, newest_ts=2e9)


def test_check_accepts_a_good_frame_and_names_each_problem() -> None:
    f = sample("gpu-1", 5, 1.7e9)
    good = check(
        sample_subject("acme", "gpu-1"), encode(sample("gpu-1", 5, 1.7e9, provider="acme")), LIMITS, 9
    )
    assert type(good) is Accepted
    assert good.stream_seq == 9
    cases = {
        "gpuwarden.v1.sample.prov-a.other": ("spoofed", "host"),
        "gpuwarden.v1.sample.prov-b.gpu-1": ("spoofed", "provider"),
        "gpuwarden.v1.event.prov-a.gpu-1": ("spoofed", "kind"),
        "gpuwarden.v1.sample.prov-a.gpu-1.x": ("bad_subject", None),
    }
    for subject, (reason, fld) in cases.items():
        r = check(subject, encode(f), LIMITS)
        assert type(r) is Rejection
        assert (r.reason, r.field) == (reason, fld)
        assert r.head == encode(f)[:64]
    subject = sample_subject("prov-a", "gpu-1")
    assert check(subject, encode(f)[:-3], LIMITS).reason == "malformed"  # type: ignore[union-attr]
    assert check(subject, encode(f), Limits(100, 0, 2e9)).reason == "oversized"  # type: ignore[union-attr]
    late = Limits(1 << 20, 1.8e9, 2e9)
    assert check(subject, encode(f), late).reason == "ts_out_of_window"  # type: ignore[union-attr]
    wire = to_wire(f)
    wire["seq"] = (1 << 64) - 1
    r = check(subject, msgpack.packb(wire), LIMITS)
    assert (r.reason, r.field) == ("out_of_range", "seq")  # type: ignore[union-attr]
    wire = to_wire(f) | {"host": "gpu-1\x00"}
    assert check(subject, msgpack.packb(wire), LIMITS).reason == "spoofed"  # type: ignore[union-attr]


def test_subject_verdicts_are_remembered_within_a_bound() -> None:
    ingest_mod._verdicts.clear()
    good = sample_subject("acme", "gpu-1")
    first = subject_verdict(good, 0)
    assert subject_verdict(good, 0) is first  # remembered
    assert subject_verdict("gpuwarden.v1.sample.acme.gpu 1", 0) == (
        "bad_subject",
        "host",
        "subject host token 'gpu 1' is not canonical",
    )
    for i in range(ingest_mod.SUBJECT_VERDICTS):  # made-up subjects never hold more than the bound
        subject_verdict(f"gpuwarden.v1.sample.acme.h{i}", 0)
    assert len(ingest_mod._verdicts) <= ingest_mod.SUBJECT_VERDICTS
    again = subject_verdict(good, 0)  # forgotten, judged again: the same verdict
    assert again == first
    assert again is not first
    f = sample("gpu-1", 5, 1.7e9, provider="acme")
    assert type(check(good, encode(f), LIMITS)) is Accepted


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.GPUWARDEN.gpuwarden-collector-0of1.3.1234.77.1700000000123456789.42",  # v1
        "$JS.ACK.hub.ACCHASH.GPUWARDEN.gpuwarden-collector-b7.1.99.5.1700000000500000000.0.r4nd",  # v2
        "$JS.ACK._.ACCHASH.GPUWARDEN.c.2.99.5.1700000000500000000.0",  # v2, 11 tokens
    ],
)
def test_ack_meta_reads_what_nats_py_reads(reply: str) -> None:
    m = Msg(_client=None, subject="s", reply=reply, data=b"")  # type: ignore[arg-type]
    seq, delivered, ts = ack_meta(m)
    md = m.metadata  # nats-py's own parse of the same subject
    assert (seq, delivered) == (md.sequence.stream, md.num_delivered)
    assert ts == pytest.approx(md.timestamp.timestamp(), abs=1e-6)


@pytest.mark.parametrize("reply", ["", "_INBOX.abc", "$JS.ACK.S.c.x.1.1.1.1", "$JS.ACK.a.b.c.d.e.f.g.h.i"])
def test_ack_meta_of_other_subjects_is_unknown(reply: str) -> None:
    assert ack_meta(Msg(_client=None, subject="s", reply=reply, data=b"")) == (None, 1, None)  # type: ignore[arg-type]


def test_partition_owner_is_crc32_of_the_host_token() -> None:
    import zlib

    hosts = [f"host-{i:04d}" for i in range(1000)]
    for n in (1, 2, 3, 7):
        parts = Counter(owner(h, n) for h in hosts)
        assert set(parts) == set(range(n))
        assert all(owner(h, n) == zlib.crc32(h.encode()) % n for h in hosts)


# ----------------------------------------------------------------------------- end to end


async def test_fleet_frames_land_once(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    cfg = config(pg_dsn, private_nats.url)
    now = time.time()
    frames: list[Frame] = [sample(f"host-{h}", s, now - 60 + s) for h in range(10) for s in range(30)]
    frames += [event("host-1", 100 + i, now - 5) for i in range(3)]
    async with running(cfg) as ingest:
        nc = await nats.connect(private_nats.url)
        js = nc.jetstream()
        await publish(js, frames)
        await publish(js, frames[:50])  # a publisher's replay: stored once (host, boot id, seq)
        await until(lambda: _count(conn, "host_samples", 300))
        await until(lambda: _count(conn, "events", 3))
        await nc.close()
        await until(lambda: _stored(ingest, 303))
        assert ingest.stats.frames_stored == 303
        assert ingest.stats.gpu_samples_stored == 2400
        assert ingest.stats.rejected == Counter()
    keys = await stored_keys(conn)
    assert set(keys.values()) == {1}
    assert set(keys) == {(f.host, f.seq) for f in frames if f.kind == "sample"}
    assert await conn.fetchval("SELECT count(*) FROM gpu_samples") == 2400
    temps = await conn.fetch(
        "SELECT s.temp_c, s.power_w FROM gpu_samples s JOIN hosts h ON h.id = s.host_id"
        " WHERE h.name = 'host-3' AND s.gpu_index = 5 ORDER BY s.ts"
    )
    want = [
        (f.gpus[5].temp_c, f.gpus[5].power_w) for f in frames if f.host == "host-3" and f.kind == "sample"
    ]
    assert [(r["temp_c"], r["power_w"]) for r in temps] == want


# ----------------------------------------------------------------------------- fuzzing

NUMERIC_FIELDS = ["util_gpu_pct", "temp_c", "power_w", "mem_used_bytes", "clock_sm_mhz", "pstate", "fan_pct"]


_FUZZ_BOOT = itertools.count()


def _fuzz_message(kind: int, data: st.DataObject) -> tuple[str, bytes]:
    boot = f"fz-{next(_FUZZ_BOOT):08d}"  # each frame its own key (and the same length)
    base = sample("fz-1", data.draw(st.integers(1, 10**6)), time.time(), boot=boot, gpus=2)
    subject = sample_subject(base.provider, base.host)
    wire = to_wire(base)
    if kind == 0:  # garbage
        return subject, data.draw(st.binary(max_size=300))
    if kind == 1:  # truncated
        raw = encode(base)
        return subject, raw[: data.draw(st.integers(0, len(raw) - 1))]
    if kind == 2:  # wrong type in a field
        fld = data.draw(st.sampled_from(NUMERIC_FIELDS))
        wire["gpus"][data.draw(st.integers(0, 1))][fld] = data.draw(
            st.one_of(st.text(max_size=5), st.lists(st.integers(-1000, 1000), max_size=2), st.booleans())
        )
        return subject, msgpack.packb(wire)
    if kind == 3:  # huge values (beyond the field's range, or beyond 64-bit storage)
        g = wire["gpus"][0]
        which = data.draw(st.integers(0, 2))
        if which == 0:
            g["temp_c"] = data.draw(st.floats(min_value=301, allow_infinity=True, allow_nan=False))
        elif which == 1:
            g["ecc_sbe_volatile"] = data.draw(st.integers(1 << 63, (1 << 64) - 1))
        else:
            wire["seq"] = data.draw(st.integers(1 << 63, (1 << 64) - 1))
        return subject, msgpack.packb(wire)
    if kind == 4:  # NaN
        wire["gpus"][1][data.draw(st.sampled_from(["temp_c", "power_w", "util_gpu_pct"]))] = math.nan
        return subject, msgpack.packb(wire)
    if kind == 5:  # spoofed subject: another host's or provider's
        other = data.draw(st.sampled_from([("prov-a", "fz-2"), ("prov-x", "fz-1")]))
        return sample_subject(*other), encode(base)
    if kind == 6:  # wrong schema version or kind
        wire["v"] = data.draw(st.sampled_from([0, 3, "1", None]))
        return subject, msgpack.packb(wire)
    # oversized (collector limit set to 8 KiB in the test)
    wire["gpus"][0]["uuid"] = "x" * 4000
    wire["gpus"][1]["uuid"] = "y" * 4000
    wire["system"]["disks"] = [{"mount": "z" * 4000}] * data.draw(st.integers(1, 3))
    return subject, msgpack.packb(wire)


def fuzzed_messages(n: int) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(st.integers(0, 7), st.data())
    def gen(kind: int, data: st.DataObject) -> None:
        out.append(_fuzz_message(kind, data))

    gen()
    return out


async def test_fuzzed_frames_are_counted_and_never_stored(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    cfg = config(pg_dsn, private_nats.url, **{"collector.max_frame_bytes": 8192})
    messages = fuzzed_messages(1000)
    assert len(messages) >= 1000
    # what each message must be rejected for, from the pure checks
    limits = Ingest(cfg, Writer(cfg.postgres)).limits()
    expected: Counter[str] = Counter()
    dropped: Counter[str] = Counter()  # one bad GPU entry: the frame is stored without it
    partial: dict[tuple[str, int, float], int] = {}  # (boot, seq, ts) -> GPUs stored
    for subject, data in messages:
        r = check(subject, data, limits)
        if type(r) is Accepted and r.dropped_gpus:
            assert storage_problem(r.frame) is None
            dropped.update(reason for reason, _ in r.dropped_gpus)
            partial.setdefault((r.frame.boot_id, r.frame.seq, r.frame.ts), len(r.frame.gpus))  # type: ignore[union-attr]
        elif type(r) is Accepted:
            assert storage_problem(r.frame) is not None, (subject, data[:80])
            expected["unstorable"] += 1
        else:
            expected[r.reason] += 1  # type: ignore[union-attr]
    assert {"malformed", "out_of_range", "spoofed", "version", "oversized"} <= set(expected)
    assert {"bad_type", "out_of_range"} <= set(dropped)
    rejected = sum(expected.values())
    good = [sample("fz-ok", s, time.time(), gpus=2) for s in range(5)]
    async with running(cfg) as ingest:
        nc = await nats.connect(private_nats.url)
        js = nc.jetstream()
        for subject, data in messages:
            await js.publish(subject, data)
        await publish(js, good)  # after all the garbage: the collector is still up
        await until(lambda: _count(conn, "host_samples", 5 + len(partial)))
        await until(lambda: _count(conn, "rejected_frames", rejected))
        await nc.close()
        assert ingest.stats.rejected == expected
        assert ingest.stats.gpu_entries_rejected == dropped
        assert sum(ingest.stats.rejected.values()) + sum(dropped.values()) == len(messages)
    assert await conn.fetchval("SELECT count(*) FROM gpu_samples") == 10 + sum(partial.values())
    hosts = await conn.fetch(
        "SELECT h.name, count(*) AS n FROM host_samples s JOIN hosts h ON h.id = s.host_id GROUP BY 1"
    )
    assert {r["name"]: r["n"] for r in hosts} == {"fz-ok": 5, "fz-1": len(partial)}
    by_reason = await conn.fetch("SELECT reason, count(*) AS n FROM rejected_frames GROUP BY reason")
    assert Counter({r["reason"]: r["n"] for r in by_reason}) == expected
    assert await conn.fetchval("SELECT max(length(head)) FROM rejected_frames") <= 64


# ----------------------------------------------------------------------------- partitions


async def test_two_partitions_store_every_host_once(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    now = time.time()
    frames = [sample(f"node-{h:03d}", s, now - 20 + s, gpus=1) for h in range(24) for s in range(10)]
    cfgs = [
        config(pg_dsn, private_nats.url, **{"collector.partitions": 2, "collector.partition": i})
        for i in (0, 1)
    ]
    async with running(cfgs[0]) as p0, running(cfgs[1]) as p1:
        nc = await nats.connect(private_nats.url)
        await publish(nc.jetstream(), frames)
        await until(lambda: _count(conn, "host_samples", len(frames)))
        await nc.close()
        owned = [{f.host for f in frames if owner(f.host, 2) == i} for i in (0, 1)]
        assert owned[0]
        assert owned[1]

        async def accounted() -> bool:  # each partition's figures, once it has acked its batches
            return all(
                ing.stats.frames_stored == 10 * len(owned[i])
                and ing.stats.skipped_other_partition == 10 * len(owned[1 - i])
                for i, ing in enumerate((p0, p1))
            )

        await until(accounted)
        for i, ing in enumerate((p0, p1)):
            assert ing.stats.frames_stored == 10 * len(owned[i])
            assert ing.stats.duplicates == 0
            assert ing.stats.skipped_other_partition == 10 * len(owned[1 - i])
    keys = await stored_keys(conn)
    assert set(keys.values()) == {1}
    assert len(keys) == len(frames)


# ----------------------------------------------------------------------------- PostgreSQL outage


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


async def test_postgres_restart_mid_stream_loses_nothing(
    own_pg: PostgresServer, private_nats: NatsServer
) -> None:
    dsn = own_pg.dsn()
    c = await asyncpg.connect(dsn)
    await migrate.migrate(c)
    await c.close()
    cfg = config(dsn, private_nats.url, **{"collector.batch": 100})
    now = time.time()
    frames = [sample(f"pg-{h}", s, now - 100 + s * 0.1, gpus=2) for s in range(150) for h in range(4)]
    async with running(cfg) as ingest:
        nc = await nats.connect(private_nats.url)
        js = nc.jetstream()
        await publish(js, frames[:200])
        await until(lambda: _stored(ingest, 1))
        await asyncio.to_thread(own_pg.stop, "immediate")  # a crash, mid-stream
        await publish(js, frames[200:])  # agents keep publishing; JetStream keeps them

        async def failing() -> bool:  # the next write met the dead server, and retries
            return ingest.stats.db_errors >= 1 and not ingest.stats.db_up

        await until(failing)
        await asyncio.to_thread(own_pg.start)
        c = await asyncpg.connect(dsn)
        await until(lambda: _count(c, "host_samples", len(frames)), timeout=60)
        await nc.close()
        assert ingest.stats.db_up
    try:
        keys = await stored_keys(c)
        assert set(keys) == {(f.host, f.seq) for f in frames}
        assert set(keys.values()) == {1}
        assert await c.fetchval("SELECT count(*) FROM gpu_samples") == 2 * len(frames)
        assert await c.fetchval("SELECT sum(n) FROM gpu_rollup_1m") == 2 * len(frames)
    finally:
        await c.close()


async def _stored(ingest: Ingest, n: int) -> bool:
    return ingest.stats.frames_stored + ingest.stats.duplicates >= n


# ----------------------------------------------------------------------------- typed decoder

ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    1.5,
    math.nan,
    math.inf,
    "x",
    "",
    "y" * 5000,
    [],
    [1],
    {},
    {"a": 1},
    2**53 + 1,
    2**63,
    2**64 - 1,
    -(2**63),
    1e300,
    100,
    100.0,
    1023,
    1024,
]


def _outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    from shared.errors import FrameDecodeError

    try:
        return ("ok", fn())
    except FrameDecodeError as e:
        return ("error", e.reason, e.field, str(e))


def _mutations(wire: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(wire, dict):
        for k, v in wire.items():
            yield (*path, k), v
            yield from _mutations(v, (*path, k))
    elif isinstance(wire, list) and wire:
        yield from _mutations(wire[0], (*path, 0))


def _mutated(base: Any, path: tuple[Any, ...], odd: Any) -> Any:
    """A deep copy of ``base`` with the value at ``path`` set to ``odd`` (removed for "__missing__")."""
    raw = copy.deepcopy(base)
    node = raw
    for p in path[:-1]:
        node = node[p]
    if odd == "__missing__":
        del node[path[-1]]
    else:
        node[path[-1]] = odd
    return raw


def _reference_decode(data: bytes) -> Any:
    """What shared.frames.decode says when its typed decoder declines: the frame unpacked by
    msgpack (nesting bounded first), then converted by msgspec into the same schema."""
    from shared import frames as fr
    from shared.errors import FrameDecodeError

    if len(data) > fr.MAX_FRAME_BYTES:
        raise FrameDecodeError("oversized", "too big")
    try:
        raw = fr._unpack(data)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise FrameDecodeError("malformed", f"not valid MessagePack: {e}") from e
    return fr.from_wire(raw)


def test_typed_decoder_agrees_with_the_reference() -> None:
    """decode() (the msgspec decoders of v1 and v2) gives what the plain reading gives: the same
    frame, or the same reason, field and message."""
    from shared import frames as fr

    corpus = [data for _, data in fuzzed_messages(300)]
    v1 = to_wire(fr.replace(sample("h", 3, 1.7e9), v=1))
    v2 = msgpack.unpackb(fr.encode(sample("h", 3, 1.7e9), static=False))
    for base in (v1, v2):
        corpus.append(msgpack.packb(base))
        for path, _ in list(_mutations(base)):
            for odd in [*ODD_VALUES, "__missing__"]:
                corpus.append(msgpack.packb(_mutated(base, path, odd)))
    accepted = 0
    for data in corpus:
        ref = _outcome(lambda data=data: _reference_decode(data))
        got = _outcome(lambda data=data: fr.decode(data))
        if ref[0] == "error" and ref[1] == "oversized":
            continue
        assert got == ref, data[:120]
        accepted += ref[0] == "ok"
    assert accepted > 100
    assert len(corpus) > 1500


# ----------------------------------------------------------------------------- with the simulated fleet


async def test_simulated_fleet_lands_once_with_its_values(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    from agent.fleet import Fleet
    from shared.config import NatsConfig
    from shared.frames import SampleFrame, decode

    cfg = config(pg_dsn, private_nats.url)
    seen: list[Frame] = []
    tap = await nats.connect(private_nats.url)

    async def on_msg(msg: Any) -> None:
        seen.append(decode(msg.data))

    await tap.subscribe("gpuwarden.v1.>", cb=on_msg)
    async with running(cfg) as ingest:
        fleet = Fleet(
            NatsConfig(servers=(private_nats.url,)),
            hosts=12,
            gpus=8,
            providers=2,
            interval=0.25,
            faults=("host-0002/gpu3:xid=79@0.3s",),
            seed=3,
            workers=16,
        )
        await fleet.start()
        await fleet.run(duration=1.5)
        await fleet.close()
        s = fleet.summary()
        total = s["samples"] + s["events"] + s["inventories"]
        await until(lambda: _stored(ingest, total))
        assert ingest.stats.rejected == Counter()
    await tap.close()
    assert await conn.fetchval("SELECT count(*) FROM host_samples") == s["samples"]
    assert await conn.fetchval("SELECT count(*) FROM gpu_samples") == 8 * s["samples"]
    assert await conn.fetchval("SELECT count(*) FROM events") == s["events"]
    assert await conn.fetchval("SELECT count(*) FROM inventory_reports") == s["inventories"]
    xid = await conn.fetch("SELECT e.xid, e.gpu_index FROM events e JOIN hosts h ON h.id = e.host_id")
    assert [(r["xid"], r["gpu_index"]) for r in xid] == [(79, 3)]
    rows = await conn.fetch(
        "SELECT h.name, s.ts, s.gpu_index, s.temp_c, s.power_w, s.mem_used_bytes, s.ecc_sbe_volatile"
        " FROM gpu_readings s JOIN hosts h ON h.id = s.host_id"
    )
    stored = sorted((r[0], round(r[1].timestamp(), 6), *tuple(r)[2:]) for r in rows)
    expected = sorted(
        (f.host, round(f.ts, 6), g.index, g.temp_c, g.power_w, g.mem_used_bytes, g.ecc_sbe_volatile)
        for f in seen
        if isinstance(f, SampleFrame)
        for g in f.gpus
    )
    assert stored == expected
