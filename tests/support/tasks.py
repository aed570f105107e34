"""A part's run loop in a task for the length of a block (collectors, ingests, fleets)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def in_task(run: Coroutine[Any, Any, None], stop: Callable[[], object]) -> AsyncIterator[None]:
    """``run`` in a task while the block runs; then ``stop()`` and its end awaited (30 s at most)."""
    task = asyncio.create_task(run)
    try:
        yield
    finally:
        stop()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def started(
    start: Callable[[], Awaitable[object]],
    run: Callable[[], Coroutine[Any, Any, None]],
    stop: Callable[[], object],
    close: Callable[[], Awaitable[object]],
) -> AsyncIterator[None]:
    """A part started, its run loop in a task while the block runs (:func:`in_task`), then
    closed: a collector (startup, run, request_stop, shutdown), a fleet (start, run, stop, close)."""
    await start()
    try:
        async with in_task(run(), stop):
            yield
    finally:
        await close()
