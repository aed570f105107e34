"""No frame can stop or blind the collector (issue 9): hostile nesting, phantom hosts, long
strings, poison messages, one bad GPU entry, failures while storing; against real NATS and
PostgreSQL, and against the collector as a process."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgpack
import nats
import pytest

from collector.config import DEFAULT_DURABLE
from collector.group.assign import bucket_of
from collector.group.consumers import consumer_name as bucket_consumer
from collector.group.stray import consumer_name as stray_consumer
from collector.ingest import Ingest, Limits, check, consumer_name
from collector.store.writer import Accepted, Rejection, Writer
from gpuwarden.servers import NatsServer, free_port
from shared.errors import FrameDecodeError
from shared.frames import (
    MAX_DEPTH,
    decode,
    decode_partial,
    encode,
    encode_v1,
    nesting_depth,
    replace,
    to_wire,
)
from shared.subjects import STREAM, sample_subject
from tests.support.ingest import _count, config, publish, running
from tests.support.records import sample
from tests.support.wait import until

ROOT = Path(__file__).resolve().parent.parent
LIMITS = Limits(max_bytes=1 << 20, oldest_ts=0.0, newest_ts=2e9)


def hostile(host: str = "h-1", provider: str = "prov-a", depth: int = 1000) -> bytes:
    """~1 KB: an unknown key placed first, holding ``depth`` nested one-element arrays, then a
    real sample frame's fields."""
    nested: Any = 0
    for _ in range(depth):
        nested = [nested]
    wire = {
        "zz_unknown": nested,
        **to_wire(sample(host, 1, time.time(), provider=provider, gpus=0, system=False)),
    }
    data: bytes = msgpack.packb(wire)
    return data


def with_fields(frame: Any, **over: Any) -> bytes:
    data: bytes = msgpack.packb({**to_wire(frame), **over})
    return data


# ----------------------------------------------------------------------------- pure


def test_nesting_is_bounded_before_decoding() -> None:
    data = hostile()
    assert len(data) < 2000
    assert nesting_depth(data) == MAX_DEPTH + 1  # the scan stops counting past the limit
    with pytest.raises(FrameDecodeError) as err:
        decode(data)
    assert err.value.reason == "too_deep"
    r = check(sample_subject("prov-a", "h-1"), data, LIMITS, 7)
    assert type(r) is Rejection
    assert (r.reason, r.stream_seq) == ("too_deep", 7)
    # real frames of every kind are well inside the bound; a frame nested within it decodes
    assert nesting_depth(encode_v1(sample("h-1", 1, 1.7e9))) == 5
    assert nesting_depth(encode(sample("h-1", 1, 1.7e9))) <= 5  # v2: tables
    assert decode(hostile(depth=MAX_DEPTH - 2)).host == "h-1"


def test_check_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes, max_bytes: int) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("collector.ingest.decode_partial", broken)
    r = check(sample_subject("prov-a", "h-1"), encode(sample("h-1", 1, 1.7e9)), LIMITS, 3)
    assert type(r) is Rejection
    assert r.reason == "internal_error"
    assert "RecursionError" in r.message


@pytest.mark.parametrize("body_host", [" h1", "h1 ", "h1\u3000\t", "h1\n", "\th1"])
def test_phantom_host_spellings_are_rejected_by_name(body_host: str) -> None:
    subject = sample_subject("prov-a", "h1")
    assert type(check(subject, encode(sample("h1", 1, 1.7e9)), LIMITS)) is Accepted
    r = check(subject, with_fields(sample("h1", 1, 1.7e9), host=body_host), LIMITS)
    assert type(r) is Rejection
    assert (r.reason, r.field) == ("not_canonical", "host")
    r = check(subject, with_fields(sample("h1", 1, 1.7e9), provider=" prov-a"), LIMITS)
    assert (r.reason, r.field) == ("not_canonical", "provider")  # type: ignore[union-attr]
    r = check(subject, with_fields(sample("h1", 1, 1.7e9), host="h2"), LIMITS)
    assert (r.reason, r.field) == ("spoofed", "host")  # type: ignore[union-attr]
    # a subject whose token is not canonical names no host at all
    long_token = "h" * 200
    r = check(f"gpuwarden.v1.sample.prov-a.{long_token}", encode(sample(long_token, 1, 1.7e9)), LIMITS)
    assert (r.reason, r.field) == ("bad_subject", "host")  # type: ignore[union-attr]


