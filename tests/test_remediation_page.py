"""The page's remediation section in a real headless Chromium: an action awaiting approval
is listed with Approve / Deny; Approve (the token dialog asks once) drains the node in a
private Slurm and the audit names the token; the alert row shows its action."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from collector.api import make_app
from collector.config import load_collector_config
from collector.remediation import store
from gpuwarden.servers import NatsServer
from gpuwarden.slurm import PrivateSlurm
from tests.support.browser import browser_page, xid_event
from tests.support.collector import collector, send
from tests.support.slurm import fleet_running, rule_toml
from tests.support.wait import until

TOKEN = "rem-" + uuid.uuid4().hex
HOST = "host-0002"


@pytest.fixture(scope="module")
def slurm() -> Iterator[PrivateSlurm]:
    with PrivateSlurm([f"host-{i:04d}" for i in range(4)]) as s:
        yield s


@pytest.mark.timeout(150)
async def test_page_lists_an_action_awaiting_approval_and_approve_drains_the_node(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, slurm: PrivateSlurm
) -> None:
    path = tmp_path / "collector.toml"
    path.write_text(
        f"""
[collector]
fetch_timeout = "100ms"
durable = "rem{uuid.uuid4().hex[:8]}"
[api]
named_tokens = ["oncall-alice={TOKEN}"]
[alerting]
tick = "200ms"
[alerts]
for = "1s"
[health.gpu]
xid_window = "1h"
[remediation]
[remediation.breaker]
max_share = 1.0
[remediation.slurm]
conf = "{slurm.conf}"
{rule_toml("careful", [f"host={HOST}", "rule=gpu.xid"], "approve")}
"""
    )
    cfg = load_collector_config(
        path, env={}, flags={"postgres.dsn": pg_dsn, "nats.servers": [private_nats.url]}
    )
    console: list[str] = []
    async with (
        collector(cfg) as svc,
        fleet_running(private_nats.url, [], 60, hosts=4, gpus=8),
        TestServer(make_app(svc.parts.api_deps)) as server,
        browser_page(tmp_path, console) as page,
    ):
        await until(lambda: (h := svc.state.host(HOST)) is not None and len(h.gpus) == 8, timeout=30)
        host = svc.state.host(HOST)
        assert host is not None
        await send(private_nats.url, [xid_event(host)])
        assert svc.pool is not None
        pool = svc.pool

        async def awaiting() -> bool:
            async with pool.acquire() as conn:
                return [a["state"] for a in await store.list_actions(conn)] == ["awaiting_approval"]

        await until(awaiting, timeout=30)
        await page.goto(str(server.make_url("/")))
        await page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        alert_row = page.locator(f"#alerts tr[data-alert]:has-text('{HOST}'):has-text('gpu.xid')")
        await alert_row.first.wait_for(timeout=20_000)
        assert "drain_and_reboot" in await alert_row.first.inner_text()
        row = page.locator(f"#actions tr[data-action]:has-text('{HOST}')")
        await row.first.wait_for(timeout=20_000)
        assert "awaiting_approval" in await row.first.inner_text()
        assert "DRAIN" not in slurm.state(HOST)
        await row.first.locator("button.approve").click()
        await page.wait_for_selector("#token-dialog[open]", timeout=5_000)
        await page.fill("#token-input", TOKEN)
        await page.click("#token-save")
        await until(lambda: "DRAIN" in slurm.state(HOST), timeout=20)
        assert slurm.reasons()[HOST].startswith("gpuwarden: careful ")
        async with pool.acquire() as conn:
            events = [(e["event"], e["who"]) for e in await store.audit(conn)]
        assert ("approved", "oncall-alice") in events
        await page.locator(
            f"#actions tr[data-action]:has-text('{HOST}'):not(:has(button.approve))"
        ).first.wait_for(timeout=20_000)
    assert console == []
