"""Helpers for the benchmarks: the gpuwarden command and stream counts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpuwarden_cmd(*args: str) -> list[str]:
    """The ``gpuwarden`` command (as ``python -m gpuwarden``, which needs no install)."""
    return [sys.executable, "-m", "gpuwarden", *args]


def spawn(*args: str, stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        gpuwarden_cmd(*args), cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE, start_new_session=True
    )


def stream_count(url: str, subject: str) -> int:
    """Messages stored in the GPUWARDEN stream under ``subject`` (wildcards allowed)."""

    async def count() -> int:
        import nats

        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("GPUWARDEN", subjects_filter=subject)
            return sum((info.state.subjects or {}).values())
        finally:
            await nc.close()

    return asyncio.run(count())
