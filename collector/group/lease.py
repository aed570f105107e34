"""Membership and bucket leases of a collector group, in a JetStream key-value bucket.

Keys of the KV bucket ``[collector] group_kv`` (default ``<durable>-group``), whose entries age
out after ``[collector] lease`` (the bucket's ``max_age``, kept by nats-server):

* ``m.<member>``: a live member (its API address); put again every round;
* ``b.<bucket>``: the lease on a bucket; taken with ``create`` (only when the key is absent,
  deleted or aged out), renewed with ``update(last=revision)`` every round, released with
  ``delete(last=revision)``.

Every ``lease / 4`` a member renews what it holds, lists the live members, computes the table
(:func:`collector.group.assign.assign`), releases the buckets it should not own and tries to
take the ones it should. The revision of the ``create`` that took a lease is its **fencing
token**: KV revisions only grow, so a later owner always has a larger one
(:mod:`collector.group.fence` writes it to PostgreSQL, where every outbox write and claim
checks it).

Holder side: a lease counts as held until ``t + lease - margin``, ``t`` being the moment the
renewing request was *sent* (the server stamps the entry later, so it ages out later): a
member that stops (SIGSTOP, a stalled loop, a suspended VM) stops counting itself owner
(:meth:`Membership.owns`) before the entry ages out on the server, the only moment another
member can take it. The clock is ``CLOCK_BOOTTIME``: it runs while the process is stopped
and while the machine is suspended. A lease that lapsed here stays lapsed: a renewal answered
after the lapse (a slow request) counts it lost, and it is released and taken anew (the member
skipped its bucket meanwhile: going on under the same lease would leave that to nobody).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from collector.config import DEFAULT_GROUP_KV
from collector.group.assign import assign
from collector.stream import settle

log = logging.getLogger(__name__)
# bucket -> fencing token; returns the buckets not taken after all (handed back, tried next round)
Gain = Callable[[Mapping[int, int]], Awaitable[Collection[int] | None]]
Loss = Callable[[frozenset[int]], Awaitable[None]]
_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError)


Answer = int | BaseException  # a lease's update: its new revision, or the error
LAST_SEQ = "Nats-Expected-Last-Subject-Sequence"  # a KV update: only over this revision
UPDATE_TIMEOUT = 5.0  # s the leases' updates wait for their answers (nats-py's JetStream default)
_WRONG_LAST = (10071, 10164)  # JetStream's "wrong last sequence" error codes (nats-py's KV update)


def _answer(msg: Msg) -> Answer:
    """A KV update's answer: the new revision, or the error ``KeyValue.update`` would raise."""
    if msg.headers and (status := msg.headers.get("Status")):
        if status == "503":
            return nats.js.errors.NoStreamResponseError()
        return nats.js.errors.APIError(code=int(status), description=msg.headers.get("Description"))
    try:
        resp = json.loads(msg.data)
        if "error" not in resp:
            return int(resp["seq"])
        err = resp["error"]
        code, description = err.get("err_code"), err.get("description")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return nats.js.errors.APIError(description=f"undecodable answer: {e}")
    if code in _WRONG_LAST:
        return nats.js.errors.KeyWrongLastSequenceError(description=description)
    return nats.js.errors.APIError(code=err.get("code"), err_code=code, description=description)