def test_the_agent_sends_its_names_in_canonical_form() -> None:
    from agent.sampler import Sequencer

    seqr = Sequencer(host=" gpu node.1\u3000", provider="acme east")
    assert (seqr.host, seqr.provider) == ("gpu_node_1", "acme_east")
    assert seqr.subject("sample") == "gpuwarden.v1.sample.acme_east.gpu_node_1"


@pytest.mark.parametrize(
    ("over", "fld"),
    [
        ({"boot_id": "b" * 4000}, "boot_id"),
        ({"host": "h" * 129}, "host"),
        ({"provider": "p" * 129}, "provider"),
    ],
)
def test_long_strings_are_rejected_with_a_named_reason(over: dict[str, Any], fld: str) -> None:
    r = check(sample_subject("prov-a", "h-1"), with_fields(sample("h-1", 1, 1.7e9), **over), LIMITS)
    assert type(r) is Rejection
    assert (r.reason, r.field) == ("too_long", fld)


def test_one_bad_gpu_value_drops_that_gpu_entry_only() -> None:
    f = sample("h-1", 1, 1.7e9, gpus=4)
    wire = to_wire(f)
    wire["gpus"][1]["temp_c"] = math.nan
    wire["gpus"][3]["uuid"] = "u" * 500
    data = msgpack.packb(wire)
    frame, dropped = decode_partial(data)
    assert [g.index for g in frame.gpus] == [0, 2]  # type: ignore[union-attr]
    assert [(e.reason, e.field) for e in dropped] == [
        ("out_of_range", "gpus[1].temp_c"),
        ("too_long", "gpus[3].uuid"),
    ]
    r = check(sample_subject("prov-a", "h-1"), data, LIMITS)
    assert type(r) is Accepted
    assert r.dropped_gpus == (("out_of_range", "gpus[1].temp_c"), ("too_long", "gpus[3].uuid"))
    # an error outside the GPU entries still rejects the frame
    wire["ts"] = math.nan
    r2 = check(sample_subject("prov-a", "h-1"), msgpack.packb(wire), LIMITS)
    assert (r2.reason, r2.field) == ("out_of_range", "ts")  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- the collector as a process


