"""Stopping asyncio services: cancelling their tasks, stopping on SIGTERM/SIGINT.

One implementation for agent and collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel every task of ``tasks``, then wait for each to end (its ``CancelledError`` is
    swallowed; any other exception it ends with is raised)."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], object], enabled: bool = True) -> Iterator[None]:
    """While inside (and ``enabled``), SIGTERM and SIGINT call ``stop`` on the running loop;
    the handlers are removed on leaving."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
