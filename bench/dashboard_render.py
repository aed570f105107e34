"""Dashboard: time to the first full render of the overview with 10,000 hosts x 8 GPUs.

The state is built as in ``bench.api_latency`` (no NATS or PostgreSQL); the API serves it on
a local port and Debian's Chromium (headless, driven by playwright over CDP, never a
downloaded browser) opens ``/``. Two figures: navigation start to the page marking itself
rendered (providers, alerts, incidents and every host cell drawn: ``body[data-ready]``), and
the page's own time from its first API request to the end of that render (data transfer,
JSON parsing and drawing). ``BENCH_DASH_HOSTS`` changes the fleet size.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

from aiohttp.test_utils import TestServer

from bench.api_latency import build
from collector.api import make_app
from tests.support.browser import chromium_page

HOSTS = int(os.environ.get("BENCH_DASH_HOSTS", "10000"))
GOAL_S = 3.0


async def measure(hosts: int) -> tuple[float, float, int]:
    svc = build(hosts)
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="gpuwarden-bench-chromium-")
    try:
        async with (
            TestServer(make_app(svc.parts.api_deps)) as server,
            chromium_page(profile, chromium) as page,
        ):
            t = time.perf_counter()
            await page.goto(str(server.make_url("/")))
            await page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            wall = time.perf_counter() - t
            inner = await page.evaluate("window.gw.firstRenderMs") / 1000
            shown = int(await page.evaluate("window.gw.hosts"))
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return wall, inner, shown


def run() -> list[tuple[str, str, str]]:
    if shutil.which("chromium") is None:
        return [("dashboard: first render", "skipped: chromium not installed (apt-get install chromium)", "")]
    wall, inner, shown = asyncio.run(measure(HOSTS))
    return [
        (
            f"dashboard: first full render, {shown} hosts x 8 GPUs",
            f"{wall:.2f} s from navigation ({inner:.2f} s fetch + parse + draw)",
            f"< {GOAL_S:.0f} s",
        )
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
