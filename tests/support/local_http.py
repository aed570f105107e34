"""A local HTTP server for the tests (webhook and heartbeat receivers): 127.0.0.1, a free port."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Self

from aiohttp import web

from gpuwarden.servers import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LocalHttp(ABC):
    """An aiohttp server on 127.0.0.1 as an async context manager; a subclass names its POST routes."""

    def __init__(self) -> None:
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @abstractmethod
    def routes(self) -> list[tuple[str, Handler]]:
        """``(path, handler)`` of each POST route."""

    async def __aenter__(self) -> Self:
        app = web.Application()
        for path, handler in self.routes():
            app.router.add_post(path, handler)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
