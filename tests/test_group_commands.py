"""Silences, acknowledgements and maintenance windows apply group-wide at once: written on one
member's API, applied by the member that owns the host (docs/operations.md, "Collector group").
Three real ``gpuwarden collector run`` members, a real nats-server and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from agent.fleet import Fleet, host_name
from gpuwarden.servers import NatsServer
from shared.config import NatsConfig
from tests.support.collector import Receiver
from tests.support.group import hosts_of, three_members, write_access
from tests.support.wait import until

TOKEN = "group-write-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOSTS = 60
EXTRA = write_access(TOKEN, "8s")


def kinds(rx: Receiver, host: str) -> Counter[str]:
    """kind -> webhook notifications of ``host``'s gpu.xid alert (one per delivery id)."""
    seen: dict[str, str] = {}
    for headers, raw, _ in rx.received:
        for a in json.loads(raw)["alerts"]:
            if a["labels"].get("host") == host and a["labels"]["alertname"] == "gpu.xid":
                seen[headers.get("X-Gpuwarden-Delivery", "")] = a["annotations"]["kind"]
    return Counter(seen.values())


async def xid_alert(dsn: str, host: str) -> dict[str, Any] | None:
    """The stored gpu.xid alert of ``host`` (its ``fingerprint`` and saved data), if any."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT fingerprint, data FROM alerts WHERE labels->>'host' = $1 AND rule = 'gpu.xid'", host
        )
    finally:
        await conn.close()
    return None if row is None else {"fingerprint": row["fingerprint"], **json.loads(row["data"])}


@pytest.mark.timeout(300)
async def test_silence_ack_and_maintenance_written_on_one_member_apply_where_the_hosts_are_owned(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    url = private_nats.url
    async with Receiver() as rx, three_members(tmp_path, pg_dsn, url, rx.url, EXTRA) as (group, table):
        # every write goes to m0; the hosts are m1's and m2's
        silenced, acked, control = hosts_of(table, "m1", HOSTS)[:3]
        maintained, control2 = hosts_of(table, "m2", HOSTS)[:2]
        api = f"http://127.0.0.1:{group.ports['m0']}/api/v1"
        now = time.time()
        async with aiohttp.ClientSession(headers=AUTH) as http:
            r = await http.post(
                f"{api}/silences",
                json={"matchers": [f"host={host_name(silenced)}"], "duration": 600, "comment": "test"},
            )
            assert r.status == 201, await r.text()
            r = await http.post(
                f"{api}/silences",
                json={
                    "matchers": [f"host={host_name(maintained)}"],
                    "starts_at": now,
                    "ends_at": now + 600,
                    "comment": "maintenance window",
                },
            )
            assert r.status == 201, await r.text()

            async def listed_everywhere() -> bool:
                for name in ("m1", "m2"):
                    async with http.get(f"http://127.0.0.1:{group.ports[name]}/api/v1/silences") as got:
                        if (await got.json())["total"] < 2:
                            return False
                return True

            await until(listed_everywhere, timeout=30)

            faults = [
                f"{host_name(i)}/gpu0:xid=79@{t}s"
                for i, t in ((silenced, 2), (maintained, 2), (acked, 2), (control, 3), (control2, 3))
            ]
            fleet = Fleet(NatsConfig(servers=(url,)), hosts=HOSTS, gpus=1, interval=1.0, faults=faults)
            await fleet.start()
            run = asyncio.create_task(fleet.run(duration=60))
            try:
                # acknowledged on m0 once paged: m1, its owner, does not escalate it
                await until(lambda: kinds(rx, host_name(acked))["firing"] == 1, timeout=60)
                alert = await xid_alert(pg_dsn, host_name(acked))
                assert alert is not None
                r = await http.post(f"{api}/alerts/{alert['fingerprint']}/ack", json={"comment": "on it"})
                assert r.status == 200, await r.text()
                view = await r.json()
                assert view["ack"]["by"] == "ops", view  # m1's answer, once applied
                # the unacknowledged controls escalate (8 s after their page, a fault 1 s later)
                await until(lambda: kinds(rx, host_name(control))["escalated"] == 1, timeout=60)
                await until(lambda: kinds(rx, host_name(control2))["escalated"] == 1, timeout=60)

                async def silenced_stored() -> bool:
                    got = [await xid_alert(pg_dsn, host_name(h)) for h in (silenced, maintained)]
                    return all(a is not None and a["silenced_by"] for a in got)

                await until(silenced_stored, timeout=30)
            finally:
                fleet.stop()
                await run
                await fleet.close()
        assert kinds(rx, host_name(acked)) == Counter({"firing": 1}), kinds(rx, host_name(acked))
        assert not kinds(rx, host_name(silenced)), kinds(rx, host_name(silenced))
        assert not kinds(rx, host_name(maintained)), kinds(rx, host_name(maintained))
        stored = await xid_alert(pg_dsn, host_name(acked))
        assert stored is not None
        assert stored["ack_by"] == "ops"
