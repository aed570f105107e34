"""An incident acknowledged on one member of a collector group acknowledges its members on
every member, as on one collector (docs/alerts.md, "In a collector group"; docs/operations.md,
"Silences, acknowledgements and maintenance windows"). Three real ``gpuwarden collector run``
members, a real nats-server and PostgreSQL, a simulated fleet and a webhook receiver."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.fleet import Fleet, host_name
from collector.group.assign import bucket_of
from gpuwarden.servers import NatsServer
from shared.config import NatsConfig
from tests.support.collector import Receiver, told
from tests.support.group import hosts_of, spread, three_members, write_access
from tests.support.wait import until

TOKEN = "group-ack-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N = 60  # two providers of 30 hosts (provider-0: the even host numbers)
WAVE1_AT, WAVE2_AT = 20, 80  # s after the fleet starts
SETTINGS = """
[alerts]
provider_incident_min_hosts = 3
group_wait = "4s"
group_interval = "5s"
for = "2s"
[health]
stale_after = "60s"
"""
API = write_access(TOKEN, "20s")  # a member told at t escalates at t + 20 s unless acknowledged


def escalated(rx: Receiver) -> set[str]:
    """The hosts an escalation or repeat notice was about."""
    return {h for kind, _, hosts in told(rx) if kind in ("escalated", "repeat") for h in hosts}


async def disk_alert(http: aiohttp.ClientSession, port: int, host: str) -> dict[str, Any] | None:
    """``host``'s open host.disk alert as the member on ``port`` answers it."""
    async with http.get(f"http://127.0.0.1:{port}/api/v1/alerts?host={host}") as r:
        items = (await r.json())["items"]
    return next((a for a in items if a["rule"] == "host.disk" and a["state"] != "resolved"), None)


@pytest.mark.timeout(500)
@pytest.mark.parametrize("on", ["another", "judge"])
async def test_an_incident_acknowledged_on_one_member_is_acknowledged_on_every_member(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, on: str
) -> None:
    """A provider's hosts on all three members fill their disks (critical): one provider
    incident tells them all. It is acknowledged through a member that does not judge it (or,
    ``judge``, through the judge's own API); then
    every member's alerts of it show acknowledged with the incident, and none escalates (20 s
    after being told, without the acknowledgement). A second wave joining the incident later is
    not acknowledged, and its escalation (20 s after its update) shows that the first wave's
    would have come by then."""
    url = private_nats.url
    async with (
        Receiver() as rx,
        three_members(tmp_path, pg_dsn, url, rx.url, API, SETTINGS) as (group, table),
    ):
        judge = table[bucket_of("provider-0", 64)]
        # the API call goes to a member that does not judge the incident (it asks the judge
        # through group_commands), or to the judge itself
        asker = sorted({"m0", "m1", "m2"} - {judge})[0] if on == "another" else judge
        mine = {m: [j for j in hosts_of(table, m, N) if j % 2 == 0] for m in ("m0", "m1", "m2")}
        # wave 2 (after the acknowledgement): 3 more of the provider's hosts, one per member
        # where it has one to spare; wave 1: 9 of the provider's 30 hosts (over 20 %) taken from
        # the members in turn, at most 5 on one (none alone over 20 %). (The leases' random split
        # left a member 3 of the provider's hosts in a full run: 3 each in wave 1 left it none.)
        wave2 = spread([mine[m][-1:] for m in ("m0", "m1", "m2") if len(mine[m]) > 3], 3, 1)
        rest = [[j for j in mine[m] if j not in wave2] for m in ("m0", "m1", "m2")]
        wave2 += spread(rest, 3 - len(wave2), 30)
        wave1 = spread([[j for j in mine[m] if j not in wave2] for m in ("m0", "m1", "m2")], 9, 5)
        assert (len(wave1), len(wave2)) == (9, 3), table
        names1, names2 = {host_name(i) for i in wave1}, {host_name(i) for i in wave2}
        owner = {host_name(i): table[bucket_of(host_name(i), 64)] for i in wave1 + wave2}
        faults = [f"{host_name(i)}:disk_full@{WAVE1_AT}s" for i in wave1]
        faults += [f"{host_name(i)}:disk_full@{WAVE2_AT}s" for i in wave2]
        nats_config = NatsConfig(servers=(url,))
        fleet = Fleet(nats_config, hosts=N, gpus=1, providers=2, interval=1.0, faults=faults)
        await fleet.start()
        started = time.monotonic()
        run = asyncio.create_task(fleet.run(duration=170))
        try:
            await until(
                lambda: any(k == "provider_incident" for k, _, _ in told(rx)),
                timeout=120,
                what="the provider incident paged",
            )
            async with aiohttp.ClientSession(headers=AUTH) as http:
                api = f"http://127.0.0.1:{group.ports[asker]}/api/v1"
                iid = ""

                async def seen_by_asker() -> bool:  # the judge's incident, in the asker's view
                    nonlocal iid
                    async with http.get(f"{api}/incidents?open=true") as r:
                        items = [i for i in (await r.json())["items"] if i["host"] is None]
                    iid = items[0]["id"] if len(items) == 1 else ""
                    return bool(iid)

                await until(seen_by_asker, timeout=30, what="the incident in the asker's view")
                r = await http.post(f"{api}/incidents/{iid}/ack", json={"comment": "provider down"})
                assert r.status == 200, await r.text()

                async def all_acknowledged() -> bool:  # by their owners, as the incident's
                    for h in names1:
                        a = await disk_alert(http, group.ports[owner[h]], h)
                        if a is None or a["ack"] is None or a["ack"]["incident"] != iid:
                            return False
                    return True

                await until(all_acknowledged, timeout=40, what="wave 1 acknowledged on every member")
                acked_at = time.monotonic() - started
                assert acked_at < WAVE2_AT, f"acknowledged {acked_at:.0f} s in, after wave 2 began"
                assert not escalated(rx) & names1, told(rx)
                # the control: wave 2 joins later, is not acknowledged and escalates
                await until(lambda: names2 <= escalated(rx), timeout=150, what="wave 2 escalated")
                for h in names2:
                    a = await disk_alert(http, group.ports[owner[h]], h)
                    assert a is not None, h
                    assert a["ack"] is None, a  # joined after the acknowledgement
                for h in names1:
                    a = await disk_alert(http, group.ports[owner[h]], h)
                    assert a is not None, h
                    assert a["ack"]["by"] == "ops", a
        finally:
            fleet.stop()
            await run
            await fleet.close()
    pages = told(rx)
    assert [k for k, _, _ in pages].count("provider_incident") == 1, pages  # one incident, paged once
    first = next(hs for k, _, hs in pages if k == "provider_incident")
    assert len({owner[h] for h in first & names1}) >= 2, (first, table)  # hosts of several members
    assert not escalated(rx) & names1, pages  # no escalation after the acknowledgement
    assert "Traceback" not in "".join(group.log(m) for m in ("m0", "m1", "m2"))
