"""One durable JetStream consumer per bucket; a member pulls only from the buckets it holds.

Consumer ``<durable>-b<bucket>`` filters ``gpuwarden.v1.*.*.*.<bucket>`` (the stream stores
frames under their bucket, :func:`collector.stream.bucket_transform`): the group reads the
stream once between its members, whoever holds which bucket. Its acknowledgement floor is
the bucket's progress, so the member that takes a bucket over continues where the previous
owner's last committed batch ended.

Taking a bucket over: when the consumer still has messages delivered but not acknowledged (the
previous owner died with a batch in hand, or was paused), waiting for ``ack_wait`` would delay
them; the consumer is recreated at its acknowledgement floor instead, and the messages up to
what was delivered are marked *redone*: the previous owner may have stored them (the writer
drops the copies) without having judged them, so the new owner judges them even when they are
copies (:attr:`BucketConsumers.redo`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from collector.config import CollectorConfig
from shared.subjects import PREFIX, STREAM

log = logging.getLogger(__name__)


def consumer_name(durable: str, bucket: int) -> str:
    return f"{durable}-b{bucket}"


def bucket_filter(bucket: int) -> str:
    return f"{PREFIX}.*.*.*.{bucket}"


def bucket_of_subject(subject: str) -> int | None:
    _, _, last = subject.rpartition(".")
    return int(last) if last.isdigit() else None


class BucketConsumers:
    """The pull subscriptions of the buckets held, feeding one queue of messages."""

    def __init__(self, js: JetStreamContext, cfg: CollectorConfig) -> None:
        self.js = js
        self.cfg = cfg
        c = cfg.collector
        self.queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=max(c.batch * 2, 100))
        self.subs: dict[int, JetStreamContext.PullSubscription] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.redo: dict[int, int] = {}  # bucket -> stream seq up to which copies are judged again
        self._resume: dict[int, int] = {}  # bucket -> stream seq a cut-short recreation resumes at
        self.recreated = 0

    def config(self, bucket: int, start_seq: int = 0) -> ConsumerConfig:
        c = self.cfg.collector
        return ConsumerConfig(
            durable_name=consumer_name(c.durable, bucket),
            filter_subject=bucket_filter(bucket),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_seq else DeliverPolicy.ALL,
            opt_start_seq=start_seq or None,
            ack_wait=c.ack_wait,
            max_deliver=c.max_deliver,
            max_ack_pending=max(c.max_ack_pending // 8, c.batch),
            max_waiting=4,
            description=f"gpuwarden collector group, bucket {bucket}",
        )

    async def start(self, bucket: int) -> None:
        """Bind (creating, or recreating at its floor) the bucket's consumer and pull from it.
        When a JetStream call fails (e.g. it times out while the cluster elects a new leader
        after a node's loss), the bucket's task retries until it binds: a held bucket is never
        left unconsumed."""
        if bucket in self.tasks:
            return
        sub: JetStreamContext.PullSubscription | None = None
        try:
            sub = await self._bind(bucket)
        except (nats.errors.Error, TimeoutError) as e:
            log.warning("bucket %d: consumer not bound yet (retrying): %s", bucket, e)
        self.tasks[bucket] = asyncio.create_task(self._pull(bucket, sub), name=f"pull-b{bucket}")

    async def _bind(self, bucket: int) -> JetStreamContext.PullSubscription:
        name = consumer_name(self.cfg.collector.durable, bucket)
        try:
            info = await self.js.consumer_info(STREAM, name)
        except nats.js.errors.NotFoundError:
            # (a recreation cut short after the delete resumes at the floor it read)
            await self.js.add_consumer(STREAM, self.config(bucket, self._resume.get(bucket, 0)))
        else:
            if info.num_ack_pending:
                floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
                delivered = info.delivered.stream_seq if info.delivered is not None else 0
                self._resume[bucket] = (floor or 0) + 1
                await self.js.delete_consumer(STREAM, name)
                await self.js.add_consumer(STREAM, self.config(bucket, (floor or 0) + 1))
                self.redo[bucket] = delivered or 0
                self.recreated += 1
                log.info(
                    "bucket %d: consumer recreated at its floor (stream seq %s; %d in flight)",
                    bucket, floor, info.num_ack_pending,
                )  # fmt: skip
        sub = await self.js.pull_subscribe_bind(durable=name, stream=STREAM)
        self._resume.pop(bucket, None)
        self.subs[bucket] = sub
        return sub

    async def stop(self, bucket: int) -> None:
        task = self.tasks.pop(bucket, None)
        sub = self.subs.pop(bucket, None)
        self.redo.pop(bucket, None)
        self._resume.pop(bucket, None)
        if task is not None:  # bounded: a pull stuck in the client must not hold a rebalance
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2.0)
            if not done:
                log.warning("bucket %d: its pull did not stop within 2 s (left to finish)", bucket)
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await asyncio.wait_for(sub.unsubscribe(), 2.0)

    async def close(self) -> None:
        for b in list(self.tasks):
            await self.stop(b)

    def judged_again(self, bucket: int | None, stream_seq: int | None) -> bool:
        """A copy of this message is judged again (see the module doc)."""
        if bucket is None or stream_seq is None:
            return False
        return stream_seq <= self.redo.get(bucket, 0)

    async def _pull(self, bucket: int, sub: JetStreamContext.PullSubscription | None) -> None:
        c = self.cfg.collector
        while sub is None:
            await asyncio.sleep(1.0)
            try:
                sub = await self._bind(bucket)
            except (nats.errors.Error, TimeoutError) as e:
                log.debug("bucket %d: consumer not bound yet: %s", bucket, e)
        log.debug("bucket %d: consumer bound", bucket)
        while True:
            try:
                msgs = await sub.fetch(c.batch, timeout=c.fetch_timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                return
            except nats.errors.Error as e:
                log.debug("bucket %d: fetch failed: %s", bucket, e)
                await asyncio.sleep(0.5)
                continue
            for m in msgs:
                await self.queue.put(m)

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        """Up to ``batch`` messages of any held bucket (waits up to ``wait`` s for the first)."""
        try:
            first = await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            return []
        out = [first]
        while len(out) < batch:
            try:
                out.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return out
