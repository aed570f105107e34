"""Lossless ingest: a durable JetStream pull consumer feeding the batch writer.

One loop, one batch in memory: fetch up to ``batch`` messages, check each (:func:`check`),
write the good frames and the rejections in one transaction, and only after the commit
acknowledge each message of the batch (explicit acks: an *ack all* policy would let a restarted
collector acknowledge what a killed one had fetched but never stored). While PostgreSQL is
down the loop retries the same batch with exponential backoff and fetches nothing more:
JetStream keeps the rest. A crash at any
moment loses nothing (unacknowledged messages are redelivered) and stores nothing twice
(the writer is idempotent on host, boot id and sequence).

Partitions: collector ``I`` of ``N`` owns the hosts whose subject token ``t`` has
``zlib.crc32(t.encode()) % N == I``; its durable consumer ``<durable>-<I>of<N>`` sees the
whole stream and acknowledges other partitions' messages unread. See ``docs/ingest.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from collector import stream
from collector.config import CollectorConfig
from collector.group import rebucket, stray
from collector.group.assign import bucket_of
from collector.group.consumers import BucketConsumers, bucket_of_subject
from collector.ratelimit import RATE_LIMITED, HostRateLimit
from collector.static import StaticFacts
from collector.store import db
from collector.store.rows import I64_MAX
from collector.store.writer import Accepted, Rejection, Writer, WriteResult
from shared.errors import FrameDecodeError, SubjectError
from shared.frames import Frame, decode_partial, replace
from shared.ratelog import RateLimitedLog
from shared.subjects import STREAM, ParsedSubject, parse_subject, sanitize_token, strip_bucket
from shared.tasks import cancel_all

log = logging.getLogger(__name__)
HEAD_BYTES: Final = 64
ROLLUP_RETRY_S: Final = 5.0
LINGER_FETCH_TIMEOUT: Final = 0.02  # the fetch after a linger: an empty stream is not waited on
CHECK_CHUNK: Final = 16  # messages checked between two turns of the event loop (~2 ms of CPU)
Hook = Callable[[Sequence[Frame]], Awaitable[None]]


def owner(host_token: str, partitions: int) -> int:
    """The partition that owns a host, from its subject token (deterministic everywhere)."""
    return zlib.crc32(host_token.encode("utf-8")) % partitions


def subject_partition(subject: str, partitions: int) -> int:
    """The partition that handles a message: its host's, or a hash of the whole subject."""
    if partitions == 1:
        return 0
    parts = strip_bucket(subject).split(".")
    token = parts[4] if len(parts) == 5 else subject
    return owner(token, partitions)


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    oldest_ts: float  # frames older than this would land in a dropped partition
    newest_ts: float  # frames newer than this are from a broken clock
    buckets: int = 0  # a group's buckets: a subject's bucket token must be its host's (0: unchecked)


def check(subject: str, data: bytes, limits: Limits, stream_seq: int | None = None) -> Accepted | Rejection:
    """Decode and verify one message: valid frame, subject agrees, storable key, sane time.

    Never raises: whatever goes wrong checking one message rejects that message
    (``internal_error`` for an exception no check names).
    """
    try:
        return _check(subject, data, limits, stream_seq)
    except Exception as e:  # noqa: BLE001 (one message must never stop the collector)
        return Rejection(
            subject,
            "internal_error",
            None,
            len(data),
            bytes(data[:HEAD_BYTES]),
            stream_seq,
            f"{type(e).__name__}: {e}"[:500],
        )


SubjectVerdict = ParsedSubject | tuple[str, str | None, str]  # parsed, or (reason, field, message)
SUBJECT_VERDICTS: Final = 65_536  # subjects whose verdict is remembered (all forgotten when full)
_verdicts: dict[tuple[str, int], SubjectVerdict] = {}


def subject_verdict(subject: str, buckets: int) -> SubjectVerdict:
    """The subject's checks (:func:`judge_subject`), remembered: a fleet publishes on a few
    subjects per host, each checked once, not once per frame (~3 µs of each frame's check)."""
    key = (subject, buckets)
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = judge_subject(subject, buckets)
        if len(_verdicts) >= SUBJECT_VERDICTS:  # subjects made up by a hostile publisher: bounded
            _verdicts.clear()
        _verdicts[key] = verdict
    return verdict