def clock() -> float:
    """Seconds on a clock that keeps running while the process is stopped or the host sleeps."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


@dataclass(slots=True)
class Lease:
    bucket: int
    token: int  # the revision that took it: the fencing token
    revision: int  # the latest revision (for the next update)
    valid_until: float  # on :func:`clock`
    active: bool = False  # usable: its fencing token is raised and its state restored


class Membership:
    """This member's view and leases. ``on_gain`` is awaited with the buckets just taken (the
    caller raises their fencing tokens, restores their state and starts consuming them; the
    buckets it returns, whose token it could not raise, are released and tried again at the
    next round), ``on_loss`` with the buckets released or lost (the caller stops judging,
    sending and consuming them); a bucket is released on the server only after ``on_loss``
    returned."""

    def __init__(
        self,
        nc: NatsClient,
        member: str,
        *,
        buckets: int,
        lease: float,
        kv_bucket: str = DEFAULT_GROUP_KV,
        replicas: int = 1,
        info: Mapping[str, Any] | None = None,
        on_gain: Gain | None = None,
        on_loss: Loss | None = None,
    ) -> None:
        self.nc = nc
        self.member = member
        self.buckets = buckets
        self.lease = lease
        self.margin = max(0.5, lease * 0.2)
        self.interval = lease / 4
        self.kv_bucket = kv_bucket
        self.replicas = replicas
        self.info = dict(info or {})
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.kv: KeyValue | None = None
        self.held: dict[int, Lease] = {}
        self.members: list[str] = []
        self.rounds = 0
        self.gained = 0  # leases taken since start
        self.lost = 0  # leases lost (not released): expired or taken over
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._lost: set[int] = set()  # found lost by a renewal, for the next round
        self._late: dict[int, int] = {}  # ... renewed after they had lapsed here: bucket -> revision
        self.registered = False  # the member key was written by the last renewal
        self._replies: Subscription | None = None  # the answers to the leases' updates
        self._inbox = ""
        self._calls = 0
        self._waiting: dict[int, tuple[dict[int, Answer], int, asyncio.Event]] = {}

    # ------------------------------------------------------------------ what others read

    def owns(self, bucket: int) -> bool:
        lease = self.held.get(bucket)
        return lease is not None and lease.active and clock() < lease.valid_until

    def owned(self) -> frozenset[int]:
        now = clock()
        return frozenset(b for b, lease in self.held.items() if lease.active and now < lease.valid_until)

    def tokens(self) -> dict[int, int]:
        now = clock()
        return {b: lease.token for b, lease in self.held.items() if lease.active and now < lease.valid_until}

    def activate(self, buckets: Iterable[int]) -> None:
        """Leases just taken become usable (``on_gain`` calls it once their fencing tokens are
        raised; otherwise they are activated when ``on_gain`` returns)."""
        for b in buckets:
            if (lease := self.held.get(b)) is not None:
                lease.active = True

    def drop(self, buckets: Iterable[int]) -> None:
        """Stop using these buckets now (their fencing token moved on: another member has
        them); the next round hands them to ``on_loss``."""
        for b in buckets:
            if self.held.pop(b, None) is not None:
                self._lost.add(b)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open (or create) the KV bucket and run a first round (takes what is free)."""
        js = self.nc.jetstream()

        # members starting together create it at once; on a cluster, a KV just created can
        # answer "stream not found" for a moment (a member exited on it in a test run): retried
        async def open_kv() -> KeyValue.BucketStatus:
            try:
                self.kv = await js.key_value(self.kv_bucket)
            except nats.js.errors.BucketNotFoundError:
                self.kv = await js.create_key_value(
                    bucket=self.kv_bucket, ttl=self.lease, history=1, replicas=self.replicas,
                    description="gpuwarden collector group: members and bucket leases",
                )  # fmt: skip
            return await self.kv.status()

        status = await settle(open_kv)
        if status.ttl is not None and abs(status.ttl - self.lease) > 0.01:
            log.warning(
                "group KV %s ages entries out after %.1fs, [collector] lease is %.1fs: the bucket's "
                "setting rules (delete the bucket to change it: nats kv del %s)",
                self.kv_bucket, status.ttl, self.lease, self.kv_bucket,
            )  # fmt: skip
            self.lease = status.ttl
            self.margin = max(0.5, self.lease * 0.2)
            self.interval = self.lease / 4
        await self.round()

    async def run(self) -> None:
        """Renewals every ``lease / 4`` and, beside them, rounds (members, release, take) until
        :meth:`stop`: a slow round (restoring a bucket's state, recreating consumers) never
        delays a renewal."""
        renewals = asyncio.create_task(self._renewals(), name="group-renew")
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)
                if self._stop.is_set():
                    return
                try:
                    await self.round(renew=False)
                except _NATS_ERRORS as e:
                    log.warning("group round failed (will retry): %s", e)
                except Exception:  # a bug in a callback must not end membership silently
                    log.exception("group round failed")
        finally:
            renewals.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewals

    async def _renewals(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._next_wait())
            if self._stop.is_set():
                return
            try:
                await self.renew()
            except _NATS_ERRORS as e:
                log.warning("group renewal failed (will retry): %s", e)

    def _next_wait(self) -> float:
        wait = self.interval
        if self.held:  # wake up for the first expiry too (the loss is then handled at once)
            wait = min(wait, min(lease.valid_until for lease in self.held.values()) - clock())
        return max(wait, 0.05)

    async def stop(self, release: bool = True) -> None:
        """Stop the rounds; with ``release``, hand every bucket back (``on_loss`` first) and
        remove the member key, so that the others take over at their next round."""
        self._stop.set()
        if self._replies is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._replies.unsubscribe()
            self._replies = None
        if not release or self.kv is None:
            return
        async with self._lock:
            held = dict(self.held)
            if held and self.on_loss is not None:
                await self.on_loss(frozenset(held))
            self.held = {}
            for b, lease in held.items():
                with contextlib.suppress(*_NATS_ERRORS):
                    await self.kv.delete(f"b.{b}", last=lease.revision)
            with contextlib.suppress(*_NATS_ERRORS):
                await self.kv.delete(f"m.{self.member}")

    # ------------------------------------------------------------------ one round

    async def _members(self) -> list[str]:
        """The members whose key is present (not deleted, not aged out). From the KV stream's
        subjects, then one get each: ``KeyValue.keys()`` can wait forever when the bucket's
        last message is a delete marker (it waits for a key it ignores)."""
        assert self.kv is not None
        js = self.nc.jetstream()
        prefix = f"$KV.{self.kv_bucket}.m."
        info = await js.stream_info(f"KV_{self.kv_bucket}", subjects_filter=f"{prefix}>")
        out = []
        for subject in info.state.subjects or {}:
            name = subject[len(prefix) :]
            try:
                entry = await self.kv.get(f"m.{name}")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            if entry.value:
                out.append(name)
        return out

    async def renew(self) -> bool:
        """Put the member key and renew every lease held (at once); a lease found taken or aged
        out is dropped here and handed to ``on_loss`` by the next round. False when the member
        key could not be written (the others may not see this member)."""
        kv = self.kv
        assert kv is not None, "start() first"
        t0 = clock()
        value = json.dumps({"member": self.member, **self.info}).encode()
        try:
            await kv.put(f"m.{self.member}", value)
            registered = True
        except _NATS_ERRORS as e:
            registered = False
            log.warning("group: member key not renewed: %s", e)

        leases = []
        for lease in list(self.held.values()):
            if clock() >= lease.valid_until:
                self._lost.add(lease.bucket)
            else:
                leases.append(lease)
        answers = await self._updates(leases, value) if leases else {}
        for lease in leases:
            answer = answers[lease.bucket]
            if isinstance(answer, nats.js.errors.KeyWrongLastSequenceError):
                self._lost.add(lease.bucket)  # aged out and taken (or deleted): not ours any more
            elif isinstance(answer, BaseException):
                log.warning(
                    "group: lease on bucket %d not renewed (held until it expires): %s", lease.bucket, answer
                )
            else:
                lease.revision = answer
                if clock() >= lease.valid_until:
                    # answered after the lease had lapsed here (a slow request, e.g. while a NATS
                    # cluster elects leaders): this member stopped judging, writing and sending for
                    # the bucket meanwhile; to go on silently would leave what it skipped to nobody.
                    # Lost, then released (after on_loss) to be taken anew, as a new holder
                    self._lost.add(lease.bucket)
                    self._late[lease.bucket] = lease.revision
                else:
                    lease.valid_until = t0 + self.lease - self.margin
        for b in self._lost:
            self.held.pop(b, None)
        self.registered = registered
        return registered

    async def _updates(self, leases: list[Lease], value: bytes) -> dict[int, Answer]:
        """``KeyValue.update(b.<bucket>, value, last=revision)`` of every lease at once: bucket ->
        its new revision or the error. Each update is a JetStream
        publish whose answer comes to one wildcard subscription of this member's, instead of a
        request each (nats-py's ``update`` is a request, a future and a timer per key: measured
        122-155 CPU-us per key against 40 this way; 64 keys every ``lease / 4``)."""
        nc = self.nc
        if self._replies is None:
            inbox = nc.new_inbox()
            try:
                self._replies = await nc.subscribe(f"{inbox}.>", cb=self._on_reply)
            except _NATS_ERRORS as e:
                return {lease.bucket: e for lease in leases}
            self._inbox = inbox
        self._calls += 1
        call = self._calls
        out: dict[int, Answer] = {}
        done = asyncio.Event()
        self._waiting[call] = (out, len(leases), done)
        try:
            for lease in leases:
                try:
                    await nc.publish(
                        f"$KV.{self.kv_bucket}.b.{lease.bucket}",
                        value,
                        reply=f"{self._inbox}.{call}.{lease.bucket}",
                        headers={LAST_SEQ: str(lease.revision)},
                    )
                except _NATS_ERRORS as e:
                    out[lease.bucket] = e
            if len(out) < len(leases):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), UPDATE_TIMEOUT)
        finally:
            del self._waiting[call]
        for lease in leases:
            out.setdefault(lease.bucket, TimeoutError("no answer to the lease's update"))
        return out

    async def _on_reply(self, msg: Msg) -> None:
        """One answer of :meth:`_updates` (``<inbox>.<call>.<bucket>``)."""
        call, _, bucket = msg.subject[len(self._inbox) + 1 :].partition(".")
        try:
            waiting = self._waiting.get(int(call))
            b = int(bucket)
        except ValueError:
            return
        if waiting is None:
            return  # answered after its call gave up: counted as not renewed
        out, n, done = waiting
        out[b] = _answer(msg)
        if len(out) >= n:
            done.set()

    async def round(self, renew: bool = True) -> None:
        """Renew (unless the renewal task does it), hand lost leases to ``on_loss``, list the
        members, release what the table gives others, take what it gives this member."""
        assert self.kv is not None, "start() first"
        async with self._lock:
            self.rounds += 1
            kv = self.kv
            value = json.dumps({"member": self.member, **self.info}).encode()
            registered = await self.renew() if renew else self.registered
            now = clock()
            for b, lease in list(self.held.items()):
                if now >= lease.valid_until:
                    self._lost.add(b)
                    del self.held[b]
            lost, self._lost = frozenset(self._lost), set()
            if lost:
                self.lost += len(lost)
                log.warning("group: lost buckets %s (lease expired or taken over)", sorted(lost))
                if self.on_loss is not None:
                    await self.on_loss(lost)
                for b in lost:
                    if (rev := self._late.pop(b, None)) is not None:
                        with contextlib.suppress(*_NATS_ERRORS):
                            await kv.delete(f"b.{b}", last=rev)
            try:
                members = await asyncio.wait_for(self._members(), self.interval * 2)
            except _NATS_ERRORS as e:
                log.warning("group: members not listed: %s", e)
                return
            if registered and self.member not in members:
                members.append(self.member)
            self.members = sorted(members)
            if not registered:
                return  # the others may not see us: take nothing new
            target = assign(self.members, self.buckets).get(self.member, frozenset())
            release = frozenset(b for b in self.held if b not in target)
            if release:
                if self.on_loss is not None:
                    await self.on_loss(release)
                for b in release:
                    gone = self.held.pop(b, None)
                    if gone is not None:
                        with contextlib.suppress(*_NATS_ERRORS):
                            await kv.delete(f"b.{b}", last=gone.revision)
                log.info("group: released buckets %s (rebalanced)", sorted(release))
            gained: dict[int, int] = {}
            for b in sorted(target - set(self.held)):
                t1 = clock()
                try:
                    rev = await kv.create(f"b.{b}", value)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # held by another member until it releases it or it ages out
                except _NATS_ERRORS as e:
                    log.warning("group: bucket %d not taken: %s", b, e)
                    continue
                self.held[b] = Lease(b, rev, rev, t1 + self.lease - self.margin)
                gained[b] = rev
            if gained and self.on_gain is not None:
                untaken = set(await self.on_gain(gained) or ())
                for b in sorted(untaken & set(gained)):  # handed back: tried again next round
                    del gained[b]
                    if (gone := self.held.pop(b, None)) is not None:
                        with contextlib.suppress(*_NATS_ERRORS):
                            await kv.delete(f"b.{b}", last=gone.revision)
            if gained:
                self.gained += len(gained)
                log.info("group: took buckets %s (%d members)", sorted(gained), len(self.members))
                self.activate(gained)