async def _metrics(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


async def _reasons(conn: asyncpg.Connection) -> Counter[str]:
    rows = await conn.fetch("SELECT reason, count(*) AS n FROM rejected_frames GROUP BY reason")
    return Counter({r["reason"]: r["n"] for r in rows})


async def test_hostile_frames_against_the_running_collector(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    """The collector process stays up, records each hostile frame by reason and ingests on. It
    runs as a group member (a group of one), reading rc-1's bucket through its consumer."""
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpuwarden-hardening-{os.getpid()}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUWARDEN_COLLECTOR_ACK_WAIT": "2s"}
    args = ["run", "--nats", private_nats.url, "--dsn", pg_dsn, "--listen", f"127.0.0.1:{port}", "--group"]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collector.cli",
            *args,
            "--log-level",
            "WARNING",
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    nc = await nats.connect(private_nats.url)
    try:
        js = nc.jetstream()
        await until(lambda: _consumer_exists(js), timeout=60)
        now = time.time()
        await publish(js, [sample("rc-1", s, now - 30 + s, gpus=2) for s in range(1, 4)])
        subject = sample_subject("prov-a", "rc-1")
        bad_gpu = to_wire(sample("rc-1", 10, now - 5, gpus=2))
        bad_gpu["gpus"][1]["temp_c"] = math.nan
        for data in (
            hostile("rc-1"),
            hostile("rc-1"),
            with_fields(sample("rc-1", 4, now - 20, gpus=2), host=" rc-1"),
            with_fields(sample("rc-1", 5, now - 20, gpus=2), host="rc-1\u3000\t"),
            with_fields(sample("rc-1", 6, now - 20, gpus=2), boot_id="b" * 4000),
            msgpack.packb(bad_gpu),
        ):
            await js.publish(subject, data)
        await publish(js, [sample("rc-1", s, now - 10 + s * 0.1, gpus=2) for s in range(20, 30)])
        await until(lambda: _count(conn, "host_samples", 14), timeout=60)
        await until(lambda: _count(conn, "rejected_frames", 5), timeout=60)
        assert proc.returncode is None, log.read_text()
        assert await _reasons(conn) == Counter({"too_deep": 2, "not_canonical": 2, "too_long": 1})
        hosts = await conn.fetch("SELECT name FROM hosts")
        assert [r["name"] for r in hosts] == ["rc-1"]  # no phantom host
        gpus = await conn.fetchval(
            "SELECT count(*) FROM gpu_samples s JOIN host_samples h USING (host_id, ts) WHERE h.seq = 10"
        )
        assert gpus == 1  # the frame with one bad GPU entry is stored without that entry
        text = await _metrics(port)
        assert 'gpuwarden_collector_frames_rejected_total{reason="too_deep"} 2.0' in text
        assert 'gpuwarden_collector_frames_rejected_total{reason="not_canonical"} 2.0' in text
        assert 'gpuwarden_collector_frames_rejected_total{reason="too_long"} 1.0' in text
        assert 'gpuwarden_collector_gpu_entries_rejected_total{reason="out_of_range"} 1.0' in text
        assert "gpuwarden_collector_frames_stored_total 14.0" in text
        # every message acknowledged: nothing comes back (a member acknowledges after judging,
        # which may end after the counts above are out)
        await until(lambda: _all_acked(js, RC1_CONSUMER), timeout=60)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await nc.close()
    assert proc.returncode == 0, log.read_text()


# the consumer of rc-1's bucket (created once the member holds it, after the stream's transform)
RC1_CONSUMER = bucket_consumer(DEFAULT_DURABLE, bucket_of("rc-1", 64))


async def _consumer_exists(js: Any) -> bool:
    try:
        await js.consumer_info(STREAM, RC1_CONSUMER)
    except nats.js.errors.NotFoundError:
        return False
    return True


# ----------------------------------------------------------------------------- a bucket token not the host's


def test_a_bucket_token_that_is_not_the_hosts_bucket_is_rejected() -> None:
    grouped = Limits(max_bytes=1 << 20, oldest_ts=0.0, newest_ts=2e9, buckets=64)
    data = encode(sample("h-1", 1, 1.7e9))
    mine = bucket_of("h-1", 64)
    subject = f"{sample_subject('prov-a', 'h-1')}.{mine}"
    assert type(check(subject, data, grouped)) is Accepted
    for token in ((mine + 1) % 64, f"0{mine}"):  # another bucket; the same number spelled otherwise
        r = check(f"{sample_subject('prov-a', 'h-1')}.{token}", data, grouped, 5)
        assert type(r) is Rejection
        assert (r.reason, r.field, r.stream_seq) == ("bad_subject", "bucket", 5)
        assert f": {mine} of 64" in r.message
    # a collector alone (no buckets) reads any stored form of a frame's subject
    assert type(check(f"{sample_subject('prov-a', 'h-1')}.{(mine + 1) % 64}", data, LIMITS)) is Accepted


async def test_a_group_member_rejects_frames_of_another_bucket_and_subjects_of_no_bucket(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    """A six-token subject published directly (not stored under its bucket by the stream's
    transform) reaches the holder of the bucket it names; when that is not its host's bucket the
    holder rejects it (counted, logged, recorded) instead of storing and judging another
    member's host, and acknowledges it. Subjects of four or seven tokens (no bucket consumer's)
    are read through the group's stray consumer and rejected the same way."""
    from collector.service import CollectorService

    cfg = config(pg_dsn, private_nats.url)  # a group of one (the default)
    svc = CollectorService(cfg)
    task = asyncio.create_task(svc.serve())
    await asyncio.wait_for(svc.started.wait(), 60)
    nc = await nats.connect(private_nats.url)
    now = time.time()
    right = bucket_of("mb-1", 64)
    wrong = (right + 1) % 64
    try:
        js = nc.jetstream()
        assert svc.ingest.source is not None  # a group member
        # newer and of a higher sequence than the host's own frame: judged, it would be current
        await js.publish(
            f"{sample_subject('prov-a', 'mb-1')}.{wrong}", encode(sample("mb-1", 9, now - 1, gpus=1))
        )
        await publish(js, [sample("mb-1", 2, now - 5, gpus=1)])  # stored under bucket `right`
        await until(lambda: _count(conn, "rejected_frames", 1), timeout=60)
        await until(lambda: _count(conn, "host_samples", 1), timeout=60)
        row = await conn.fetchrow("SELECT reason, field, subject FROM rejected_frames")
        assert (row["reason"], row["field"], row["subject"]) == (
            "bad_subject",
            "bucket",
            f"{sample_subject('prov-a', 'mb-1')}.{wrong}",
        )
        assert svc.ingest.stats.rejected == Counter({"bad_subject": 1})
        seqs = await conn.fetch("SELECT s.seq FROM host_samples s JOIN hosts h ON h.id = s.host_id")
        assert [r["seq"] for r in seqs] == [2]
        await until(lambda: _current_seq(svc, "mb-1", 2), timeout=60)
        assert svc.state.host("mb-1").sample.seq == 2  # type: ignore[union-attr]  # seq 9 never judged
        await until(lambda: _all_acked(js, bucket_consumer(DEFAULT_DURABLE, wrong)), timeout=60)
        # subjects of no bucket, four tokens or seven: read by the stray consumer, rejected too
        data = encode(sample("mb-1", 10, now - 1, gpus=1))
        strays = ["gpuwarden.v1.sample.prov-a", f"{sample_subject('prov-a', 'mb-1')}.{right}.x"]
        for subject in strays:
            await js.publish(subject, data)
        await until(lambda: _count(conn, "rejected_frames", 3), timeout=60)
        rows = await conn.fetch("SELECT reason, subject FROM rejected_frames WHERE field IS NULL")
        assert sorted((r["reason"], r["subject"]) for r in rows) == [
            ("bad_subject", s) for s in sorted(strays)
        ]
        assert svc.ingest.stats.rejected == Counter({"bad_subject": 3})
        await until(lambda: _all_acked(js, stray_consumer(DEFAULT_DURABLE)), timeout=60)
        assert [r["seq"] for r in await conn.fetch("SELECT seq FROM host_samples")] == [2]
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)
        await nc.close()


async def _current_seq(svc: Any, host: str, seq: int) -> bool:
    h = svc.state.host(host)
    return h is not None and h.sample is not None and h.sample.seq == seq


async def _all_acked(js: Any, consumer: str) -> bool:
    info = await js.consumer_info(STREAM, consumer)
    return bool(info.num_ack_pending == 0 and info.num_pending == 0)


# ----------------------------------------------------------------------------- poison and failures


async def test_a_message_delivered_max_deliver_times_is_terminated_as_poison(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    cfg = config(pg_dsn, private_nats.url, **{"collector.max_deliver": 3})
    nc = await nats.connect(private_nats.url)
    js = nc.jetstream()
    setup = Ingest(cfg, Writer(cfg.postgres))
    await setup.setup(nc)  # creates the stream and the durable consumer
    await setup.close()
    info = await js.consumer_info(STREAM, consumer_name(cfg))
    assert info.config.max_deliver == 3
    now = time.time()
    await publish(js, [sample("poison-1", 1, now - 5, gpus=1)])
    # two deliveries that never got stored (as if two collectors died on it)
    sub = await js.pull_subscribe_bind(durable=consumer_name(cfg), stream=STREAM)
    for n in (1, 2):
        [m] = await sub.fetch(1, timeout=10)
        assert m.metadata.num_delivered == n
        await m.nak()
    await sub.unsubscribe()
    async with running(cfg) as ingest:
        await publish(js, [sample("good-1", s, now - 5 + s * 0.1, gpus=1) for s in range(1, 6)])
        await until(lambda: _count(conn, "host_samples", 5))
        await until(lambda: _count(conn, "rejected_frames", 1))
        assert ingest.stats.rejected == Counter({"poison": 1})
        assert ingest.stats.redelivered == 1  # its third delivery
    row = await conn.fetchrow("SELECT reason, subject, stream_seq FROM rejected_frames")
    assert (row["reason"], row["subject"], row["stream_seq"]) == (
        "poison",
        sample_subject("prov-a", "poison-1"),
        1,
    )
    info = await js.consumer_info(STREAM, consumer_name(cfg))
    assert (info.num_ack_pending, info.num_pending) == (0, 0)  # terminated: never delivered again
    await nc.close()


async def test_an_exception_storing_one_frame_rejects_that_frame(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import collector.store.writer as writer_mod

    real = writer_mod.host_row

    def host_row(f: Any, *args: Any) -> Any:
        if f.host == "boom":
            raise RuntimeError("a bug building this frame's row")
        return real(f, *args)

    monkeypatch.setattr(writer_mod, "host_row", host_row)
    cfg = config(pg_dsn, private_nats.url)
    now = time.time()
    seen: list[Any] = []

    async def bad_hook(frames: Any) -> None:
        seen.extend(frames)
        raise ValueError("a hook's bug")

    async with running(cfg) as ingest:
        ingest.on_batch = bad_hook
        nc = await nats.connect(private_nats.url)
        js = nc.jetstream()
        frames = [sample(h, s, now - 5 + s * 0.1, gpus=1) for s in range(1, 4) for h in ("boom", "fine")]
        await publish(js, frames)
        await until(lambda: _count(conn, "host_samples", 3))
        await until(lambda: _count(conn, "rejected_frames", 3))
        await publish(js, [sample("fine", s, now - 1 + s * 0.01, gpus=1) for s in range(10, 15)])
        await until(lambda: _count(conn, "host_samples", 8))
        await nc.close()
        assert ingest.stats.rejected == Counter({"store_error": 3})
        assert ingest.stats.hook_errors >= 1
        assert len(seen) == 8
    assert await _reasons(conn) == Counter({"store_error": 3})


# ----------------------------------------------------------------------------- the inventory source


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'[{"host": "caf\xe9", "gpus": 8}]', "not UTF-8 (byte 0xe9 at offset 14)"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested deeper than 32"),
        (
            b'[{"host": "a", "gpus": 8}, ' + b'{"x": ' * 40 + b"1" + b"}" * 40 + b"]",
            "JSON nested deeper than 32",
        ),
    ],
)
async def test_an_unusable_inventory_source_is_a_clear_error_at_start(
    tmp_path: Path, content: bytes, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    from collector.inventory import ExpectedInventory

    path = tmp_path / "hosts.json"
    path.write_bytes(content)
    inv = ExpectedInventory(str(path), refresh=60)
    await inv.reload()  # raised UnicodeDecodeError / RecursionError (a traceback) before
    assert not inv.loaded
    assert inv.last_error is not None
    assert says in inv.last_error
    assert [r.levelname for r in caplog.records if says in r.getMessage()] == ["ERROR"]


def test_inventory_names_take_their_canonical_form() -> None:
    from collector.inventory import ExpectedHost, parse_document

    got = parse_document(b'[{"host": " gpu-1.example.com", "provider": "acme east", "gpus": 8}]')
    assert got == [ExpectedHost("gpu-1_example_com", "acme_east", 8)]


# ----------------------------------------------------------------------------- clocks ahead


def test_a_frame_dated_days_ahead_does_not_freeze_the_live_readings() -> None:
    from collector.state import FleetState

    now = 1.8e9
    s = FleetState(max_skew=30.0)
    s.apply([sample("a", 1, now - 10, gpus=1)], now)
    s.apply([sample("a", 2, now + 3 * 86400, gpus=1)], now)  # a clock three days ahead
    h = s.host("a")
    assert h is not None
    assert h.sample is not None
    assert h.sample.seq == 1
    assert h.ahead_frames == 1
    s.apply([sample("a", 3, now - 5, gpus=1)], now)
    assert h.sample.seq == 3  # the newest frame within the allowance is current
    assert h.last_seen == now - 5
    s.apply([sample("a", 4, now + 20, gpus=1)], now)  # within the allowance: current
    assert h.sample.seq == 4


def test_clock_skew_is_a_host_check() -> None:
    from collector.health import HealthEngine, HealthState, health_config_from

    engine = HealthEngine(health_config_from({"health": {"max_clock_skew": "1m"}}))
    state = HealthState()
    now = 1.8e9
    _, obs = engine.observe(state, sample("a", 1, now, gpus=1), now)
    assert not [o for o in obs if o.check == "host.clock_skew"]
    _, obs = engine.observe(state, sample("a", 2, now + 3600, gpus=1), now + 1)
    (o,) = [o for o in obs if o.check == "host.clock_skew"]
    assert (o.status, o.value, o.labels) == ("warning", 3599.0, {"provider": "prov-a", "host": "a"})
    assert "ahead" in o.summary
    assert "time sync" in o.advice
    _, obs = engine.observe(state, sample("a", 3, now + 2, gpus=1), now + 2)
    (o,) = [o for o in obs if o.check == "host.clock_skew"]
    assert o.status == "healthy"


async def test_the_running_collector_keeps_current_readings_of_a_host_dated_ahead(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    from collector.service import CollectorService

    cfg = config(pg_dsn, private_nats.url)
    svc = CollectorService(cfg)
    task = asyncio.create_task(svc.serve())
    await asyncio.wait_for(svc.started.wait(), 30)
    nc = await nats.connect(private_nats.url)
    now = time.time()
    try:
        js = nc.jetstream()
        await publish(js, [sample("sk-1", 1, now - 2, gpus=1), sample("sk-1", 2, now + 2 * 86400, gpus=1)])
        await until(lambda: _count(conn, "host_samples", 2))
        await until(lambda: _check_is(svc, "sk-1", "warning"))
        await publish(js, [sample("sk-1", 3, time.time(), gpus=1)])
        await until(lambda: _count(conn, "host_samples", 3))
        await until(lambda: _check_is(svc, "sk-1", "healthy"))
        h = svc.state.host("sk-1")
        assert h is not None
        assert h.sample is not None
        assert h.sample.seq == 3  # not the frame dated two days ahead, stored all the same
    finally:
        svc.request_stop()
        await asyncio.wait_for(task, 30)
        await nc.close()
    again = CollectorService(cfg)  # rebuilt from PostgreSQL: the same current readings
    task = asyncio.create_task(again.serve())
    await asyncio.wait_for(again.started.wait(), 30)
    try:
        h = again.state.host("sk-1")
        assert h is not None
        assert h.sample is not None
        assert h.sample.seq == 3
        assert h.last_seen < time.time() + 60
    finally:
        again.request_stop()
        await asyncio.wait_for(task, 30)


async def _check_is(svc: Any, host: str, status: str) -> bool:
    hs = svc.alerting.health.hosts.get(host)
    cs = hs.checks.get("host.clock_skew") if hs is not None else None
    return cs is not None and cs.status == status


# ----------------------------------------------------------------------------- events judged once


def test_an_event_is_judged_once_when_the_agent_restarts_during_a_backlog() -> None:
    """The fast event path judges events as they are published; the ingest hands the same
    events over after storing them, late when it drains a backlog. The agent restarting in
    between (a new boot id) must not make either path judge an event twice."""

    from collector.health import HealthEngine, HealthState
    from collector.health.codec import health_snapshot, state_from_dict
    from tests.support.records import event

    engine = HealthEngine()
    state = HealthState()
    now = time.time()
    run_a = [sample("r-1", 1, now - 9, gpus=4), event("r-1", 2, now - 8), event("r-1", 3, now - 7)]
    run_b = [
        replace(f, boot_id="boot-2") for f in (sample("r-1", 1, now - 3, gpus=4), event("r-1", 2, now - 2))
    ]
    xids: list[Any] = []

    def judge(frames: list[Any], at: float) -> None:
        for f in frames:
            _, obs = engine.observe(state, f, at)
            xids.extend(o for o in obs if o.check == "gpu.xid" and o.status != "healthy")

    judge([f for f in run_a if f.kind == "event"], now - 7)  # the fast path, live
    judge(run_a[:1], now - 6)  # the ingest, lagging: run A's first sample
    judge([f for f in run_b if f.kind == "event"], now - 2)  # the fast path: run B's event, live
    judge(run_a[1:], now - 1)  # the ingest drains run A's events (already judged)
    judge(run_b, now)  # then run B's frames (its event already judged)
    assert len(xids) == 3  # one per event: A:2, A:3, B:2
    gs = state.hosts["r-1"].gpus[2]
    assert sum(r.count for r in gs.xids.values()) == 3
    # what is remembered survives a collector restart (the saved health snapshot)
    restored = state_from_dict(health_snapshot(state, engine.healthy_for))
    before = len(xids)
    state = restored
    judge(run_a + run_b, now + 1)
    assert len(xids) == before


async def test_frames_dated_ahead_never_push_the_stored_host_into_the_future(
    pg_dsn: str, conn: asyncpg.Connection
) -> None:
    """The stored side of the same property: hosts.last_seen and a host's current inventory
    (driver, facts, GPUs) follow the newest frame within the allowance, not one dated ahead."""
    from tests.support.records import inventory, make_config

    writer = Writer(make_config(pg_dsn).postgres, max_skew=30.0)
    now = time.time()

    def inv(seq: int, ts: float, driver: str) -> Accepted:
        return Accepted(replace(inventory("fut-1", seq, ts, gpus=2), driver_version=driver))

    try:
        await writer.write([inv(1, now - 60, "570.1")])
        await writer.write([inv(2, now + 2 * 86400, "999.9")])  # a clock two days ahead
        await writer.write([Accepted(sample("fut-1", 3, now + 2 * 86400, gpus=2))])
        row = await conn.fetchrow("SELECT driver_version, last_seen FROM hosts WHERE name = 'fut-1'")
        assert row["driver_version"] == "570.1"
        assert row["last_seen"].timestamp() < now + 60
        await writer.write([inv(4, now - 1, "580.2")])
        row = await conn.fetchrow("SELECT driver_version, last_seen FROM hosts WHERE name = 'fut-1'")
        assert row["driver_version"] == "580.2"  # not frozen behind the frame dated ahead
        assert await conn.fetchval("SELECT count(*) FROM inventory_reports") == 3  # all stored
        assert await conn.fetchval("SELECT count(*) FROM host_samples") == 1
        assert await conn.fetchval("SELECT max(last_seen) FROM gpus") < datetime.fromtimestamp(now + 60, UTC)
    finally:
        await writer.close()


def test_every_string_field_has_a_documented_length_limit() -> None:
    """Item 8 as a rule: a new string field without its own limit (and its line in
    docs/protocol.md) fails here, before a long value can reach an index."""
    import typing

    from shared import frames

    doc = (ROOT / "docs" / "protocol.md").read_text()
    for cls in frames._RECORDS:
        hints = typing.get_type_hints(cls)
        for f in frames.fields(cls):
            if f.name == "kind" or "str" not in str(hints[f.name]):
                continue
            limit = f.metadata.get("max_len")
            assert limit is not None, f"{cls.__name__}.{f.name} has no max_len"
            section = doc.split(f"\n### {cls.__name__}\n", 1)[-1].split("\n### ", 1)[0]
            if f.name in ("host", "provider", "boot_id"):
                section = doc
            assert f"| `{f.name}` | " in section
            row = section.split(f"| `{f.name}` | ", 1)[1].split("\n", 1)[0]
            assert f"≤ {limit} chars" in row, (cls.__name__, f.name, row)


async def test_a_consumer_made_by_an_older_collector_takes_max_deliver(private_nats: NatsServer) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from collector import stream

    cfg = config("postgresql://unused@127.0.0.1/unused", private_nats.url, **{"collector.max_deliver": 7})
    nc = await nats.connect(private_nats.url)
    try:
        js = nc.jetstream()
        await stream.reconcile(js, cfg.nats)  # the stream as a collector makes it
        old = ConsumerConfig(
            durable_name=consumer_name(cfg),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=60,
            max_ack_pending=20_000,
            max_waiting=16,
        )
        await js.add_consumer(STREAM, old)
        assert (await js.consumer_info(STREAM, consumer_name(cfg))).config.max_deliver == -1
        ingest = Ingest(cfg, Writer(cfg.postgres))
        await ingest.setup(nc)
        await ingest.close()
        assert (await js.consumer_info(STREAM, consumer_name(cfg))).config.max_deliver == 7
    finally:
        await nc.close()