def judge_subject(subject: str, buckets: int) -> SubjectVerdict:
    """A frame subject's parts, or why it is rejected (``bad_subject``: field, message)."""
    bare = strip_bucket(subject)
    try:
        parsed = parse_subject(bare)
    except SubjectError as e:
        return ("bad_subject", None, str(e))
    for name, token in (("host", parsed.host), ("provider", parsed.provider)):
        try:
            canonical = sanitize_token(token) == token
        except SubjectError:
            canonical = False
        if not canonical:
            return ("bad_subject", name, f"subject {name} token {token[:80]!r} is not canonical")
    if buckets and len(bare) != len(subject):  # a group's stored subject: <host>.<bucket>
        token, want = subject[len(bare) + 1 :], bucket_of(parsed.host, buckets)
        if token != str(want):  # published under another bucket: its holder is not the host's owner
            host = parsed.host[:80]
            why = f"bucket token {token[:20]} is not host {host!r}'s: {want} of {buckets}"
            return ("bad_subject", "bucket", why)
    return parsed


def _check(subject: str, data: bytes, limits: Limits, stream_seq: int | None) -> Accepted | Rejection:
    def reject(reason: str, fld: str | None, message: str) -> Rejection:
        return Rejection(subject, reason, fld, len(data), bytes(data[:HEAD_BYTES]), stream_seq, message)

    parsed = subject_verdict(subject, limits.buckets)
    if type(parsed) is tuple:
        return reject(*parsed)
    assert type(parsed) is ParsedSubject
    try:
        frame, dropped = decode_partial(data, limits.max_bytes)
    except FrameDecodeError as e:
        return reject(e.reason, e.field, str(e))
    if parsed.kind != frame.kind:
        return reject("spoofed", "kind", f"{frame.kind} frame on a {parsed.kind} subject")
    for name, token in (("host", parsed.host), ("provider", parsed.provider)):
        value: str = getattr(frame, name)
        if value == token:
            continue
        try:
            same = sanitize_token(value) == token
        except SubjectError:
            same = False
        if same:  # the same name, not in its one canonical form: it would be another host
            why = f"{name} {value[:80]!r} is not exactly the subject token {token!r}"
            return reject("not_canonical", name, why)
        return reject("spoofed", name, f"{name} {value[:80]!r} disagrees with subject token {token!r}")
    if "\x00" in frame.boot_id or not frame.boot_id:
        return reject("bad_type", "boot_id", "boot_id must be a non-empty string without NUL")
    if frame.seq > I64_MAX:
        return reject("out_of_range", "seq", f"{frame.seq} exceeds the signed 64-bit storage range")
    if not limits.oldest_ts <= frame.ts <= limits.newest_ts:
        return reject("ts_out_of_window", "ts", f"timestamp {frame.ts} outside the stored window")
    return Accepted(
        frame,
        subject,
        stream_seq,
        len(data),
        bytes(data[:HEAD_BYTES]),
        tuple((e.reason, e.field) for e in dropped),
    )


@dataclass(slots=True)
class Batch:
    """Fetched messages, checked: what to store and what to reject."""

    msgs: Sequence[Msg]
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    poison: set[int] = field(default_factory=set)  # ids of the messages to terminate, not ack
    mine: list[Msg] = field(default_factory=list)  # group mode: the messages of buckets held
    stray: list[Msg] = field(default_factory=list)  # ... and those of no bucket (rejected, acked)
    held: dict[int, int] = field(default_factory=dict)  # ... bucket -> its fencing token, when checked
    redo: set[int] = field(default_factory=set)  # group mode: ids of messages judged again
    redo_frames: set[int] = field(default_factory=set)  # ... and of their frames


