"""A simulated fleet and remediation rules for the Slurm remediation tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from agent.fleet import Fleet
from shared.config import NatsConfig
from tests.support.wait import until

HOSTS = 10


def rule_toml(name: str, match: list[str], mode: str, validate: Path | None = None) -> str:
    steps = '[[remediation.rule.step]]\nkind = "slurm_drain"\n'
    if validate is not None:
        script = (
            f"import sys; open({str(validate)!r} + '/' + sys.argv[1] + '.json', 'w').write(sys.stdin.read())"
        )
        steps += (
            '[[remediation.rule.step]]\nkind = "exec"\nwhen = "resolved"\ntimeout = "20s"\n'
            f"argv = {json.dumps([sys.executable, '-c', script, '{host}', '{node}'])}\n"
        )
        steps += '[[remediation.rule.step]]\nkind = "slurm_resume"\n'
    return f'[[remediation.rule]]\nname = "{name}"\nmatch = {json.dumps(match)}\nmode = "{mode}"\n{steps}'


@contextlib.asynccontextmanager
async def fleet_running(
    url: str,
    faults: list[str],
    duration: float,
    hosts: int = HOSTS,
    gpus: int = 2,
    known: Callable[[], Mapping[str, int]] | None = None,
) -> AsyncIterator[Fleet]:
    """The fleet running with ``faults`` (timed from its start) for ``duration`` s.

    ``known`` (the collector's hosts per provider): first the same fleet without faults runs
    until the collector has judged every host, so that the circuit breaker, which sizes a
    provider by the hosts it knows, sees the whole provider when the first fault comes (on a
    busy machine an XID at 1 s came through the fast path before most hosts' first samples
    were committed: "2 of 3 hosts")."""
    if known is not None:
        quiet = Fleet(NatsConfig(servers=(url,)), hosts=hosts, gpus=gpus, interval=0.5)
        await quiet.start()
        task = asyncio.create_task(quiet.run())
        try:
            await until(lambda: sum(known().values()) >= hosts, timeout=60, what="every host judged")
        finally:
            quiet.stop()
            await task
            await quiet.close()
    fleet = Fleet(NatsConfig(servers=(url,)), hosts=hosts, gpus=gpus, interval=0.5, faults=faults)
    await fleet.start()
    task = asyncio.create_task(fleet.run(duration=duration))
    try:
        yield fleet
    finally:
        fleet.stop()
        await task
        await fleet.close()
