"""Stopping asyncio tasks: one implementation for agent and collector."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel every task of ``tasks``, then wait for each to end (its ``CancelledError`` is
    swallowed; any other exception it ends with is raised)."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
