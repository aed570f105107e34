"""Expected inventory: parsing, file and HTTP sources, and the pure comparison with the fleet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web

from collector.inventory import (
    ExpectedHost,
    ExpectedInventory,
    InventorySourceError,
    load_expected,
    parse_expected,
)

DOC = [
    {"host": "a", "provider": "p1", "gpus": 8},
    {"host": "b", "provider": "p1", "gpus": 8},
    {"host": "c", "provider": "p2", "gpus": 4},
    {"host": "d", "provider": "p2", "gpus": 2},
]


@pytest.mark.parametrize(
    "doc",
    [
        {"host": "a"},
        [{"provider": "p"}],
        [{"host": "", "gpus": 1}],
        [{"host": "a", "gpus": -1}],
        [{"host": "a", "gpus": True}],
        [{"host": "a", "gpus": "8"}],
        ["a"],
    ],
)
def test_bad_documents_are_rejected(doc: object) -> None:
    with pytest.raises(InventorySourceError):
        parse_expected(doc)


async def test_file_source_and_reload_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(DOC))
    inv = ExpectedInventory(str(path), refresh=60)
    await inv.reload()
    assert [h.host for h in inv.hosts] == ["a", "b", "c", "d"]
    path.write_text("{not json")
    await inv.reload()
    assert len(inv.hosts) == 4
    assert inv.last_error is not None
    assert "invalid JSON" in inv.last_error
    with pytest.raises(InventorySourceError):
        await load_expected(str(tmp_path / "missing.json"))


async def test_http_source() -> None:
    calls = []

    async def hosts(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.json_response(DOC[:2])

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/hosts", hosts)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        got = await load_expected(f"http://127.0.0.1:{port}/hosts")
        assert got == [ExpectedHost("a", "p1", 8), ExpectedHost("b", "p1", 8)]
        assert calls == ["/hosts"]
        with pytest.raises(InventorySourceError, match="HTTP 503"):
            await load_expected(f"http://127.0.0.1:{port}/broken")
    finally:
        await runner.cleanup()
