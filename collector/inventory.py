"""The expected inventory ("GPU discovery service") and how the fleet differs from it.

The source is a JSON file or an HTTP(S) URL returning ``[{"host": .., "provider": ..,
"gpus": N}, ...]`` (UTF-8); it is reloaded every ``refresh``. Host and provider names are
taken in their canonical form (``shared.subjects.sanitize_token``, as agents send them).
:func:`compare` is pure: given the expected list and the fleet state it returns the hosts
expected but never heard from, and the hosts reporting fewer GPUs than expected, for the
health engine to turn into ``unknown`` and ``GpuMissing``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from shared.errors import GpuwardenError, SubjectError
from shared.redact import redact
from shared.subjects import sanitize_token

log = logging.getLogger(__name__)
MAX_SOURCE_BYTES: Final = 64 << 20  # a larger source is refused (about 500,000 hosts fit)
MAX_DEPTH: Final = 32  # JSON nesting allowed (the document needs 2)


class InventorySourceError(GpuwardenError):
    """The expected inventory could not be read or is not the documented JSON."""


@dataclass(frozen=True, slots=True)
class ExpectedHost:
    host: str
    provider: str
    gpus: int


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
        try:
            host, provider = sanitize_token(host), sanitize_token(provider)
        except SubjectError as e:
            raise InventorySourceError(f"{source}[{i}]: {e}") from e
        out[host] = ExpectedHost(host, provider, gpus)
    return list(out.values())


async def load_expected(source: str, http_timeout: float = 10.0) -> list[ExpectedHost]:
    """Read the expected inventory from a file path or an HTTP(S) URL (errors show the URL
    without its credentials)."""
    shown = redact(source)
    if source.startswith(("http://", "https://")):
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=http_timeout)) as session,
                session.get(source) as resp,
            ):
                if resp.status != 200:
                    raise InventorySourceError(f"{shown}: HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > MAX_SOURCE_BYTES:
                    raise InventorySourceError(f"{shown}: larger than {MAX_SOURCE_BYTES} bytes")
                raw = await resp.content.read(MAX_SOURCE_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise InventorySourceError(f"{shown}: {redact(str(e))}") from e
    else:
        try:
            raw = await asyncio.to_thread(_read_head, Path(source))
        except OSError as e:
            raise InventorySourceError(f"{shown}: {e.strerror or e}") from e
    if len(raw) > MAX_SOURCE_BYTES:
        raise InventorySourceError(f"{shown}: larger than {MAX_SOURCE_BYTES} bytes")
    return parse_document(raw, shown)


def parse_document(raw: bytes, source: str = "inventory") -> list[ExpectedHost]:
    """Decode (UTF-8 JSON, nested at most :data:`MAX_DEPTH`) and validate a source document;
    every problem is an :class:`InventorySourceError` that says what and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InventorySourceError(
            f"{source}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8 JSON"
        ) from e
    depth = _json_depth(text)
    if depth > MAX_DEPTH:
        raise InventorySourceError(
            f"{source}: JSON nested deeper than {MAX_DEPTH} levels (expected a flat list)"
        )
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InventorySourceError(f"{source}: invalid JSON: {e}") from e
    return parse_expected(data, source)


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MAX_SOURCE_BYTES + 1)


_BRACKETS: Final = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (strings skipped), without parsing."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


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
            if not self.loaded:  # at start: say plainly that the expected inventory is unusable
                log.error("expected inventory unusable ([inventory] source): %s", e)
            else:
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
