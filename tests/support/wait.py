"""The one polling helper of the tests: wait on a condition, never for a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

POLL_S = 0.02  # how often the condition is asked again

Condition = Callable[[], bool | Awaitable[bool]]


async def reached(pred: Condition, timeout: float) -> bool:  # noqa: ASYNC109
    """Whether ``pred`` (plain or async) became true within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(POLL_S)


async def until(pred: Condition, timeout: float = 30.0, what: str = "condition") -> None:  # noqa: ASYNC109
    """Wait until ``pred`` (plain or async) is true; fail the test after ``timeout`` seconds."""
    if not await reached(pred, timeout):
        raise AssertionError(f"{what} not reached in {timeout:g} s")


def until_blocking(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """:func:`until` for code without an event loop (fixtures around subprocesses, threads)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g} s")
        time.sleep(POLL_S)
