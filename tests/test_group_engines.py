"""A collector group of three on the engines underneath failing (issue 13): the NATS node that
leads the stream is SIGKILLed, and PostgreSQL's primary crashes and its standby is promoted,
while a simulated fleet publishes and faults arrive on every member's hosts. Every fault is
paged once (by delivery id), every frame stored once. The members are ``gpuwarden collector
run`` processes (tests/support/group.py); docs/operations.md says what each failure costs."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import nats.errors
import pytest

from agent.fleet import Fleet, host_name
from gpuwarden.servers import NatsCluster, NatsServer, PostgresServer, multi_host_dsn
from shared.config import NatsConfig
from shared.subjects import STREAM
from tests.support.cluster import cluster_nats, publish_xid, published_keys, stored_at_least, stored_keys
from tests.support.collector import Receiver
from tests.support.group import deliveries, hosts_of, none_pending, three_members, xid_keys, xids
from tests.support.wait import until

HOSTS = 200


async def stream_leader(urls: list[str]) -> str | None:
    """The server name of the node leading the ``GPUWARDEN`` stream (None while electing)."""
    nc = await nats.connect(servers=urls, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    try:
        info = await nc.jetstream(timeout=5).stream_info(STREAM)
        return info.cluster.leader if info.cluster else None
    except nats.errors.Error:
        return None
    finally:
        await nc.close()


@pytest.mark.timeout(500)
async def test_a_group_loses_no_frame_and_no_page_when_the_streams_leader_dies(
    tmp_path: Path, pg_dsn: str, nats_cluster: NatsCluster
) -> None:
    """Three members on a three-node cluster (stream replicas 3); XIDs on every member's hosts
    from 4 s to 40 s; once the first is paged, the node leading the stream is SIGKILLed. The
    members' lease renewals may fail meanwhile (their KV bucket is on the same cluster): they
    lose and retake buckets, which must not lose or double a page."""
    urls = nats_cluster.urls
    async with Receiver() as rx, three_members(tmp_path, pg_dsn, urls, rx.url) as (_, table):
        faulted = [i for m in ("m0", "m1", "m2") for i in hosts_of(table, m, HOSTS)[:7]]
        times = {i: 4 + 36 * k / (len(faulted) - 1) for k, i in enumerate(sorted(faulted))}
        faults = [f"{host_name(i)}/gpu0:xid=79@{t:.1f}s" for i, t in times.items()]
        fleet = Fleet(cluster_nats(urls), hosts=HOSTS, gpus=1, interval=1.0, faults=faults, workers=64)
        await fleet.start()
        run = asyncio.create_task(fleet.run(duration=50))
        try:
            await until(lambda: len(xids(rx)) >= 1, timeout=60, what="a first XID paged")
            victim = None

            async def led() -> bool:
                nonlocal victim
                victim = await stream_leader(urls)
                return victim is not None

            await until(led, timeout=60)
            assert victim is not None
            nats_cluster.node(victim).kill()
            killed = time.monotonic()

            async def elected() -> bool:
                return (await stream_leader(urls)) not in (None, victim)

            await until(elected, timeout=60, what="a new stream leader")
            elected_after = time.monotonic() - killed
            want = {host_name(i) for i in faulted}
            await until(lambda: set(xids(rx)) >= want, timeout=180, what="every XID paged")
        finally:
            fleet.stop()
            await run
            await fleet.close(flush_timeout=120)
        published = published_keys(fleet)
        await until(lambda: stored_at_least(pg_dsn, len(published)), timeout=180, what="every frame stored")
        await until(none_pending(pg_dsn), timeout=60, what="no notification pending")
        got = xids(rx)
        assert got == Counter({host_name(i): 1 for i in faulted}), xid_keys(rx)
        stored = await stored_keys(pg_dsn)
        assert set(stored) == published  # nothing lost
        assert set(stored.values()) == {1}  # nothing doubled
        assert fleet.publisher.stats.dropped == 0
        copies = sum(n - 1 for n in deliveries(rx).values())  # the same delivery id again
        print(f"new stream leader {elected_after:.1f} s after the kill; copies of a delivery: {copies}")


@pytest.mark.timeout(500)
@pytest.mark.parametrize("pg_pair", ["sync"], indirect=True)
async def test_a_group_rides_a_postgresql_promotion_and_pages_once(
    tmp_path: Path, pg_pair: tuple[PostgresServer, PostgresServer], private_nats: NatsServer
) -> None:
    """Three members on a multi-host DSN (``target_session_attrs=read-write``) of a primary and
    its synchronous standby: the primary crashes (SIGQUIT) under load, the standby is promoted.
    Members retry, reconnect and keep their leases (their fencing rows are on the standby by
    synchronous replication); every frame is on the new primary once, and an XID after the
    promotion on a host of each member is paged once."""
    primary, standby = pg_pair
    await _promotion(tmp_path, primary, standby, private_nats.url)


async def _promotion(tmp: Path, primary: PostgresServer, standby: PostgresServer, url: str) -> None:
    dsn = multi_host_dsn([primary, standby])
    nats_cfg = NatsConfig(servers=(url,), reconnect_wait=0.2, buffer_frames=100_000)
    hosts = 60
    async with Receiver() as rx, three_members(tmp, dsn, url, rx.url) as (_, table):
        fleet = Fleet(nats_cfg, hosts=hosts, gpus=1, interval=0.5, workers=32)
        await fleet.start()
        run = asyncio.create_task(fleet.run())
        try:
            await until(lambda: stored_at_least(primary.dsn(), 300), timeout=60, what="300 frames stored")
            await asyncio.to_thread(primary.stop, "immediate")  # like a crash
            await asyncio.to_thread(standby.promote)
            await until(lambda: stored_at_least(standby.dsn(), 600), timeout=120, what="storing resumed")
            # alerting resumed on every member: an XID on a host of each is paged, once
            faulted = [publish_xid(fleet, hosts_of(table, m, hosts)[0]) for m in ("m0", "m1", "m2")]
            await until(lambda: set(xids(rx)) >= set(faulted), timeout=90, what="the XIDs paged")
        finally:
            fleet.stop()
            await run
            await fleet.close(flush_timeout=60)
        assert fleet.publisher.stats.dropped == 0
        published = published_keys(fleet)
        await until(lambda: stored_at_least(standby.dsn(), len(published)), timeout=120, what="every frame")
        await until(none_pending(standby.dsn()), timeout=60, what="no notification pending")
    stored = await stored_keys(standby.dsn())
    assert set(stored) == published  # synchronous replication: nothing acknowledged is lost
    assert set(stored.values()) == {1}  # nothing doubled
    assert xids(rx) == Counter(dict.fromkeys(faulted, 1)), xid_keys(rx)
