"""Messages of a collector group's stream on subjects of no frame's shape: read, then rejected.

The stream stores what is published under ``gpuwarden.v1.<kind>.>``; its transform gives a
bucket only to the five-token subjects (``gpuwarden.v1.*.*.*``), and the bucket consumers read
only ``gpuwarden.v1.*.*.*.<bucket>``. A message on a subject with four tokens
(``gpuwarden.v1.sample.p``) or seven and more is stored as published and read by none of them.
One durable consumer ``<durable>-stray``, shared by the members, filters exactly those shapes
(``filter_subjects``, nats-server >= 2.10): ``gpuwarden.v1.*.*`` and ``gpuwarden.v1.*.*.*.*.>``,
so it never re-reads a frame. Each member pulls from it and hands what it gets to its ingest,
which rejects it as a collector alone does (``bad_subject``: counted, logged, recorded in
``rejected_frames``) and acknowledges it once that is committed.

Not read: six tokens whose last is not a bucket number (``gpuwarden.v1.sample.p.h.x``). NATS
filters cannot say "not a number", and a consumer on every six-token subject would read the
whole stream a second time (docs/ingest.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.subjects import PREFIX, STREAM

log = logging.getLogger(__name__)

FILTERS = (f"{PREFIX}.*.*", f"{PREFIX}.*.*.*.*.>")  # four tokens; seven and more


def consumer_name(durable: str) -> str:
    return f"{durable}-stray"


def is_stray(subject: str) -> bool:
    """A subject the stray consumer delivers, not a bucket consumer (those have six tokens)."""
    return subject.count(".") != 5


def config(durable: str, batch: int, ack_wait: float, max_deliver: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(durable),
        filter_subjects=list(FILTERS),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=batch,  # flow control: no more until the ingest acknowledged these
        description="gpuwarden collector group: messages on subjects of no frame's shape",
    )


async def pull(js: JetStreamContext, cfg: ConsumerConfig, hand: Callable[[list[Msg]], None]) -> None:
    """Pull the stray consumer until cancelled, handing each batch to ``hand``. A NATS call that
    fails (e.g. a timeout while a cluster elects a leader) is tried again a second later."""
    while True:
        try:
            await _pull(js, cfg, hand)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
            return  # the collector is stopping
        except (nats.errors.Error, TimeoutError) as e:
            log.warning("group: reading messages of no frame's shape failed (retrying): %s", e)
            await asyncio.sleep(1.0)


async def _pull(js: JetStreamContext, cfg: ConsumerConfig, hand: Callable[[list[Msg]], None]) -> None:
    name = cfg.durable_name
    assert name is not None
    try:
        await js.add_consumer(STREAM, cfg)
    except nats.js.errors.BadRequestError as e:
        log.debug("consumer %s exists with other settings, using it as is: %s", name, e)
    sub = await js.pull_subscribe_bind(durable=name, stream=STREAM)
    try:
        while True:
            try:
                msgs = await sub.fetch(cfg.max_ack_pending or 1, timeout=5.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            hand(msgs)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
