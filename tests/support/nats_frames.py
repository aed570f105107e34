"""The frames a host published, read back from the stream."""

from __future__ import annotations

import nats

from shared.frames import EventFrame, InventoryFrame, SampleFrame, decode
from shared.subjects import STREAM


async def stream_frames(url: str, host: str) -> list[SampleFrame | EventFrame | InventoryFrame]:
    """Every frame of ``host`` stored in the stream, in stream order."""
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe(f"gpuwarden.v1.*.*.{host}", stream=STREAM)
        out = []
        while True:
            try:
                msgs = await sub.fetch(500, timeout=1)
            except TimeoutError:  # nats-py raises the builtin or its subclass
                return out
            out.extend(decode(m.data) for m in msgs)
    finally:
        await nc.close()
