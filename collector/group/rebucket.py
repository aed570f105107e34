"""Frames stored before the stream had the group's subject transform carry no bucket token.

No bucket consumer (``gpuwarden.v1.*.*.*.<bucket>``) reads them: the frames agents published
before the first member gave the stream its transform (:func:`collector.stream.partition`):
those of a collector that ran alone before (its backlog at the switch), or of agents that
created the stream and published before any collector started. Every member drains them:
a durable consumer ``<durable>-unbucketed``, shared by the members, filters the five-token
subjects ``gpuwarden.v1.*.*.*`` (after the transform every stored subject has six), and each
of its messages is published again to its subject, where the transform stores it under its
host's bucket for that bucket's holder, then acknowledged. Publishing one twice (a member
killed between the publish and the acknowledgement) stores a copy, which the writer drops.
The drain ends when the consumer has nothing left; the consumer stays, so that its
acknowledgement floor keeps what was moved (a new one would move them all again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.subjects import PREFIX, STREAM

log = logging.getLogger(__name__)

UNBUCKETED = f"{PREFIX}.*.*.*"  # a frame's subject as published, stored before the transform


def consumer_name(durable: str) -> str:
    return f"{durable}-unbucketed"


async def drain(js: JetStreamContext, durable: str, batch: int, wait: float = 1.0) -> int:
    """Move every unbucketed frame under its bucket; returns how many were moved here. A NATS
    call that fails (e.g. a timeout while a cluster elects a leader) is tried again."""
    moved = 0
    while True:
        try:
            moved += await _drain(js, durable, batch, wait)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            return moved  # the collector is stopping: nothing to retry on this connection
        except (nats.errors.Error, TimeoutError) as e:
            log.warning("group: moving unbucketed frames failed (retrying): %s", e)
            await asyncio.sleep(1.0)
            continue
        if moved:
            log.info("group: %d frames stored before the bucket transform moved under their buckets", moved)
        return moved


async def _drain(js: JetStreamContext, durable: str, batch: int, wait: float) -> int:
    name = consumer_name(durable)
    config = ConsumerConfig(
        durable_name=name,
        filter_subject=UNBUCKETED,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=60.0,
        max_ack_pending=batch,
        description="gpuwarden collector group: frames stored before the bucket transform",
    )
    try:
        await js.add_consumer(STREAM, config)
    except nats.js.errors.BadRequestError as e:
        log.debug("consumer %s exists with other settings, using it as is: %s", name, e)
    sub = await js.pull_subscribe_bind(durable=name, stream=STREAM)
    moved = 0
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=wait)
            except (TimeoutError, nats.errors.TimeoutError):
                info = await js.consumer_info(STREAM, name)
                if not info.num_pending and not info.num_ack_pending:
                    return moved
                continue
            # stored again (the transform adds the bucket), then acknowledged here
            await asyncio.gather(*(js.publish(m.subject, m.data) for m in msgs))
            await asyncio.gather(*(m.ack() for m in msgs))
            moved += len(msgs)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
