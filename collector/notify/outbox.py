"""Delivery of the notification outbox (written by :mod:`collector.store.alerts`).

One transaction per evaluation step writes the alerts that changed and one outbox row per
(notification, channel). Only then are the rows handed to the channels (:class:`Deliverer`);
each delivered row is marked ``sent``; one that fails after its channel's retries is marked
``failed`` and copied to ``notification_dead_letter`` (through an :class:`OutboxStore`). A
restarted collector restores the state and delivers the rows still ``pending``: what was
sent is never sent again.

Fail-open (PostgreSQL unreachable): the alerting hands the deliveries of a step it could not
write to the channels at once, as rows with ``id`` 0 ("early"); each outcome is reported to
the ``early`` callback (kept in memory and appended to the local :class:`Spool`) instead of
PostgreSQL. When the step is written, :func:`save` inserts those rows with the outcome already
known (``sent``, ``failed``; ``pending`` while still in flight, updated by delivery key when it
lands) and returns them not for delivery: the stable delivery key means nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from collector.notify.base import Channel, ChannelStats, DeliveryError
from collector.store import db
from shared.redact import redact
from shared.tasks import cancel_all

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OutboxRow:
    id: int
    channel: str
    key: str
    payload: dict[str, Any]
    # (bucket, fencing token) of a collector group member's row written, and claimed, in its
    # step's transaction behind the fencing check (collector.group.store.GroupStore.save)
    fenced: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an early delivery ended: ``sent`` or ``failed`` after ``attempts``."""

    status: str
    attempts: int
    error: str | None = None
    at: float = 0.0


EarlyCallback = Callable[[OutboxRow, Outcome], None]
# The deliveries of a step handed to their channel before its write: delivery key -> how it
# ended (``None``: still in flight); and those that ended after their step was written.
Early = Mapping[str, Outcome | None]
Landed = Sequence[tuple[OutboxRow, Outcome]]


class OutboxStore(Protocol):
    """Where a delivery's outcome is recorded (:class:`collector.store.alerts.PgAlertStore`)."""

    async def mark_sent(self, row_id: int, attempts: int) -> None: ...

    async def mark_failed(self, row: OutboxRow, attempts: int, error: str) -> None: ...