@dataclass(slots=True)
class IngestStats:
    """The ingest's own figures (read by the metrics collector at scrape time)."""

    frames_in: int = 0
    frames_stored: int = 0
    gpu_samples_stored: int = 0
    duplicates: int = 0
    # deliveries of a message NATS delivered before (not acknowledged within ack_wait, a nak, or
    # a bucket's previous holder gone with it): checked and judged again, stored once
    redelivered: int = 0
    skipped_other_partition: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    gpu_entries_rejected: Counter[str] = field(default_factory=Counter)  # GPU entries dropped, by reason
    samples_unjoined: int = 0  # v2 samples accepted before any inventory of their host (StaticFacts.unjoined)
    hook_errors: int = 0  # a hook (state, health) raised on a committed batch
    batches: int = 0
    last_batch_size: int = 0
    last_write_s: float = 0.0
    last_commit_lag_s: float = 0.0  # oldest message of the last batch: stream time to commit
    consumer_pending: int = 0  # messages waiting in the stream for this consumer
    stream_lost: int = 0  # messages the stream dropped (full, or aged out) before we got them
    stream_max_bytes: int = -1  # the stream's size limit, as reconciled at start
    db_errors: int = 0
    db_up: bool = True
    db_down_since: float | None = None  # wall time of the first failed write of this outage
    writing_since: float | None = None  # stream time of the oldest frame of the batch being written
    unjudged_since: float | None = None  # ... of the batch being written or judged (None: all judged)
    last_commit_at: float = 0.0  # wall time of the last committed batch
    last_newest_lag_s: float = 0.0  # the last batch's newest message: stream time to commit (caught up?)


def stream_config(cfg: CollectorConfig) -> StreamConfig:
    return stream.stream_config(cfg.nats)


def consumer_name(cfg: CollectorConfig) -> str:
    c = cfg.collector
    return f"{c.durable}-{c.partition}of{c.partitions}"


