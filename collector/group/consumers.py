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

Pulling (the JetStream pull protocol, as nats.go's ``Consume``): a held bucket keeps long pull
requests (``expires`` :data:`EXPIRES`, idle heartbeats every :data:`HEARTBEAT`) waiting on its
consumer for up to :attr:`BucketConsumers.window` messages, delivered to an inbox subscription
of the bucket's own; the request is topped up when the messages asked for and not yet handed
to the ingest fall to half of that. A bucket a few frames a second arrive for costs one request
every ``EXPIRES`` instead of a request (two with nats-py's ``fetch``) per frame. Status replies:
a request that expired or ended early (408, 409 with ``Nats-Pending-Messages``) gives back
what it did not deliver; a consumer deleted (409, e.g. recreated at its floor by a taker) or a
leadership change is asked again at once; no consumer at all (503) is bound again (created).
Heartbeats missing for two periods, or a reconnection, count every request lost: asked again.
Stopping a bucket unsubscribes its inbox, so requests still waiting at the server deliver to
nobody (nats-server drops a pull request whose reply has no interest) rather than to a member
that no longer holds the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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


EXPIRES = 30.0  # s a pull request waits at the server for its messages
HEARTBEAT = 5.0  # s between the server's idle heartbeats to a waiting request
WATCH = 1.0  # s between checks: binding, missed heartbeats, reconnections
STRAY = -1  # the buffer's key of the stray consumer's messages (no bucket)
STATUS, DESCRIPTION, PENDING = "Status", "Description", "Nats-Pending-Messages"


class _Pull:
    """The pull state of one held bucket."""

    __slots__ = ("asked", "bound", "buffered", "next", "seen", "sub")

    def __init__(self, next_subject: str) -> None:
        self.next = next_subject  # the consumer's $JS.API.CONSUMER.MSG.NEXT subject
        self.sub: Subscription | None = None  # the bucket's inbox (None: consumer not bound yet)
        self.bound = False
        self.asked = 0  # messages requested and neither delivered nor given back by the server
        self.buffered = 0  # delivered, not yet handed to the ingest
        self.seen = 0.0  # monotonic time of the last message or status from the server


class BucketConsumers:
    """The pull requests of the buckets held, feeding one buffer of messages."""

    def __init__(self, nc: NatsClient, cfg: CollectorConfig) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.cfg = cfg
        c = cfg.collector
        self.window = max(16, c.batch // 4)  # messages asked for per bucket: delivered + in flight
        self.pulls: dict[int, _Pull] = {}
        self.buffer: deque[tuple[int, Msg]] = deque()
        self._ready = asyncio.Event()
        self.redo: dict[int, int] = {}  # bucket -> stream seq up to which copies are judged again
        self._resume: dict[int, int] = {}  # bucket -> stream seq a cut-short recreation resumes at
        self._rebind: set[int] = set()  # buckets whose consumer was found missing (503)
        self._reconnects = nc.stats["reconnects"]
        self._watch: asyncio.Task[None] | None = None
        self.recreated = 0
        self.requests = 0  # pull requests sent (tests, benchmarks)

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
        after a node's loss), binding is retried every :data:`WATCH` s until it succeeds: a held
        bucket is never left unconsumed."""
        if bucket in self.pulls:
            return
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watcher(), name="bucket-pulls")
        name = consumer_name(self.cfg.collector.durable, bucket)
        st = self.pulls[bucket] = _Pull(f"{self.js._prefix}.CONSUMER.MSG.NEXT.{STREAM}.{name}")
        try:
            await self._bind(bucket)
        except (nats.errors.Error, TimeoutError) as e:
            log.warning("bucket %d: consumer not bound yet (retrying): %s", bucket, e)
            return
        if self.pulls.get(bucket) is not st:  # stopped meanwhile
            return
        await self._subscribe(bucket, st)

    async def _bind(self, bucket: int) -> None:
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
        self._resume.pop(bucket, None)

    async def _subscribe(self, bucket: int, st: _Pull) -> None:
        async def deliver(msg: Msg) -> None:
            if self.pulls.get(bucket) is not st:
                return  # stopped: unread, delivered again to the bucket's next holder
            st.seen = time.monotonic()
            headers = msg.headers
            if headers and (status := headers.get(STATUS)):
                await self._status(bucket, st, status, headers)
                return
            st.asked -= 1
            st.buffered += 1
            self.buffer.append((bucket, msg))
            self._ready.set()

        st.sub = await self.nc.subscribe(self.nc.new_inbox(), cb=deliver)
        st.bound = True
        st.seen = time.monotonic()
        log.debug("bucket %d: consumer bound", bucket)
        await self._top_up(bucket, st)

    async def _status(self, bucket: int, st: _Pull, status: str, headers: dict[str, str]) -> None:
        if status == "100":  # idle heartbeat
            return
        if status in ("408", "409") and PENDING in headers:  # a request ended: what it left
            with contextlib.suppress(ValueError):
                st.asked = max(st.asked - int(headers[PENDING]), 0)
                await self._top_up(bucket, st)
                return
        if status == "503":  # no responders: the consumer does not exist (deleted, not recreated)
            self._rebind.add(bucket)
            st.asked = 0
            return
        # consumer deleted (a taker recreated it at its floor: same name), leadership change,
        # a request refused (max waiting): every request of the bucket counts lost, asked again
        # by the watcher (within WATCH s: several such replies at once make one request)
        log.debug("bucket %d: pull status %s %s", bucket, status, headers.get(DESCRIPTION, ""))
        st.asked = 0

    async def _top_up(self, bucket: int, st: _Pull) -> None:
        """Ask for more once the messages asked for and not yet handed out fall to half the
        window (a request per half window, not per message)."""
        want = self.window - st.asked - st.buffered
        if st.sub is None or want < self.window // 2 or bucket in self._rebind:
            return
        request = {"batch": want, "expires": int(EXPIRES * 1e9), "idle_heartbeat": int(HEARTBEAT * 1e9)}
        try:
            await self.nc.publish(st.next, json.dumps(request).encode(), reply=st.sub.subject)
        except nats.errors.Error as e:  # not asked: the watcher tries again
            log.debug("bucket %d: pull request not sent: %s", bucket, e)
            return
        st.asked += want
        self.requests += 1

    async def _watcher(self) -> None:
        """Every :data:`WATCH` s: bind what is not bound, ask again where requests were lost."""
        while True:
            await asyncio.sleep(WATCH)
            try:
                await self._watch_once()
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                return
            except (nats.errors.Error, TimeoutError) as e:
                log.debug("bucket pulls: %s", e)

    async def _watch_once(self) -> None:
        reconnected = self.nc.stats["reconnects"] != self._reconnects
        self._reconnects = self.nc.stats["reconnects"]
        now = time.monotonic()
        for bucket, st in list(self.pulls.items()):
            if self.pulls.get(bucket) is not st:
                continue
            if not st.bound or bucket in self._rebind:
                try:
                    await self._bind(bucket)
                except (nats.errors.Error, TimeoutError) as e:
                    log.debug("bucket %d: consumer not bound yet: %s", bucket, e)
                    continue
                self._rebind.discard(bucket)
                if self.pulls.get(bucket) is not st:
                    continue
                if st.sub is None:
                    await self._subscribe(bucket, st)
                    continue
            if reconnected or (st.asked and now - st.seen > 2 * HEARTBEAT + WATCH):
                st.asked = 0  # the server lost our requests (or we its replies): ask again
                st.seen = now
            await self._top_up(bucket, st)

    async def stop(self, bucket: int) -> None:
        st = self.pulls.pop(bucket, None)
        self.redo.pop(bucket, None)
        self._resume.pop(bucket, None)
        self._rebind.discard(bucket)
        if st is None:
            return
        if st.buffered:  # unread: left unacknowledged for the next holder
            self.buffer = deque(item for item in self.buffer if item[0] != bucket)
        if st.sub is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await asyncio.wait_for(st.sub.unsubscribe(), 2.0)

    async def close(self) -> None:
        for b in list(self.pulls):
            await self.stop(b)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    def hand(self, msgs: list[Msg]) -> None:
        """Messages of the stray consumer (:mod:`collector.group.stray`), fetched with the rest."""
        if msgs:
            self.buffer.extend((STRAY, m) for m in msgs)
            self._ready.set()

    def judged_again(self, bucket: int | None, stream_seq: int | None) -> bool:
        """A copy of this message is judged again (see the module doc)."""
        if bucket is None or stream_seq is None:
            return False
        return stream_seq <= self.redo.get(bucket, 0)

    async def fetch(self, batch: int, wait: float) -> list[Msg]:
        """Up to ``batch`` messages of any held bucket (waits up to ``wait`` s for the first)."""
        if not self.buffer:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), wait)
            except TimeoutError:
                return []
        out: list[Msg] = []
        taken: dict[int, int] = {}
        while self.buffer and len(out) < batch:
            bucket, m = self.buffer.popleft()
            out.append(m)
            taken[bucket] = taken.get(bucket, 0) + 1
        for bucket, k in taken.items():
            st = self.pulls.get(bucket)
            if st is not None:
                st.buffered -= k
                await self._top_up(bucket, st)
        return out
