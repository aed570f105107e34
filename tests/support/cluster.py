"""What a simulated fleet published and what the collector stored, by (host, boot id, sequence)."""

from __future__ import annotations

from collections import Counter

import asyncpg

from agent.fleet import Fleet
from shared.config import NatsConfig

Key = tuple[str, str, int]  # host, boot id, sequence


def published_keys(fleet: Fleet) -> set[Key]:
    """Every frame the fleet made: each host numbers its frames 1, 2, ... (one sequence)."""
    return {(h.seqr.host, h.seqr.boot_id, n) for h in fleet.hosts for n in range(1, h.seqr.seq + 1)}


async def stored_keys(dsn: str) -> Counter[Key]:
    """Each stored frame (sample, event, inventory report) by host, boot id and sequence."""
    c = await asyncpg.connect(dsn)
    try:
        rows = await c.fetch(
            "SELECT h.name, k.boot_id, k.seq FROM ("
            " SELECT host_id, boot_id, seq FROM host_samples"
            " UNION ALL SELECT host_id, boot_id, seq FROM events"
            " UNION ALL SELECT host_id, boot_id, seq FROM inventory_reports) k"
            " JOIN hosts h ON h.id = k.host_id"
        )
    finally:
        await c.close()
    return Counter((r["name"], r["boot_id"], r["seq"]) for r in rows)


STREAM_BYTES = 256 << 20  # three nodes share this machine's disk: no automatic sizing


def cluster_nats(urls: list[str], **extra: object) -> NatsConfig:
    """``[nats]`` of the agents: every node, three replicas, quick reconnects, a large buffer."""
    opts: dict[str, object] = {
        "servers": tuple(urls),
        "stream_replicas": 3,
        "stream_max_bytes": STREAM_BYTES,
        "reconnect_wait": 0.2,
        "reconnect_wait_max": 1.0,
        "buffer_frames": 200_000,
        "publish_timeout": 2.0,
    }
    return NatsConfig(**(opts | extra))  # type: ignore[arg-type]