class Ingest:
    """The consume → check → write → ack loop of one collector partition."""

    def __init__(self, cfg: CollectorConfig, writer: Writer, on_batch: Hook | None = None) -> None:
        self.cfg = cfg
        self.writer = writer
        self.on_batch = on_batch  # called with each committed batch of new frames (collector.wiring)
        self.stats = IngestStats()
        self.rate_limit = HostRateLimit(cfg.collector.host_rate, cfg.collector.host_burst)
        self._rl = RateLimitedLog(log)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stop = asyncio.Event()
        self._stop_at = 0.0
        self.gaps = stream.StreamGaps()
        self._rollups_retry_at = 0.0  # after a failed rollup write, the next try waits (PostgreSQL down)
        self.static = StaticFacts()  # GPUs' static facts from inventories, joined into v2 samples
        # a collector group member (docs/operations.md): pulls from the buckets it holds only
        self.source: BucketConsumers | None = None
        self.tokens: Callable[[], Mapping[int, int]] | None = None  # buckets held -> fencing token
        self.unbucketed: asyncio.Task[int] | None = None  # collector.group.rebucket
        self.strays: asyncio.Task[None] | None = None  # collector.group.stray
        self.buckets = 1  # the group's buckets (group mode)

    async def setup_group(
        self, nc: NatsClient, buckets: int, tokens: Callable[[], Mapping[int, int]]
    ) -> None:
        """Group mode: reconcile the stream, store frames by bucket; consumers are started and
        stopped per bucket (:class:`collector.group.consumers.BucketConsumers`) as leases move.
        Messages are acknowledged after the hooks ran (judged and persisted), and only those of
        buckets held all along (the same lease, ``tokens``: bucket -> fencing token of the buckets
        held now): a member killed in between, or that lost the bucket meanwhile (its frames were
        then not judged, nor their changes written), leaves them to the next holder, which judges
        them again."""
        js = nc.jetstream()

        async def settle() -> None:
            self.stats.stream_max_bytes = (await stream.reconcile(js, self.cfg.nats)).max_bytes
            await stream.partition(js, buckets)

        await stream.settle(settle)
        self.source = BucketConsumers(nc, self.cfg)
        self.tokens = tokens
        # frames stored before the transform (none once moved): published again under their bucket
        self.unbucketed = asyncio.create_task(
            rebucket.drain(js, self.cfg.collector.durable, self.cfg.collector.batch), name="rebucket"
        )
        c = self.cfg.collector
        self.strays = asyncio.create_task(
            stray.pull(js, stray.config(c.durable, c.batch, c.ack_wait, c.max_deliver), self.source.hand),
            name="stray",
        )
        self.buckets = buckets

    async def _fetch(self, n: int, wait: float) -> list[Msg]:
        if self.source is not None:
            return await self.source.fetch(n, wait)
        assert self._sub is not None
        return await self._sub.fetch(n, timeout=wait)

    async def setup(self, nc: NatsClient) -> None:
        """Create or reconcile the stream (:func:`collector.stream.reconcile`), create/bind the
        durable consumer, and start counting the stream's losses from where it stands."""
        js = nc.jetstream()
        c = self.cfg.collector
        name = consumer_name(self.cfg)
        config = ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=c.ack_wait,
            max_deliver=c.max_deliver,
            max_ack_pending=max(c.max_ack_pending, c.batch),
            max_waiting=16,
            description=f"gpuwarden collector partition {c.partition} of {c.partitions}",
        )

        async def prepare() -> tuple[int, int]:  # idempotent: retried by stream.settle
            self.stats.stream_max_bytes = (await stream.reconcile(js, self.cfg.nats)).max_bytes
            try:
                await js.add_consumer(STREAM, config)
            except nats.js.errors.BadRequestError as e:
                log.warning("consumer %s exists with other settings, using it as is: %s", name, e)
            delivered = (await js.consumer_info(STREAM, name)).delivered.stream_seq or 0
            return delivered, (await js.stream_info(STREAM)).state.first_seq or 1

        delivered, first = await stream.settle(prepare)
        self._sub = await js.pull_subscribe_bind(durable=name, stream=STREAM)
        task_free_fetch(self._sub)
        self.gaps = stream.StreamGaps(delivered or first - 1)  # a new consumer starts at the first

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
            self._stop.set()

    async def run(self) -> None:
        """Consume until :meth:`stop`; the batch being written is finished (written, acked).

        Pipelined: while batch N is being written, batch N+1 is fetched and checked, so at
        most two batches are in memory; N+1 is written only after N is committed and acked.
        """
        assert self._sub is not None or self.source is not None, "setup() first"
        c = self.cfg.collector
        writing: asyncio.Task[WriteResult | None] | None = None
        try:
            while not self._stop.is_set():
                try:
                    msgs = await self._fetch(c.batch, c.fetch_timeout)
                except (TimeoutError, nats.errors.TimeoutError):
                    msgs = []
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                    break
                except nats.errors.Error as e:
                    self._rl.warning("fetch", "fetch failed: %s", e)
                    await asyncio.sleep(0.5)
                    continue
                if not msgs:  # idle (a group's buckets return nothing, one consumer times out):
                    # write every rollup marked
                    if writing is not None:
                        await writing
                        writing = None
                    await self.flush_rollups(everything=True)
                    continue
                if len(msgs) < c.batch and c.linger > 0:
                    msgs = await self._linger(msgs)
                batch = await self.prepare(msgs)
                if writing is not None:
                    await writing
                writing = asyncio.create_task(self.commit(batch))
        finally:
            if writing is not None:
                await writing
            if self.stats.db_up:
                await self.flush_rollups(everything=True)
            await self.close()

    def linger(self) -> float:
        """How long a batch that is not full waits for more: ``linger``; in a group, ``linger``
        times the group's buckets over the buckets this member holds (about the number of
        members), at most ``max(linger, fetch_timeout)``: each member reads its share of the
        frames, so its batches fill about as one collector's do and the group commits about as
        many transactions a second as one collector, not as many per member."""
        c = self.cfg.collector
        if self.source is None or self.tokens is None:
            return c.linger
        held = len(self.tokens())
        return min(c.linger * self.buckets / max(held, 1), max(c.linger, c.fetch_timeout))

    async def _linger(self, msgs: list[Msg]) -> list[Msg]:
        """A batch that is not full waits :meth:`linger` for more, then takes what came (one fetch)."""
        c = self.cfg.collector
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self.linger())
        if self._stop.is_set():
            return msgs
        try:  # returns at once with what is there; waits briefly only when nothing came
            more = await self._fetch(c.batch - len(msgs), LINGER_FETCH_TIMEOUT)
        except (TimeoutError, nats.errors.TimeoutError):
            return msgs
        except nats.errors.Error as e:
            self._rl.warning("fetch", "fetch failed: %s", e)
            return msgs
        return msgs + more

    async def flush_rollups(self, everything: bool = False) -> None:
        """Write the one-minute rollups that are due (:meth:`Writer.flush_rollups`); a failure is
        logged and retried later (the minutes stay marked, in PostgreSQL too)."""
        if time.monotonic() < self._rollups_retry_at:
            return
        try:
            await self.writer.flush_rollups(everything)
        except Exception as e:  # noqa: BLE001 (rollups wait; ingest goes on)
            self._rollups_retry_at = time.monotonic() + ROLLUP_RETRY_S
            if db.is_transient(e):
                await self.writer.reset()
            self._rl.warning("rollups", "writing one-minute rollups failed, retried later: %r", e)

    async def close(self) -> None:
        """Stop the pull subscription (so that draining NATS does not wait on it), handing back
        what the server delivered after the last fetch returned (:func:`nak_unread`)."""
        sub, self._sub = self._sub, None
        await cancel_all(t for t in (self.unbucketed, self.strays) if t is not None)
        self.unbucketed = self.strays = None
        if self.source is not None:
            await self.source.close()
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            n = await nak_unread(sub)
            if n:
                log.info("shutdown: %d delivered but unread messages handed back (nak)", n)

    def limits(self, now: float | None = None) -> Limits:
        now = time.time() if now is None else now
        pg = self.cfg.postgres
        return Limits(
            max_bytes=self.cfg.collector.max_frame_bytes,
            oldest_ts=now - pg.retention_days * 86400.0,
            newest_ts=now + pg.partitions_ahead * 86400.0,
            buckets=self.buckets if self.source is not None else 0,
        )

    async def process(self, msgs: Sequence[Msg]) -> WriteResult | None:
        """Check, write (retrying while PostgreSQL is down), then ack and run the hooks.

        Returns ``None`` when shutdown gave up on a batch PostgreSQL never took (not acked).
        """
        return await self.commit(await self.prepare(msgs))

    async def prepare(self, msgs: Sequence[Msg]) -> Batch:
        """Check every message, handing the event loop a turn every ``CHECK_CHUNK`` messages (a
        write in flight proceeds, and an XID on the fast event path waits for a few ms of
        checking, not for a whole batch's)."""
        c = self.cfg.collector
        now = time.time()
        limits = self.limits(now)
        batch = Batch(msgs)
        limited = 0
        group = self.source
        held = self.tokens() if group is not None and self.tokens is not None else {}
        for i, m in enumerate(msgs):
            if i % CHECK_CHUNK == CHECK_CHUNK - 1:
                await asyncio.sleep(0)
            seq, delivered, stored_at = ack_meta(m)
            if delivered > 1:
                self.stats.redelivered += 1
            if group is not None and stray.is_stray(m.subject):
                batch.stray.append(m)  # of no frame's shape: rejected below, acknowledged
            elif group is not None:  # filtered consumers: stream sequence jumps are other buckets
                bucket = bucket_of_subject(m.subject)
                if bucket is None or bucket not in held:
                    self.stats.skipped_other_partition += 1  # left unacknowledged for its owner
                    continue
                batch.held[bucket] = held[bucket]
                if group.judged_again(bucket, seq):
                    batch.redo.add(id(m))
                batch.mine.append(m)
            elif lost := self.gaps.see(seq):
                self.stats.stream_lost += lost
                self._rl.warning(
                    "stream-lost",
                    "%d messages dropped by the stream before this collector got them (it was full "
                    "or they aged out: raise [nats] stream_max_bytes or stream_max_age)",
                    lost,
                )
            if c.partitions > 1 and subject_partition(m.subject, c.partitions) != c.partition:
                self.stats.skipped_other_partition += 1
                continue
            if delivered >= c.max_deliver:  # delivered and never stored max_deliver - 1 times
                batch.rejected.append(
                    Rejection(
                        m.subject,
                        "poison",
                        None,
                        len(m.data),
                        bytes(m.data[:HEAD_BYTES]),
                        seq,
                        f"delivered {delivered} times without being stored: terminated unread",
                    )
                )
                batch.poison.add(id(m))
                continue
            item = check(m.subject, m.data, limits, seq)
            if type(item) is Accepted:
                if (joined := self.static.join(item.frame)) is not item.frame:
                    item = replace(item, frame=joined)
                    self.stats.samples_unjoined = self.static.unjoined
                if self.rate_limit.allow(item.frame.host, now if stored_at is None else stored_at):
                    batch.accepted.append(item)
                    if id(m) in batch.redo:
                        batch.redo_frames.add(id(item.frame))
                    if item.dropped_gpus:
                        self._dropped_gpus(item)
                else:  # counted and acknowledged, not stored: a flood must not write rows either
                    limited += 1
                    self.stats.rejected[RATE_LIMITED] += 1
                    self._rl.warning(
                        RATE_LIMITED, "frames of host %r refused: over [collector] host_rate", item.frame.host
                    )
            else:
                batch.rejected.append(item)  # type: ignore[arg-type]
        self.stats.frames_in += len(batch.accepted) + len(batch.rejected) + limited
        return batch

    async def commit(self, batch: Batch) -> WriteResult | None:
        """Write a prepared batch, then acknowledge its messages and run the hooks."""
        if batch.msgs:
            self.stats.writing_since = _stream_time(batch.msgs[0], time.time())
            self.stats.unjudged_since = self.stats.writing_since
        try:
            try:
                result = await self._write(batch.accepted, batch.rejected)
            finally:
                self.stats.writing_since = None
            if result is None:
                return None
            if self.source is not None:  # group: judged (and persisted) first, then acknowledged
                await self._after_write(batch, result)
                await self._ack(self._still_held(batch) + batch.stray, batch)
                return result
            await self._ack(batch.msgs, batch)
            await self._after_write(batch, result)
            return result
        finally:
            self.stats.unjudged_since = None

    def _still_held(self, batch: Batch) -> list[Msg]:
        """Group mode: the messages of the batch whose bucket is still held under the lease it
        was held under when the batch was checked. A bucket lost meanwhile (even if taken back
        since) had its frames skipped by the judging or its changes dropped: acknowledged, they
        would be judged by nobody; unacknowledged, the next holder's consumer is recreated at its
        floor and judges them again (:class:`collector.group.consumers.BucketConsumers`)."""
        now = self.tokens() if self.tokens is not None else {}
        keep = [
            m
            for m in batch.mine
            if (b := bucket_of_subject(m.subject)) is not None and now.get(b) == batch.held.get(b)
        ]
        if len(keep) < len(batch.mine):
            lost = sorted({b for b, t in batch.held.items() if now.get(b) != t})
            log.info(
                "%d messages of buckets %s lost while their batch was written or judged: left "
                "unacknowledged for the next holder",
                len(batch.mine) - len(keep), lost,
            )  # fmt: skip
        return keep

    async def _ack(self, msgs: Sequence[Msg], batch: Batch) -> None:
        try:  # poison: +TERM, never delivered again (recorded in rejected_frames)
            await send_acks(msgs, batch.poison)
        except nats.errors.Error as e:  # unacknowledged messages come again; storing is idempotent
            self._rl.warning("ack", "acknowledging a committed batch failed: %s", e)

    async def _after_write(self, batch: Batch, result: WriteResult) -> None:
        for r in result.rejected:  # checks' rejections, then those PostgreSQL column types refused
            self.stats.rejected[r.reason] += 1
            self._rl.warning(
                f"reject:{r.reason}", "rejected frame on %s: %s: %s", r.subject, r.reason, r.message
            )
        self._account(batch.msgs, result)
        new = result.new
        if batch.redo_frames:  # copies the previous owner may have stored without judging them
            fresh = {id(f) for f in new}
            redo = batch.redo_frames - fresh
            again = [a.frame for a in batch.accepted if id(a.frame) in redo]
            if again:
                new = new + again
        if new and self.on_batch is not None:
            try:
                await self.on_batch(new)
            except Exception as e:  # noqa: BLE001 (stored and acked: a hook's bug must not stop ingest)
                self.stats.hook_errors += 1
                self._rl.warning("hook", "a hook failed on a committed batch: %r", e, exc_info=True)
        await self.flush_rollups()

    def _dropped_gpus(self, item: Accepted) -> None:
        for reason, fld in item.dropped_gpus:
            self.stats.gpu_entries_rejected[reason] += 1
            self._rl.warning(
                f"gpu:{reason}", "GPU entry dropped from a sample on %s: %s at %s", item.subject, reason, fld
            )

    async def _write(self, accepted: list[Accepted], rejected: list[Rejection]) -> WriteResult | None:
        if not accepted and not rejected:
            return WriteResult()
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(db.is_transient),
                wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.2),
                stop=self._give_up,
                before_sleep=self._before_sleep,
                reraise=True,
            ):
                with attempt:
                    try:
                        result = await self.writer.write(accepted, rejected)
                    except BaseException as e:
                        if db.is_transient(e):
                            await self.writer.reset()
                        raise
                    self.stats.db_up = True
                    self.stats.db_down_since = None
                    return result
        except db.TRANSIENT as e:
            log.error(
                "giving up on a batch of %d frames at shutdown (not acknowledged): %s", len(accepted), e
            )
        except Exception as e:  # noqa: BLE001 (a bug storing some message: reject the batch, never stop)
            log.exception("storing a batch failed; its %d frames are rejected as store_error", len(accepted))
            why = f"{type(e).__name__}: {e}"[:500]
            lost = [
                Rejection(a.subject, "store_error", None, a.size, a.head, a.stream_seq, why) for a in accepted
            ]
            return await self._write_rejections(lost + list(rejected))
        return None

    async def _write_rejections(self, rejected: list[Rejection]) -> WriteResult:
        """Store only rejections; if even that fails, they are counted and acknowledged unstored."""
        try:
            return await self.writer.write([], rejected)
        except Exception as e:  # noqa: BLE001
            self._rl.warning("rejects", "rejections not stored (counted only): %r", e)
            return WriteResult(rejected=rejected)

    def _give_up(self, state: RetryCallState) -> bool:
        return self._stop.is_set() and time.monotonic() - self._stop_at > self.cfg.collector.shutdown_timeout

    def _before_sleep(self, state: RetryCallState) -> None:
        self.stats.db_errors += 1
        self.stats.db_up = False
        if self.stats.db_down_since is None:
            self.stats.db_down_since = time.time()
        exc = state.outcome.exception() if state.outcome is not None else None
        self._rl.warning(
            "db", "PostgreSQL write failed (attempt %d), retrying: %s", state.attempt_number, exc
        )

    def _account(self, msgs: Sequence[Msg], result: WriteResult) -> None:
        s = self.stats
        s.batches += 1
        s.last_batch_size = len(msgs)
        s.last_write_s = result.seconds
        s.frames_stored += len(result.new)
        s.gpu_samples_stored += result.gpu_rows
        s.duplicates += result.duplicates
        now = time.time()
        s.last_commit_at = now
        try:
            first, last = msgs[0].metadata, msgs[-1].metadata
        except (ValueError, IndexError, AttributeError):
            return
        if first.timestamp is not None:
            s.last_commit_lag_s = max(0.0, time.time() - first.timestamp.timestamp())
        s.consumer_pending = last.num_pending or 0
        if last.timestamp is not None:
            s.last_newest_lag_s = max(0.0, now - last.timestamp.timestamp())