class Spool:
    """A local, append-only record of early deliveries and their outcomes (JSON lines), so that
    what was sent while PostgreSQL was down is written there once it is back, even after a
    restart. Only touched while PostgreSQL is down; emptied once everything is recorded.

    A collector's spool is named after it (a group member's name has its process id, so a
    restart has another name): :meth:`read` also takes the spools of the directory that no live
    process holds (each holds a lock on ``<spool>.lock`` from its first read on), those of a
    previous run of this collector or of a member that died, and :meth:`clear` removes them
    once recorded."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.errors = 0
        self._held: int | None = None  # the lock on this spool (while the process lives)
        self._adopted: dict[Path, int] = {}  # spools of the dead read here -> their locks

    def append(self, row: OutboxRow, outcome: Outcome) -> None:
        if self.path is None:
            return
        line = json.dumps(
            {"channel": row.channel, "key": row.key, "payload": row.payload, "status": outcome.status,
             "attempts": outcome.attempts, "error": outcome.error, "at": outcome.at}
        )  # fmt: skip
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.errors += 1
            log.warning("notification spool %s not written (kept in memory only): %s", self.path, e)

    def read(self) -> list[tuple[OutboxRow, Outcome]]:
        """This spool's entries and those of the spools nobody holds (see the class doc)."""
        if self.path is None:
            return []
        out = self._entries(self.path)
        try:
            if self._held is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._held = _lock(self.path)
            if self._held is None:
                log.warning("notification spool %s is held by another process", self.path)
                return out
            for other in sorted(self.path.parent.glob("notify-spool-*.jsonl")):
                if other == self.path or other in self._adopted:
                    continue
                fd = _lock(other)
                if fd is not None:  # its writer is gone: recorded here
                    self._adopted[other] = fd
                    out += self._entries(other)
        except OSError as e:
            log.warning("notification spools in %s not all read: %s", self.path.parent, e)
        return out

    def _entries(self, path: Path) -> list[tuple[OutboxRow, Outcome]]:
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
                out.append(
                    (
                        OutboxRow(0, d["channel"], d["key"], d["payload"]),
                        Outcome(d["status"], int(d["attempts"]), d.get("error"), float(d.get("at") or 0)),
                    )
                )
            except (ValueError, KeyError, TypeError):
                log.warning("notification spool %s: an unreadable line skipped", path)
        return out

    def clear(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for other, fd in self._adopted.items():
            for gone in (other, Path(f"{other}.lock")):
                with contextlib.suppress(FileNotFoundError):
                    gone.unlink()
            os.close(fd)
        self._adopted.clear()


def _lock(path: Path) -> int | None:
    """An exclusive lock on ``<path>.lock`` (its descriptor), or None when a live process has it."""
    fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Gate(Protocol):
    """Who may send a row (a collector group member, for its buckets only): ``claim`` once
    before the first attempt (fenced, in PostgreSQL), ``holds`` before every attempt (the
    member's lease, on its own clock). A row refused is left pending for its owner."""

    async def claim(self, row: OutboxRow) -> bool: ...

    def holds(self, row: OutboxRow) -> bool: ...


class Deliverer:
    """One queue and one worker per channel (so a channel's notifications keep their order);
    retries with exponential backoff (tenacity), then the dead-letter table. A delivered row
    is marked ``sent`` in the background: the next notification of the channel does not wait
    for that write (:meth:`idle` waits for both)."""

    def __init__(
        self, store: OutboxStore, channels: Iterable[Channel], early: EarlyCallback | None = None
    ) -> None:
        self.store = store
        self.early = early  # told the outcome of rows with id 0 (not in PostgreSQL yet)
        self.channels = {c.name: c for c in channels}
        self.stats = {c.name: ChannelStats(c.kind) for c in self.channels.values()}
        self._queues: dict[str, asyncio.Queue[OutboxRow]] = {n: asyncio.Queue() for n in self.channels}
        self._tasks: list[asyncio.Task[None]] = []
        self._recording: set[asyncio.Task[None]] = set()  # "sent" marks being written
        self.dead_letters = 0
        self.gate: Gate | None = None  # a collector group member's (docs/operations.md)
        self.refused = 0  # rows not sent: their bucket is another member's now

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(n), name=f"notify-{n}") for n in self.channels]

    def submit(self, rows: Sequence[OutboxRow]) -> None:
        for r in rows:
            q = self._queues.get(r.channel)
            if q is None:
                log.warning("outbox row %d for unknown channel %r left pending", r.id, r.channel)
                continue
            q.put_nowait(r)

    def backlog(self) -> int:
        return sum(q.qsize() for q in self._queues.values())

    async def idle(self) -> None:
        for q in self._queues.values():
            await q.join()
        while self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)

    async def close(self) -> None:
        if self._recording:
            await asyncio.gather(*self._recording, return_exceptions=True)
        await cancel_all(self._tasks)
        self._tasks = []
        for c in self.channels.values():
            await c.close()

    async def _worker(self, name: str) -> None:
        q = self._queues[name]
        while True:
            row = await q.get()
            try:
                await self._deliver(self.channels[name], row)
            except db.ERRORS as e:
                log.warning("notification %d on %s: could not record the outcome: %s", row.id, name, e)
            except (KeyError, TypeError, ValueError) as e:  # a malformed row: keep the worker alive
                self.stats[name].failed += 1
                log.error(
                    "notification %d on %s cannot be rendered, left pending: %s",
                    row.id,
                    name,
                    redact(repr(e)),
                )
            finally:
                q.task_done()

    async def _deliver(self, ch: Channel, row: OutboxRow) -> None:
        st = self.stats[ch.name]
        attempts = 0
        gate = self.gate  # an early row (id 0, PostgreSQL down) is not claimed, only held
        if gate is not None and row.id != 0 and not await gate.claim(row):
            self.refused += 1
            return
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(DeliveryError),
                wait=wait_exponential(multiplier=ch.backoff, max=ch.max_backoff),
                stop=stop_after_attempt(ch.retries + 1),
                reraise=True,
            ):
                with attempt:
                    if gate is not None and not gate.holds(row):
                        self.refused += 1
                        log.info("notification %s not sent: its bucket is another member's now", row.key)
                        return
                    attempts += 1
                    try:
                        await ch.deliver(row.payload, row.key)
                    except DeliveryError:
                        st.errors += 1
                        raise
        except DeliveryError as e:
            st.failed += 1
            st.last_failed_at = time.time()
            self.dead_letters += 1
            log.warning("notification %s on %s failed after %d attempts: %s", row.key, ch.name, attempts, e)
            if row.id == 0:
                if self.early is not None:
                    self.early(row, Outcome("failed", attempts, str(e), time.time()))
                return
            await self.store.mark_failed(row, attempts, str(e))
            return
        st.observe(float(row.payload.get("at") or time.time()))
        if row.id == 0:  # early (PostgreSQL was down): recorded by the alerting, later
            if self.early is not None:
                self.early(row, Outcome("sent", attempts, None, time.time()))
            return
        task = asyncio.create_task(self._mark_sent(ch.name, row.id, attempts))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _mark_sent(self, name: str, row_id: int, attempts: int) -> None:
        try:
            await self.store.mark_sent(row_id, attempts)
        except db.ERRORS as e:  # left pending: delivered again after a restart (at least once)
            log.warning("notification %d on %s: could not record the outcome: %s", row_id, name, e)
