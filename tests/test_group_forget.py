"""Forgetting a host in a collector group (issue 13, item 1): ``DELETE /api/v1/hosts/{host}``
on any member is applied by the host's owner (a ``forget`` group command), and the host leaves
every member's host list, provider totals, ``/metrics`` and live stream (the owner's summaries
carry a tombstone); a takeover does not bring it back (the inventory still lists it), a frame
from it does. Three real ``gpuwarden collector run`` members, a real nats-server and PostgreSQL
(docs/api.md, docs/operations.md "Collector group")."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from collector.group import fence
from collector.group.assign import bucket_of
from collector.group.scope import Scope
from collector.group.store import GroupAlertStore
from gpuwarden.servers import NatsServer
from tests.support.collector import Receiver, load_toml, send
from tests.support.group import host_name_in_bucket, split_in, three_members
from tests.support.records import sample
from tests.support.runner import CONFIG as RUNNER_CONFIG
from tests.support.runner import build_runner
from tests.support.wait import until

TOKEN = "group-forget-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROVIDER_HOSTS = re.compile(r'^gpuwarden_provider_hosts\{provider="prov-a",status="\w+"\} (\S+)$', re.M)


def names_in(bucket: int, n: int) -> list[str]:
    """``n`` host names of ``bucket`` (of 64)."""
    got = (h for h in (f"fg-{i:05d}" for i in range(100_000)) if bucket_of(h, 64) == bucket)
    return [next(got) for _ in range(n)]


async def fleet_of(http: aiohttp.ClientSession, port: int) -> tuple[set[str], int, int]:
    """A member's answer: the host names it lists, its provider total of hosts, and the hosts
    its ``/metrics`` provider series count."""
    base = f"http://127.0.0.1:{port}"
    async with http.get(f"{base}/api/v1/hosts?limit=10000") as r:
        names = {h["name"] for h in (await r.json())["items"]}
    async with http.get(f"{base}/api/v1/providers") as r:
        total = sum(p["hosts"] for p in (await r.json())["items"])
    async with http.get(f"{base}/metrics") as r:
        series = sum(int(float(v)) for v in PROVIDER_HOSTS.findall(await r.text()))
    return names, total, series


@pytest.mark.timeout(300)
async def test_a_host_forgotten_on_any_member_leaves_every_members_view_and_a_takeover_does_not_bring_it_back(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    url = private_nats.url
    inventory = tmp_path / "inventory.json"  # lists every host: a taker must not expect the forgotten
    extra = f'[api]\ntokens = ["{TOKEN}"]\n[inventory]\nsource = "{inventory}"\nrefresh = "1s"\n'
    inventory.write_text("[]")
    async with Receiver() as rx, three_members(tmp_path, pg_dsn, url, rx.url, extra) as (group, table):
        by_member = {m: sorted(b for b, o in table.items() if o == m) for m in ("m0", "m1", "m2")}
        gone_a = names_in(by_member["m0"][0], 1)[0]  # forgotten on m1, a non-owner
        gone_b, moved = names_in(by_member["m1"][0], 2)  # forgotten on m1, its owner; then m1 dies
        keep = names_in(by_member["m2"][0], 1)[0]
        everyone = {gone_a, gone_b, moved, keep}
        inventory.write_text(
            json.dumps([{"host": h, "provider": "prov-a", "gpus": 2} for h in sorted(everyone)])
        )
        seq = 1
        await send(url, [sample(h, seq, time.time(), gpus=2) for h in sorted(everyone)])
        ports = dict(group.ports)
        seen: dict[str, Any] = {}

        async def everywhere(hosts: set[str], members: tuple[str, ...] = ("m0", "m1", "m2")) -> bool:
            async with aiohttp.ClientSession() as http:
                for m in members:
                    seen[m] = await fleet_of(http, ports[m])
            return all(seen[m] == (hosts, len(hosts), len(hosts)) for m in members)

        async def until_everywhere(hosts: set[str], members: tuple[str, ...] = ("m0", "m1", "m2")) -> None:
            try:
                await until(lambda: everywhere(hosts, members), timeout=60)
            except AssertionError:
                raise AssertionError(f"expected {sorted(hosts)} on {members}, saw {seen}") from None

        await until_everywhere(everyone)
        async with (
            aiohttp.ClientSession(headers=AUTH) as http,
            http.ws_connect(f"ws://127.0.0.1:{ports['m2']}/api/v1/stream?type=health") as ws,
        ):
            # on a member that does not own it: its owner (m0) forgets it, and answers
            r = await http.delete(f"http://127.0.0.1:{ports['m1']}/api/v1/hosts/{gone_a}")
            assert r.status == 200, await r.text()
            body = await r.json()
            assert body["forgotten"] is True, body
            assert body["host"] == gone_a, body
            # the owner answers within 5 s, or the reply says forget_pending (a loaded full run
            # answered later): either way every member's view must lose the host
            assert body.get("forget_pending", True) is True, body
            await until_everywhere(everyone - {gone_a})

            # the live stream of a third member (m2) says so (relayed from the owner)
            async def told_forgotten() -> bool:
                msg = await ws.receive(timeout=30)
                ev = json.loads(msg.data)
                return bool(ev.get("host") == gone_a and ev.get("status") == "forgotten")

            await until(told_forgotten, timeout=60)

            # on its owner
            r = await http.delete(f"http://127.0.0.1:{ports['m1']}/api/v1/hosts/{gone_b}")
            assert r.status == 200, await r.text()
            await until_everywhere({moved, keep})
            r = await http.delete(f"http://127.0.0.1:{ports['m0']}/api/v1/hosts/no-such-host")
            assert r.status == 404, await r.text()

        # m1 dies: its buckets' takers restore them from PostgreSQL and must not resurrect gone_b
        # (the inventory lists it; m1's health snapshot and the summaries no longer have it)
        group.signal("m1", signal.SIGKILL)
        await split_in(url, {"m0", "m2"}, group)
        seq, t2 = seq + 1, time.time()
        await send(url, [sample(h, seq, t2, gpus=2) for h in (moved, keep)])
        survivors = ("m0", "m2")

        async def moved_judged_by_taker() -> bool:
            async with aiohttp.ClientSession() as http:
                for m in survivors:
                    async with http.get(f"http://127.0.0.1:{ports[m]}/api/v1/hosts/{moved}") as r:
                        got = await r.json()
                    if r.status != 200 or got["stale"] or (got["last_seen"] or 0) < t2:
                        return False  # not judged by the taker since the takeover yet
            return True

        await until(moved_judged_by_taker, timeout=90)
        await until_everywhere({moved, keep}, survivors)
        for _ in range(5):  # a few more rounds of summaries and ticks: still not resurrected
            assert await everywhere({moved, keep}, survivors), seen

        # it reports again: back as a new host, on every member
        seq += 1
        await send(url, [sample(gone_b, seq, time.time(), gpus=2)])
        await until_everywhere({gone_b, moved, keep}, survivors)
        assert "Traceback" not in "".join(group.log(m) for m in ("m0", "m1", "m2"))


async def test_a_taker_reads_the_hosts_forgotten_elsewhere_from_postgresql_when_it_takes_buckets(
    conn: asyncpg.Connection, pg_dsn: str, tmp_path: Path
) -> None:
    """A member that missed the owner's tombstone (or whose owner died before it told) reads
    the forgotten hosts again when it takes buckets: the health snapshot it restores, written
    before the forget, does not bring the host back. One member's runner and store over real
    PostgreSQL, its leases a dict (as in tests/test_group_own_alerts.py)."""
    cfg = load_toml(tmp_path, pg_dsn, None, 'durable = "fgt"\n[alerting]\ntick = "100ms"\n' + RUNNER_CONFIG)
    bucket = 9
    host = host_name_in_bucket(bucket)
    held: dict[int, int] = {}
    scope = Scope(64, lambda b: b in held, lambda: dict(held))
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    store = GroupAlertStore(lambda: pool, scope, "g")
    runner = build_runner(cfg, store, scope=scope)[0]
    store.incidents = lambda: runner.alerts_state.incidents
    store.health = lambda: (runner.health, runner.health_engine.healthy_for)
    try:
        await runner.start()
        assert await fence.take(conn, bucket, 1, "m", group="g")
        held[bucket] = 1
        await runner.regroup(lambda: store.reload([bucket]))  # as GroupMember._gain
        await runner.on_frames([sample(host, 1, time.time(), gpus=1)])
        assert host in runner.health.hosts
        await runner.save_health()  # the bucket's snapshot has the host
        # another member held the bucket meanwhile and forgot the host; no tombstone came here
        provider = await conn.fetchval("INSERT INTO providers (name) VALUES ('prov-a') RETURNING id")
        await conn.execute(
            "INSERT INTO hosts (name, provider_id, first_seen, last_seen, forgotten_at)"
            " VALUES ($1, $2, now(), now(), now())",
            host,
            provider,
        )
        assert await fence.take(conn, bucket, 2, "m", group="g")
        held[bucket] = 2
        await runner.regroup(lambda: store.reload([bucket]))
        assert host not in runner.health.hosts, "resurrected from the health snapshot"
        assert host in runner.forgotten
        # a frame brings it back, as a new host
        await runner.on_frames([sample(host, 2, time.time(), gpus=1)])
        assert host in runner.health.hosts
        assert host not in runner.forgotten
        assert await conn.fetchval("SELECT forgotten_at FROM hosts WHERE name = $1", host) is None
    finally:
        await runner.stop()
        await pool.close()