def ack_meta(m: Msg) -> tuple[int | None, int, float | None]:
    """(stream sequence, deliveries, stream time in s) of a JetStream message, read from its ack
    subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``,
    or with a domain and an account hash before the stream): what nats-py's ``Msg.metadata`` reads,
    without its objects (two dataclasses and a datetime per message). ``(None, 1, None)``: not a
    JetStream delivery."""
    tokens: list[str] = m.reply.split(".") if m.reply else []
    n = len(tokens)
    if n < 9 or tokens[0] != "$JS" or tokens[1] != "ACK" or n == 10:
        return None, 1, None
    at = 4 if n == 9 else Msg.Ack.NumDelivered  # v1 (9 tokens) or v2 (11 and more)
    try:
        return int(tokens[at + 1]), int(tokens[at]) or 1, int(tokens[at + 3]) / 1e9
    except ValueError:
        return None, 1, None


def _stream_time(m: Msg, default: float) -> float:
    """When the JetStream server stored ``m`` (``default`` when unknown): the rate limit's clock."""
    ts = ack_meta(m)[2]
    return default if ts is None else ts


async def send_acks(msgs: Sequence[Msg], term: Collection[int] = ()) -> None:
    """Acknowledge ``msgs`` (``+TERM`` those whose ``id`` is in ``term``) in one write.

    An ack is a publish to the message's reply subject; nats-py's ``Msg.ack`` is four coroutines
    deep and validates the subject each time (~5.5 CPU-µs per message on this machine, against
    ~0.3 for this): here the batch's PUB commands are joined and handed to the client's write
    buffer at once, then flushed once, as ``publish`` would have. A nats-py without that buffer
    gets its own ``ack``/``term`` one by one. Raises what ``publish`` raises on a closed or
    draining connection (the caller leaves the batch unacknowledged: it comes again)."""
    if not msgs:
        return
    nc: Any = msgs[0]._client
    send = getattr(nc, "_send_command", None)
    flush = getattr(nc, "_flush_pending", None)
    if send is None or flush is None:
        for m in msgs:
            await (m.term() if id(m) in term else m.ack())
        return
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    ack = "  4\r\n+ACK\r\n"
    lines = []
    for m in msgs:
        if not m.reply:  # not a JetStream delivery: nothing to acknowledge (Msg.ack would raise)
            continue
        lines.append(f"PUB {m.reply}  5\r\n+TERM\r\n" if id(m) in term else f"PUB {m.reply}{ack}")
    if not lines:
        return
    data = "".join(lines).encode()
    if not nc.is_connected:  # reconnecting: buffered within the client's limit, as publish does
        limit = getattr(nc, "_max_pending_size", 0)
        if limit <= 0 or len(data) + getattr(nc, "_pending_data_size", 0) > limit:
            raise nats.errors.OutboundBufferLimitError
    await send(data)
    await flush()


