"""The dashboard page in a real headless Chromium (Debian's, driven by playwright over CDP;
never a downloaded browser): it loads without console errors and shows the simulated fleet,
an XID of a fleet host published after the page went live shows up as an alert on the page
through the live stream (no reload), and acknowledging from the page (token dialog) changes
the alert in the API. A host that goes down is one row with its stale GPUs folded under it
("host-0007 unreachable · 8 GPUs stale") and one Acknowledge for the group; an incident is
one item whose Acknowledge acknowledges its members, and the page says which.

Set ``GPUWARDEN_SCREENSHOT=path.png`` to keep a screenshot of the overview."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from agent.fleet import Fleet
from collector.api import make_app
from collector.service import CollectorService
from gpuwarden.servers import NatsServer
from shared.config import NatsConfig
from tests.support.api import api_config
from tests.support.browser import browser_page, xid_event
from tests.support.collector import collector, send
from tests.support.tasks import started
from tests.support.wait import until

TOKEN = "dash-" + uuid.uuid4().hex
FAULTY = "host-0004"
DOWN, DOWN2 = "host-0007", "host-0008"  # providers 1 and 2: no provider-wide incident


@contextlib.asynccontextmanager
async def collector_with_fleet(tmp: Path, dsn: str, url: str) -> AsyncIterator[CollectorService]:
    cfg = api_config(tmp, dsn, url, f"dash{uuid.uuid4().hex[:8]}", TOKEN, batch=500)
    async with collector(cfg) as svc:
        fleet = Fleet(
            NatsConfig(servers=(url,)),
            hosts=12,
            gpus=8,
            providers=3,
            interval=1.0,
            faults=[f"{DOWN}:host_down@6s", f"{DOWN2}:host_down@6s"],
        )
        async with started(fleet.start, fleet.run, fleet.stop, fleet.close):
            yield svc


@pytest.mark.timeout(150)
async def test_page_shows_the_fleet_live_alerts_and_acknowledges(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    console: list[str] = []
    async with (
        collector_with_fleet(tmp_path, pg_dsn, private_nats.url) as svc,
        TestServer(make_app(svc.parts.api_deps)) as server,
        browser_page(tmp_path, console) as page,
    ):
        await until(lambda: len(svc.parts.live.current().hosts) == 12, timeout=30)
        await page.goto(str(server.make_url("/")))
        await page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert await page.locator("#providers .card").count() == 3
        assert "12 hosts" in await page.locator("#fleet-summary").inner_text()
        assert await page.locator("#grids canvas").count() == 3
        await page.wait_for_selector("#live:not(.off)", timeout=10_000)

        # an XID on host-0004/gpu2, published only now that the page is live, arrives through
        # the WebSocket, no reload (a fault scheduled by time could fire before the first
        # render on a loaded machine, and then no live update was needed to show it)
        row = page.locator(f"#alerts tr[data-alert]:has-text('{FAULTY}'):has-text('gpu.xid')")
        assert await row.count() == 0
        renders = await page.evaluate("window.gw.renders")
        host = svc.state.host(FAULTY)
        assert host is not None
        await send(private_nats.url, [xid_event(host)])
        await row.first.wait_for(timeout=30_000)
        assert await page.evaluate("window.gw.renders") > renders
        assert "critical" in await row.first.inner_text()
        fp = await row.first.get_attribute("data-alert")
        assert fp is not None
        if os.environ.get("GPUWARDEN_SCREENSHOT"):
            await page.screenshot(path=os.environ["GPUWARDEN_SCREENSHOT"], full_page=True)

        # acknowledge from the page: the token dialog asks once, then the API has the ack
        await row.first.locator("button.ack").click()
        await page.wait_for_selector("#token-dialog[open]", timeout=5_000)
        await page.fill("#token-input", TOKEN)
        await page.click("#token-save")
        await until(
            lambda: (a := svc.alerting.get_alert(fp)) is not None and a.ack_by == "token-0", timeout=10
        )
        await page.locator(f"#alerts tr.acked[data-alert='{fp}']").wait_for(timeout=10_000)

        # a host down: one row, its 8 stale GPUs folded under it, one Acknowledge for the group
        group = page.locator(f"#alerts tr[data-alert]:has-text('{DOWN} unreachable · 8 GPUs stale')")
        await group.first.wait_for(timeout=30_000)
        assert await page.locator(f"#alerts tr[data-alert]:has-text('{DOWN}')").count() == 1
        root = await group.first.get_attribute("data-alert")
        await group.first.locator("button.ack").click()

        def group_acked() -> bool:
            a = svc.alerting.get_alert(root or "")
            folded = [x for x in svc.alerting.alerts_state.alerts.values() if x.inhibited_by == root]
            acked = all(x.ack_by is not None for x in folded)
            return a is not None and a.ack_by is not None and len(folded) == 8 and acked

        await until(group_acked, timeout=10)
        await page.locator(f"#alerts tr.acked[data-alert='{root}']").wait_for(timeout=10_000)

        # an incident is one item: its Acknowledge acknowledges its members, the page says so.
        # The item is the host incident of DOWN2, by id: on a loaded machine other hosts of its
        # provider can look stale, and a provider-wide incident then names DOWN2 as well
        def down2_incident() -> str | None:
            return next((i.id for i in svc.alerting.incidents(open_only=True) if i.host == DOWN2), None)

        await until(lambda: down2_incident() is not None, timeout=30, what=f"an incident of {DOWN2}")
        iid = down2_incident()
        item = page.locator(f"#incidents [data-incident='{iid}']")
        await item.locator("button.ack-incident").wait_for(timeout=30_000)

        def all_members() -> bool:  # its GPUs' stale alerts join a moment after the host's own
            view = svc.alerting.get_incident(iid or "")
            return len([m for m in (view or {}).get("members", []) if m["state"] != "resolved"]) == 9

        await until(all_members, timeout=30)  # (members that join after an ack are not acked)
        await item.locator("button.ack-incident").click()

        def incident_acked() -> bool:
            view = svc.alerting.get_incident(iid or "")
            live = [m for m in (view or {}).get("members", []) if m["state"] != "resolved"]
            return bool(live) and all(m["acknowledged"] and m["ack_incident"] == iid for m in live)

        await until(incident_acked, timeout=10)
        # the page shows it acknowledged (until then its summary holds the Acknowledge button, and
        # a click on the summary could land on that button instead of opening the item)
        await item.locator("summary .badge:has-text('acknowledged')").wait_for(timeout=10_000)
        await item.locator("summary b").click()  # open it: the members and how each was acknowledged
        await item.locator("li.member.acked:has-text('acknowledged with the incident')").first.wait_for(
            timeout=10_000
        )

        # the host page: GPUs with readings and the history charts
        await page.goto(str(server.make_url(f"/#/host/{FAULTY}")))
        await page.locator("#gpus tbody tr").nth(7).wait_for(timeout=10_000)
        assert "°C" in await page.locator("#gpus tbody tr").first.inner_text()
    assert console == []
