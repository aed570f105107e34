"""What a simulated fleet published and what the collector stored, by (host, boot id, sequence)."""

from __future__ import annotations

import time
from collections import Counter

import asyncpg

from agent.fleet import Fleet
from agent.gpu.base import GpuEvent
from agent.sampler import build_event
from shared.config import NatsConfig
from shared.frames import encode

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


async def stored_at_least(dsn: str, n: int) -> bool:
    """At least ``n`` frames stored (counting copies, which the checks after it look for)."""
    return sum((await stored_keys(dsn)).values()) >= n


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


def publish_xid(fleet: Fleet, host: int, code: int = 79) -> str:
    """A fatal XID on a host's GPU 0, published as its agent does (urgent)."""
    h = fleet.hosts[host]
    uuid = h.backend.inventory().gpus[0].uuid
    frame = build_event(h.seqr, GpuEvent("xid", time.time(), "simulated", 0, uuid, xid=code), 1)
    fleet.publisher.publish(h.seqr.subjects[1], encode(frame), urgent=True)
    return h.seqr.host