def task_free_fetch(sub: JetStreamContext.PullSubscription) -> None:
    """Let ``sub.fetch`` take the delivered messages without a task per message.

    nats-py's ``fetch`` reads each message with its core subscription's ``next_msg``, which
    makes a uuid and two tasks (its own and ``asyncio.wait_for``'s) per message, each started
    by a turn of the event loop, even when the message is already in the queue: most of the
    NATS client's CPU in a drain. This replaces that subscription's ``next_msg`` with one that
    takes a queued message at once and waits (``asyncio.timeout``, no task) only when the queue
    is empty; the rest of the pull protocol stays nats-py's. A nats-py whose subscription lacks
    the queue keeps its own ``next_msg``. Unlike nats-py's, a wait is not cancelled when the
    connection closes: it ends at its timeout (the fetch's), then raises ``ConnectionClosedError``.
    """
    inner: Any = getattr(sub, "_sub", None)
    queue: Any = getattr(inner, "_pending_queue", None)
    conn: Any = getattr(inner, "_conn", None)
    if not isinstance(queue, asyncio.Queue) or conn is None or not hasattr(inner, "_pending_size"):
        return

    async def next_msg(timeout: float | None = 1.0) -> Msg:  # noqa: ASYNC109 (nats-py's signature)
        if queue.empty():
            if conn.is_closed:
                raise nats.errors.ConnectionClosedError
            try:
                async with asyncio.timeout(timeout):
                    msg = await queue.get()
            except TimeoutError:
                if conn.is_closed:
                    raise nats.errors.ConnectionClosedError from None
                raise nats.errors.TimeoutError from None
        else:
            msg = queue.get_nowait()
        assert isinstance(msg, Msg)
        inner._pending_size -= len(msg.data)  # as nats-py's: the slow-consumer limit's count
        queue.task_done()
        return msg

    inner.next_msg = next_msg


async def nak_unread(sub: JetStreamContext.PullSubscription) -> int:
    """Negatively acknowledge the messages left in ``sub``'s queue; how many.

    A fetch that times out in the client leaves its pull request open in the server until it
    expires: what the server sends meanwhile waits in the subscription's queue for the next
    fetch (``pending_msgs``). At shutdown there is no next fetch; unacknowledged, those
    messages would come again only after ``ack_wait``. A nak hands them back at once (to the
    next collector, or this one restarted). nats-py has no public call that takes them out of
    the queue without asking the server for more: its core subscription's ``next_msg`` does.
    """
    inner = getattr(sub, "_sub", None)  # nats-py: the core subscription the pull reads from
    n = 0
    while inner is not None and sub.pending_msgs > 0:
        try:
            msg = await inner.next_msg(timeout=0.05)
        except (TimeoutError, nats.errors.Error):
            break
        if JetStreamContext.is_status_msg(msg) or not msg.reply:
            continue  # a pull request's status (timeout, no messages): nothing to hand back
        with contextlib.suppress(nats.errors.Error):
            await msg.nak()
            n += 1
    return n
