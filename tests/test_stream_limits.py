"""The GPUWARDEN stream's size: the default from the documented formula, settings reconciled at
the collector's start against a real nats-server, and what the stream discards counted."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import nats
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from collector.stream import StreamGaps, reconcile, settle, wanted
from gpuwarden.servers import NatsServer
from shared.config import NatsConfig
from shared.frames import Frame
from shared.natsconf import STORE_CAP_BYTES, stream_drift, stream_max_bytes, stream_settings
from shared.subjects import STREAM, STREAM_SUBJECTS
from tests.support.ingest import config, publish, running
from tests.support.records import sample
from tests.support.wait import until

DAY = 86400.0


def test_default_size_is_the_documented_formula() -> None:
    # min(stream_hosts x 10 KiB x stream_max_age / 5 s, 80 GiB), at least 64 MiB
    assert stream_max_bytes(NatsConfig()) == STORE_CAP_BYTES == 80 << 30  # 100 hosts, 7 d: capped
    assert stream_max_bytes(NatsConfig(stream_hosts=10)) == int(10 * 10240 * 7 * DAY / 5)
    assert stream_max_bytes(NatsConfig(stream_hosts=1, stream_max_age=600.0)) == 64 << 20
    assert stream_max_bytes(NatsConfig(stream_max_bytes=12345)) == 12345
    assert stream_max_bytes(NatsConfig(stream_max_bytes=-1)) == -1  # an explicit "no limit"
    s = stream_settings(NatsConfig())
    assert (s["max_bytes"], s["discard"], s["allow_rollup_hdrs"]) == (80 << 30, "old", False)


def test_drift_names_each_setting_and_the_command_for_it() -> None:
    want = wanted(NatsConfig(stream_hosts=10))
    have = {
        "subjects": ["gpuwarden.v1.sample.>", "extra.>"],
        "max_age": 7 * DAY,
        "duplicate_window": 120.0,
        "max_bytes": -1,
        "discard": DiscardPolicy.NEW,
        "allow_rollup_hdrs": True,
        "num_replicas": 1,
        "storage": StorageType.MEMORY,
        "retention": "limits",
    }
    drift = {d.field: d for d in stream_drift(have, want)}
    assert set(drift) == {"subjects", "max_bytes", "discard", "allow_rollup_hdrs", "storage"}
    assert drift["subjects"].want == ["gpuwarden.v1.sample.>", "extra.>", *STREAM_SUBJECTS[1:]]
    assert drift["max_bytes"].command == f"nats stream edit {STREAM} --max-bytes {want['max_bytes']} -f"
    assert drift["discard"].command == f"nats stream edit {STREAM} --discard old -f"
    assert drift["allow_rollup_hdrs"].command.endswith("--no-allow-rollup -f")
    assert not drift["storage"].updatable
    assert drift["storage"].command.startswith(f"nats stream rm {STREAM}")
    assert all(d.updatable for k, d in drift.items() if k != "storage")
    assert stream_drift({**want}, want) == []


def test_gaps_count_skipped_sequences_not_redeliveries() -> None:
    gaps = StreamGaps(last=4)
    assert [gaps.see(s) for s in (5, 6, 9, 7, None, 10, 15)] == [0, 0, 2, 0, 0, 0, 4]
    assert (gaps.lost, gaps.events, gaps.last) == (6, 2, 15)


async def test_collector_reconciles_an_old_stream_at_start(
    private_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream made by an older collector (no size limit, rollups on, memory storage): the
    collector updates what NATS can update and names the command for what it cannot."""
    nc = await nats.connect(private_nats.url)
    js = nc.jetstream(timeout=5)
    try:
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=["gpuwarden.v1.sample.>"],
                storage=StorageType.MEMORY,
                max_bytes=-1,
                duplicate_window=120.0,
                discard=DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
            )
        )
        cfg = NatsConfig(servers=(private_nats.url,), stream_max_bytes=50 << 20)
        with caplog.at_level(logging.INFO, logger="collector.stream"):
            report = await reconcile(js, cfg)
        have = (await js.stream_info(STREAM)).config
        assert have.max_bytes == 50 << 20
        assert have.discard == DiscardPolicy.OLD
        assert have.allow_rollup_hdrs is False
        assert sorted(have.subjects or []) == sorted(STREAM_SUBJECTS)
        assert have.duplicate_window == pytest.approx(cfg.dedup_window)
        assert have.storage == StorageType.MEMORY  # NATS cannot change it in place ...
        assert report.max_bytes == 50 << 20
        assert [d.field for d in report.left] == ["storage"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("storage" in w and f"nats stream rm {STREAM} -f" in w for w in warnings), warnings
        # ... and a second start finds nothing more to update
        caplog.clear()
        again = await reconcile(js, cfg)
        assert again.updated == []
        assert [d.field for d in again.left] == ["storage"]
    finally:
        await nc.close()


async def test_collector_without_stream_rights_warns_with_the_command(
    private_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(private_nats.url)
    js = nc.jetstream(timeout=5)
    try:
        await js.add_stream(StreamConfig(name=STREAM, subjects=list(STREAM_SUBJECTS), max_bytes=-1))
        cfg = NatsConfig(servers=(private_nats.url,), create_stream=False, stream_max_bytes=50 << 20)
        with caplog.at_level(logging.WARNING, logger="collector.stream"):
            report = await reconcile(js, cfg)
        assert (await js.stream_info(STREAM)).config.max_bytes == -1  # left alone
        assert report.max_bytes == -1
        text = caplog.text
        assert f"nats stream edit {STREAM} --max-bytes {50 << 20} -f" in text
        assert "no size limit" in text
    finally:
        await nc.close()


async def test_frames_the_full_stream_discards_are_counted(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    """A small stream, the collector stopped while the fleet publishes more than it holds: the
    stream drops its oldest frames (discard old, publishing never fails), and the collector,
    back, counts exactly the frames it never got."""
    cfg = config(pg_dsn, private_nats.url, **{"nats.stream_max_bytes": 64 * 1024})
    now = time.time()
    first: list[Frame] = [sample("lossy", s, now - 300 + s) for s in range(1, 6)]
    async with running(cfg) as ingest:
        nc = await nats.connect(private_nats.url)
        await publish(nc.jetstream(), first)
        await until(lambda: _count(conn, 5))
        await nc.close()
        assert ingest.stats.stream_lost == 0
        assert ingest.stats.stream_max_bytes == 64 * 1024
    nc = await nats.connect(private_nats.url)
    js = nc.jetstream()
    more: list[Frame] = [sample("lossy", s, now - 200 + s / 10) for s in range(6, 606)]
    await publish(js, more)  # every publish is acknowledged: the stream drops old frames instead
    state = (await js.stream_info(STREAM)).state
    await nc.close()
    assert state.first_seq > 6  # frames the collector never fetched are gone
    dropped = state.first_seq - 6
    async with running(cfg) as ingest:
        await until(lambda: _count(conn, 5 + state.messages))
        assert ingest.stats.stream_lost == dropped
        assert ingest.gaps.events == 1


async def _count(conn: asyncpg.Connection, n: int) -> bool:
    got = await conn.fetchval(
        "SELECT count(*) FROM host_samples s JOIN hosts h ON h.id = s.host_id WHERE h.name = 'lossy'"
    )
    return bool(got == n)


async def test_default_size_shrinks_to_what_a_small_server_holds(caplog: pytest.LogCaptureFixture) -> None:
    """80 GiB on a server whose JetStream store is 1 GiB: refused ("insufficient storage"), so
    the size is halved until the server takes it, and the collector says which size it used."""
    with NatsServer(config="jetstream { max_file_store: 1GB }") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream(timeout=5)
        try:
            with caplog.at_level(logging.INFO):
                report = await reconcile(js, NatsConfig(servers=(server.url,)))
            got = (await js.stream_info(STREAM)).config.max_bytes
        finally:
            await nc.close()
    assert report.created
    assert got == report.max_bytes
    assert 64 << 20 <= got <= 1 << 30
    assert "cannot hold max_bytes" in caplog.text


async def test_stream_setup_is_retried_while_the_stream_is_not_found_yet(
    private_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A collector's stream set-up step that NATS answers "stream not found" (a stream another
    collector is creating, on a cluster) is tried again until it succeeds; another refusal is
    not retried."""
    nc = await nats.connect(private_nats.url)
    js = nc.jetstream(timeout=5)
    tries = 0
    not_found = 0

    async def step() -> None:
        nonlocal tries, not_found
        tries += 1
        try:
            await js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            not_found += 1
            raise

    async def another_collector() -> None:
        # The stream appears only once an attempt has been answered "not found": NATS may
        # handle a request sent before another out of order, so waiting for a first attempt
        # to be sent is not enough.
        await until(lambda: not_found >= 1, timeout=60, what="a first attempt refused")
        await js.add_stream(StreamConfig(name=STREAM, subjects=list(STREAM_SUBJECTS)))

    try:
        with caplog.at_level(logging.WARNING, logger="collector.stream"):
            creating = asyncio.create_task(another_collector())
            await settle(step)
            await creating
        assert tries >= 2
        assert not_found >= 1
        assert "stream setup failed, retrying: NotFoundError" in caplog.text

        refusals = 0

        async def refused() -> None:
            nonlocal refusals
            refusals += 1
            await js.add_stream(StreamConfig(name=STREAM, subjects=["other.>"]))  # name in use

        with pytest.raises(nats.js.errors.BadRequestError):
            await settle(refused)
        assert refusals == 1
    finally:
        await nc.close()
