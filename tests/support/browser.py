"""A headless Chromium page for the dashboard tests (and the dashboard benchmark's flags)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from playwright.async_api import async_playwright

from collector.state import FleetHost
from shared.frames import EventFrame
from tests.support.frame_fixtures import xid_frame
from tests.support.system_tools import system_tool

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def xid_event(host: FleetHost) -> EventFrame:
    """XID 79 on GPU 2 of ``host`` (fatal: critical at once), as its agent would publish it."""
    gpu = next(g for g in host.gpus if g.index == 2)
    return xid_frame(
        host.host,
        10**9,
        time.time(),
        host.provider,
        host.boot_id or "b",
        source="kmsg",
        gpu_uuid=gpu.uuid,
        message="GPU has fallen off the bus",
    )


@contextlib.asynccontextmanager
async def chromium_page(profile: str, chromium: str) -> AsyncIterator[Any]:
    """A page of the headless Chromium ``chromium`` (its profile kept in ``profile``), closed at the end."""
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield ctx.pages[0] if ctx.pages else await ctx.new_page()
        finally:
            await ctx.close()


@contextlib.asynccontextmanager
async def browser_page(tmp: Path, console: list[str]) -> AsyncIterator[Any]:
    """A page of the system's Chromium that adds its console errors to ``console``."""
    async with chromium_page(str(tmp / "profile"), system_tool("chromium")) as page:
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console.append(str(e)))
        yield page
