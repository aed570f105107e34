"""The expected inventory ("GPU discovery service") and how the fleet differs from it.

The source is a JSON file or an HTTP(S) URL returning ``[{"host": .., "provider": ..,
"gpus": N}, ...]``; it is reloaded every ``refresh``. :func:`compare` is pure: given the
expected list and the fleet state it returns the hosts expected but never heard from, and the
hosts reporting fewer GPUs than expected, for the health engine to turn into ``unknown`` and
``GpuMissing``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from collector.state import HostState
from shared.errors import GpuwardenError

log = logging.getLogger(__name__)


class InventorySourceError(GpuwardenError):
    """The expected inventory could not be read or is not the documented JSON."""


@dataclass(frozen=True, slots=True)
class ExpectedHost:
    host: str
    provider: str
    gpus: int


@dataclass(frozen=True, slots=True)
class GpuShortfall:
    host: str
    provider: str
    expected: int
    reported: int


@dataclass(frozen=True, slots=True)
class InventoryDiff:
    silent: tuple[ExpectedHost, ...]  # expected, never reported
    short: tuple[GpuShortfall, ...]  # reporting fewer GPUs than expected
    unexpected: tuple[str, ...]  # reporting, not in the expected list (informational)


def parse_expected(data: Any, source: str = "inventory") -> list[ExpectedHost]:
    """Validate the decoded JSON document; raises :class:`InventorySourceError`."""
    if not isinstance(data, list):
        raise InventorySourceError(f"{source}: expected a JSON array of hosts")
    out: dict[str, ExpectedHost] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InventorySourceError(f"{source}[{i}]: expected an object")
        host, provider, gpus = item.get("host"), item.get("provider", "default"), item.get("gpus", 0)
        if not isinstance(host, str) or not host:
            raise InventorySourceError(f"{source}[{i}].host: expected a non-empty string")
        if not isinstance(provider, str) or not provider:
            raise InventorySourceError(f"{source}[{i}].provider: expected a non-empty string")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or not 0 <= gpus <= 1024:
            raise InventorySourceError(f"{source}[{i}].gpus: expected an integer 0..1024")
        out[host] = ExpectedHost(host, provider, gpus)
    return list(out.values())


def compare(expected: Iterable[ExpectedHost], reported: Mapping[str, HostState]) -> InventoryDiff:
    """How the reporting fleet differs from the expected inventory (pure)."""
    silent, short = [], []
    names = set()
    for e in expected:
        names.add(e.host)
        h = reported.get(e.host)
        if h is None or (h.sample is None and h.inventory is None):
            silent.append(e)
        elif h.gpu_count < e.gpus:
            short.append(GpuShortfall(e.host, e.provider, e.gpus, h.gpu_count))
    unexpected = tuple(sorted(set(reported) - names))
    return InventoryDiff(tuple(silent), tuple(short), unexpected)


async def load_expected(source: str, http_timeout: float = 10.0) -> list[ExpectedHost]:
    """Read the expected inventory from a file path or an HTTP(S) URL."""
    if source.startswith(("http://", "https://")):
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=http_timeout)) as session,
                session.get(source) as resp,
            ):
                if resp.status != 200:
                    raise InventorySourceError(f"{source}: HTTP {resp.status}")
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise InventorySourceError(f"{source}: {e}") from e
    else:
        try:
            text = await asyncio.to_thread(Path(source).read_text, encoding="utf-8")
        except OSError as e:
            raise InventorySourceError(f"{source}: {e.strerror}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InventorySourceError(f"{source}: invalid JSON: {e}") from e
    return parse_expected(data, source)


class ExpectedInventory:
    """Keeps the expected list fresh; on a failed reload the previous list stays."""

    def __init__(self, source: str | None, refresh: float, timeout: float = 10.0) -> None:
        self.source = source
        self.refresh = refresh
        self.timeout = timeout
        self.hosts: list[ExpectedHost] = []
        self.loaded = False
        self.last_error: str | None = None

    async def reload(self) -> None:
        if self.source is None:
            return
        try:
            self.hosts = await load_expected(self.source, self.timeout)
        except InventorySourceError as e:
            self.last_error = str(e)
            log.warning("expected inventory not reloaded, keeping %d hosts: %s", len(self.hosts), e)
            return
        self.loaded = True
        self.last_error = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.reload()
            try:
                await asyncio.wait_for(stop.wait(), self.refresh)
            except TimeoutError:
                continue

    def diff(self, reported: Mapping[str, HostState]) -> InventoryDiff:
        return compare(self.hosts, reported)
