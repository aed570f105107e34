"""shared.tasks: cancel_all and stop_on_signals, on the real event loop and real signals."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from shared.tasks import STOP_SIGNALS, cancel_all, stop_on_signals


async def test_cancel_all_cancels_every_task_and_waits_for_it() -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append(name)

    tasks = [asyncio.create_task(forever(n)) for n in ("a", "b", "c")]
    await asyncio.sleep(0)
    await cancel_all(iter(tasks))  # any iterable, consumed once
    assert sorted(ended) == ["a", "b", "c"]
    assert all(t.cancelled() for t in tasks)


async def test_cancel_all_raises_what_a_task_ended_with() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="boom"):
        await cancel_all([task])


async def test_stop_on_signals_calls_stop_then_removes_its_handlers() -> None:
    loop = asyncio.get_running_loop()
    got: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        stopped = asyncio.Event()
        with stop_on_signals(stopped.set):
            os.kill(os.getpid(), sig)
            await asyncio.wait_for(stopped.wait(), 5)
            got.append(sig)
        assert not loop.remove_signal_handler(sig)  # already removed on leaving
    assert got == list(STOP_SIGNALS)


async def test_stop_on_signals_disabled_installs_nothing() -> None:
    loop = asyncio.get_running_loop()
    with stop_on_signals(lambda: None, enabled=False):
        assert not any(loop.remove_signal_handler(sig) for sig in STOP_SIGNALS)
