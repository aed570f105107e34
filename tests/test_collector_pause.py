"""A collector process that did not run for a while (SIGSTOP here; a VM paused for migration,
a starved or swapping machine in the field) does not page its hosts unreachable when it runs
again: the frames the hosts sent meanwhile wait in JetStream, unread, and are judged before
their silence is (hosts are judged as of the oldest frame not judged yet, docs/alerts.md "The
collector's own health"). Hosts that do go silent afterwards are still paged, once each."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from agent.fleet import Fleet, host_name
from gpuwarden.servers import NatsServer
from shared.config import NatsConfig
from tests.support.collector import Receiver, webhook_toml
from tests.support.group import Members
from tests.support.wait import until

HOSTS = 6
STALE = 3.0


def config(tmp: Path, pg_dsn: str, url: str, hook: str) -> Path:
    path = tmp / "collector.toml"
    path.write_text(
        f"""
[collector]
batch = 200
fetch_timeout = "100ms"
[nats]
servers = ["{url}"]
[postgres]
dsn = "{pg_dsn}"
[alerting]
tick = "200ms"
health_snapshot = "1s"
[alerts]
provider_incident_min_hosts = 100000
[health]
stale_after = "{STALE:g}s"
{webhook_toml(hook)}"""
    )
    return path


async def api(http: aiohttp.ClientSession, base: str, path: str) -> Any:
    async with http.get(f"{base}{path}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.mark.timeout(300)
async def test_a_stopped_collector_resumes_without_paging_its_hosts_unreachable(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    url = private_nats.url
    async with Receiver() as rx, aiohttp.ClientSession() as http:
        member = Members(tmp_path, config(tmp_path, pg_dsn, url, rx.url), url)
        member.start("c")
        fleet = Fleet(NatsConfig(servers=(url,)), hosts=HOSTS, gpus=1, interval=1.0)
        run: asyncio.Task[None] | None = None
        try:
            await member.listening()
            base = f"http://127.0.0.1:{member.ports['c']}"
            await fleet.start()
            run = asyncio.create_task(fleet.run())

            async def seen_all(after: float) -> bool:
                items = (await api(http, base, "/api/v1/hosts"))["items"]
                return len(items) == HOSTS and all((h["last_seen"] or 0) > after for h in items)

            await until(lambda: seen_all(0.0), timeout=60, what="every host seen")
            # stopped for three times stale_after while the hosts go on publishing
            member.signal("c", signal.SIGSTOP)
            stopped = time.time()
            await until(lambda: time.time() - stopped > 3 * STALE, timeout=60, what="the pause")
            member.signal("c", signal.SIGCONT)
            resumed = time.time()
            await until(lambda: seen_all(resumed), timeout=60, what="frames sent after the pause judged")
            # the hosts' silence now counts again: the fleet stops, every host is paged
            fleet.stop()
            silent = time.time()
            await run
            run = None

            def paged() -> set[str]:
                return {
                    a["labels"]["host"]
                    for b in rx.bodies()
                    for a in b["alerts"]
                    if a["labels"]["alertname"] == "host.unreachable" and a["status"] == "firing"
                }

            await until(lambda: len(paged()) == HOSTS, timeout=60, what="every host paged unreachable")
        finally:
            fleet.stop()
            if run is not None:
                await run
            await fleet.close()
            member.stop_all()
    conn = await asyncpg.connect(pg_dsn)
    try:
        firings = await conn.fetch(
            "SELECT labels->>'host' AS host, extract(epoch FROM at)::float8 AS at FROM alert_transitions"
            " WHERE rule = 'host.unreachable' AND kind = 'firing' ORDER BY at"
        )
    finally:
        await conn.close()
    # once each, after the fleet stopped: none for the pause
    assert sorted(r["host"] for r in firings) == [host_name(i) for i in range(HOSTS)], firings
    assert all(r["at"] > silent for r in firings), (resumed, silent, firings)
