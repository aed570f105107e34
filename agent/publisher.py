"""JetStream publishing with acks and a bounded replay buffer (frames and bytes).

One :class:`Publisher` owns one NATS connection. Frames are queued with :meth:`Publisher.publish`
(never blocks) and sent by ``workers`` tasks, each waiting for the JetStream ack before taking
the next frame: one worker (the agent) keeps the stream in submission order; many workers
(``gpuwarden fleet``) pipeline acks over one connection.

Buffer: frames wait in two queues, events (``urgent``) ahead of samples and inventory, together
bounded by ``nats.buffer_frames`` frames and ``nats.buffer_bytes`` bytes of frame data (the
bytes bound keeps a long outage below the agent unit's memory limit). While NATS is unreachable
the queues keep the NEWEST frames: on overflow the oldest sample (or, when only events wait, the
oldest event) is dropped and counted in :attr:`PublisherStats.dropped` (and ``dropped_bytes``);
the agent publishes the count in every sample (``agent.dropped_frames``), so the first sample
after NATS is back tells the collector how many frames the gap lost. On reconnect they replay
oldest first. A frame whose publish failed goes back to the head of its queue, so no frame
overtakes another of its queue. Frames carry no ``Nats-Msg-Id``: JetStream's duplicate window is
stream-wide, so an id another host's agent can send would let it suppress ours
(docs/protocol.md). A frame the server stored before its ack was lost is therefore stored twice
in the stream; the collector stores it once (idempotent on host, boot id and sequence).

Outage report: from the moment the connection is lost (or, for a background start, from the
start) until it is back, the publisher notes how long and how many frames it buffered and
dropped; :attr:`Publisher.last_outage` holds the newest report and :attr:`Publisher.outages`
counts them, so each sender of samples attaches it once (``SampleFrame.outage``).

A publish refused for permissions (``Permissions Violation``) is counted in
:attr:`PublisherStats.permission_errors` and dropped; frames for that subject are dropped
without trying for ``deny_retry_s``, then tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from shared.config import NatsConfig
from shared.errors import EXIT_UNAVAILABLE, GpuwardenError, ServiceUnavailableError
from shared.frames import PublishOutage
from shared.natsconf import connect_options as shared_connect_options
from shared.natsconf import fit_max_bytes, is_name_in_use, stream_settings
from shared.ratelog import RateLimitedLog
from shared.redact import redact
from shared.subjects import STREAM, STREAM_SUBJECTS
from shared.tasks import cancel_all

log = logging.getLogger(__name__)

_DENIED = re.compile(r'Permissions Violation for Publish to "?([^"\s]+)"?', re.IGNORECASE)
ERROR_LOG_EVERY_S = 60.0
_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)


class StreamUnavailableError(GpuwardenError):
    """The ``GPUWARDEN`` stream is missing (and may not be created) or does not fit."""

    exit_code = EXIT_UNAVAILABLE


@dataclass(slots=True)
class PublisherStats:
    published: int = 0  # frames acknowledged by JetStream
    publish_errors: int = 0  # failed attempts (the frame is retried)
    dropped: int = 0  # frames lost to buffer overflow (exact)
    dropped_bytes: int = 0  # their bytes
    permission_errors: int = 0  # frames refused by the server's permissions (not retried)
    disconnects: int = 0
    reconnects: int = 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    data: bytes


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Jittered exponential backoff: a uniform pick in [d/2, d], d = min(cap, base * 2**attempt)."""
    d = min(cap, base * (2 ** min(attempt, 30)))
    return rng.uniform(d / 2, d)


def server_address(url: str) -> tuple[str, int]:
    """Host and port of a NATS URL (``nats://h:4222``, ``tls://h``, ``h:4222``)."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
    return parsed.hostname or "127.0.0.1", parsed.port or 4222


def connect_options(cfg: NatsConfig, name: str) -> dict[str, Any]:
    """``shared.natsconf.connect_options`` plus the publisher's larger pending buffer."""
    return {**shared_connect_options(cfg, name), "pending_size": 8 * 1024 * 1024}


def stream_config(cfg: NatsConfig) -> StreamConfig:
    return StreamConfig(storage=StorageType.FILE, **stream_settings(cfg))


class Publisher:
    """One NATS connection, a bounded frame buffer and ``workers`` ack-waiting senders."""

    def __init__(
        self,
        cfg: NatsConfig,
        *,
        name: str,
        workers: int = 1,
        deny_retry_s: float = 60.0,
        inbox_prefix: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.inbox_prefix = inbox_prefix  # e.g. _INBOX_<host>: replies the NATS role lets us read
        self.capacity = max(1, cfg.buffer_frames)
        self.capacity_bytes = max(1, cfg.buffer_bytes)
        self.stats = PublisherStats()
        self.nc = Client()
        self.js: JetStreamContext = self.nc.jetstream(timeout=cfg.publish_timeout)
        self.failed: BaseException | None = None  # a fatal error of the background connect
        self.failed_event = asyncio.Event()
        self._workers = workers
        self._deny_retry_s = deny_retry_s
        self._rng = rng or random.Random()  # noqa: S311  (jitter, not crypto)
        self._urgent: deque[Outgoing] = deque()
        self._normal: deque[Outgoing] = deque()
        self._bytes = 0  # data bytes in _urgent and _normal
        self._ready = asyncio.Event()  # frames are waiting
        self._idle = asyncio.Event()  # nothing queued and nothing in flight
        self._idle.set()
        self._connected = asyncio.Event()
        self._inflight = 0
        self._attempt = 0
        self._denied: dict[str, float] = {}
        self._errlog = RateLimitedLog(log, ERROR_LOG_EVERY_S)  # the same error once a minute
        self._stream_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._stream_ok = False
        self._started = False
        self._connect_called = False
        self.outages = 0  # outage reports made (see last_outage)
        self.last_outage: PublishOutage | None = None
        self._down_since: float | None = None  # wall time publishing stopped
        self._down_dropped = 0  # stats.dropped then

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def buffered(self) -> int:
        """Frames waiting to be sent (not counting those in flight)."""
        return len(self._urgent) + len(self._normal)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the frames waiting to be sent."""
        return self._bytes

    async def wait_connected(self, within_s: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), within_s)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, wait: bool = False) -> None:
        """Connect and set up the stream; start the senders.

        With ``wait`` the first connection must succeed within ``connect_timeout`` (else
        :class:`ServiceUnavailableError`); without it the connection is made in the background,
        retried forever, while frames accumulate in the buffer. Either way a missing stream
        that may not be created is :class:`StreamUnavailableError` (in the background: set in
        :attr:`failed` and :attr:`failed_event`).
        """
        opts = connect_options(self.cfg, self.name)  # ConfigError now, not in the background
        if self.inbox_prefix:
            opts["inbox_prefix"] = self.inbox_prefix
        self._started = True
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"publisher-{i}") for i in range(self._workers)
        ]
        if wait:
            limit = self.cfg.connect_timeout + self.cfg.publish_timeout
            try:
                await asyncio.wait_for(self._connect(opts), limit)
            except TimeoutError:
                raise ServiceUnavailableError(
                    f"cannot reach NATS at {redact(', '.join(self.cfg.servers))} within {limit:.0f}s"
                ) from None
        else:
            self._tasks.append(asyncio.create_task(self._connect_forever(opts), name="publisher-connect"))

    def _went_down(self) -> None:
        if self._down_since is None:
            self._down_since = time.time()
            self._down_dropped = self.stats.dropped

    def _came_back(self, min_s: float = 0.0) -> None:
        """Publishing works again: make the outage report (if it lasted ``min_s`` or lost frames)."""
        since, self._down_since = self._down_since, None
        if since is None:
            return
        now = time.time()
        dropped = self.stats.dropped - self._down_dropped
        if now - since < min_s and not dropped:
            return
        self.last_outage = PublishOutage(
            since=since, until=max(now, since), buffered_frames=self.buffered, dropped_frames=dropped
        )
        self.outages += 1
        log.info(
            "NATS: could not publish for %.1fs; %d frames buffered, %d dropped",
            now - since,
            self.buffered,
            dropped,
        )

    async def _connect_forever(self, opts: dict[str, Any]) -> None:
        self._went_down()  # until the first connection: an outage if it takes a while
        try:
            await self._wait_reachable()
            await self._connect(opts)
        except GpuwardenError as e:
            log.error("NATS: %s", redact(str(e)))
            self.failed = e
            self.failed_event.set()

    async def _wait_reachable(self) -> None:
        """Until one server accepts TCP: retry with jittered, capped backoff (quietly)."""
        targets = [server_address(u) for u in self.cfg.servers]
        attempt = 0
        while True:
            for host, port in targets:
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port), self.cfg.connect_timeout
                    )
                except (OSError, TimeoutError) as e:
                    last = e
                    continue
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            delay = backoff_delay(attempt, self.cfg.reconnect_wait, self.cfg.reconnect_wait_max, self._rng)
            if attempt == 0 or attempt % 10 == 0:
                log.warning("NATS: no server reachable (%s); retrying, next in %.1fs", last, delay)
            attempt += 1
            await asyncio.sleep(delay)

    async def _connect(self, opts: dict[str, Any]) -> None:
        self._connect_called = True
        await self.nc.connect(
            **opts,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            reconnect_to_server_handler=self._pick_server,
        )
        url = self.nc.connected_url  # host and port only: the URL may carry credentials
        log.info("NATS: connected to %s:%s", url.hostname if url else "?", url.port if url else "?")
        attempt = 0
        while True:
            try:
                await self._ensure_stream()
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
                delay = backoff_delay(
                    attempt, self.cfg.reconnect_wait, self.cfg.reconnect_wait_max, self._rng
                )
                log.warning("NATS: JetStream not answering (%s); retrying in %.1fs", type(e).__name__, delay)
                attempt += 1
                await asyncio.sleep(delay)
        self._stream_ok = True
        self._came_back(min_s=max(2.0, self.cfg.connect_timeout))
        self._connected.set()

    async def _ensure_stream(self) -> None:
        want = stream_config(self.cfg)
        try:
            info = await self.js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            if not self.cfg.create_stream:
                raise StreamUnavailableError(
                    f"JetStream stream {STREAM} does not exist and nats.create_stream is false"
                ) from None
            try:
                await fit_max_bytes(
                    lambda n: self.js.add_stream(dataclasses.replace(want, max_bytes=n)),
                    int(want.max_bytes or -1),
                )
            except nats.js.errors.BadRequestError as e:
                if not is_name_in_use(e):
                    raise
                return  # another client (an agent, the collector) created it meanwhile
            log.info("NATS: created stream %s", STREAM)
            return
        have = set(info.config.subjects or ())
        missing = [s for s in STREAM_SUBJECTS if s not in have]
        if not missing:
            return
        if not self.cfg.create_stream:
            raise StreamUnavailableError(f"stream {STREAM} does not capture {', '.join(missing)}")
        cfg = info.config
        cfg.subjects = sorted(have | set(missing))
        try:
            await self.js.update_stream(cfg)
        except nats.js.errors.APIError as e:
            raise StreamUnavailableError(f"cannot update stream {STREAM}: {e}") from e

    async def flush(self, within_s: float) -> bool:
        """Wait until every queued frame is acknowledged; False if ``within_s`` passed first."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush (bounded), stop the senders and drain the connection."""
        if not self._started:
            return
        if self.connected:
            flushed = await self.flush(flush_timeout)
            if not flushed:
                log.warning("NATS: %d frames not sent before shutdown", self.buffered + self._inflight)
        self._closing = True
        await cancel_all(self._tasks)
        self._tasks = []
        if self.nc.is_connected:
            with contextlib.suppress(*_NATS_ERRORS):
                await self.nc.drain()
        if self._connect_called and not self.nc.is_closed:
            with contextlib.suppress(*_NATS_ERRORS):
                await self.nc.close()
        self._connected.clear()

    # ------------------------------------------------------------------ queueing

    def publish(self, subject: str, data: bytes, *, urgent: bool = False) -> None:
        """Queue one frame; it is sent as soon as a sender is free (never blocks)."""
        (self._urgent if urgent else self._normal).append(Outgoing(subject, data))
        self._bytes += len(data)
        self._trim()
        self._idle.clear()
        self._ready.set()

    def _trim(self) -> None:
        while len(self._urgent) + len(self._normal) > self.capacity or self._bytes > self.capacity_bytes:
            gone = (self._normal or self._urgent).popleft()
            self._bytes -= len(gone.data)
            self.stats.dropped += 1
            self.stats.dropped_bytes += len(gone.data)

    def _take(self) -> tuple[Outgoing, bool] | None:
        if self._urgent:
            item, urgent = self._urgent.popleft(), True
        elif self._normal:
            item, urgent = self._normal.popleft(), False
        else:
            return None
        self._bytes -= len(item.data)
        return item, urgent

    def _requeue(self, item: Outgoing, urgent: bool) -> None:
        (self._urgent if urgent else self._normal).appendleft(item)
        self._bytes += len(item.data)
        self._trim()
        self._ready.set()

    def _check_idle(self) -> None:
        if self._inflight == 0 and not self._urgent and not self._normal:
            self._idle.set()

    # ------------------------------------------------------------------ senders

    async def _worker(self) -> None:
        while True:
            await self._connected.wait()
            taken = self._take()
            if taken is None:
                self._ready.clear()
                self._check_idle()
                await self._ready.wait()
                continue
            item, urgent = taken
            if not self.nc.is_connected:  # lost before our callback ran: keep it for the replay
                self._requeue(item, urgent)
                self._connected.clear()
                continue
            if self._is_denied(item.subject):
                self.stats.permission_errors += 1
                self._check_idle()
                continue
            self._inflight += 1
            try:
                await self.js.publish(item.subject, item.data)  # no Nats-Msg-Id: see the module doc
            except asyncio.CancelledError:
                self._requeue(item, urgent)
                raise
            except _NATS_ERRORS as e:
                await self._failed(item, urgent, e)
            else:
                self.stats.published += 1
            finally:
                self._inflight -= 1
                self._check_idle()

    async def _failed(self, item: Outgoing, urgent: bool, e: BaseException) -> None:
        if self._is_denied(item.subject):
            self.stats.permission_errors += 1
            log.error("NATS: publish to %s refused (permissions); frame dropped", item.subject)
            return
        self.stats.publish_errors += 1
        self._requeue(item, urgent)
        if isinstance(e, nats.js.errors.NoStreamResponseError) and self.connected and self.cfg.create_stream:
            await self._recreate_stream()
        elif self.connected:  # a server-side refusal: do not spin
            log.warning("NATS: publish to %s failed: %s", item.subject, e or type(e).__name__)
            await asyncio.sleep(
                backoff_delay(0, self.cfg.reconnect_wait, self.cfg.reconnect_wait_max, self._rng)
            )

    async def _recreate_stream(self) -> None:
        """No stream took the frame (a server that lost its JetStream state): set it up again."""
        async with self._stream_lock:
            try:
                await self._ensure_stream()
            except (*_NATS_ERRORS, StreamUnavailableError) as e:
                log.warning("NATS: no stream captures our subjects and it cannot be created: %s", e)
                await asyncio.sleep(self.cfg.reconnect_wait_max)

    def _is_denied(self, subject: str) -> bool:
        since = self._denied.get(subject)
        if since is None:
            return False
        if time.monotonic() - since > self._deny_retry_s:
            del self._denied[subject]
            return False
        return True

    # ------------------------------------------------------------------ callbacks

    async def _on_error(self, e: Exception) -> None:
        text = redact(str(e)) or type(e).__name__
        m = _DENIED.search(text)
        if m:
            self._denied[m.group(1)] = time.monotonic()
        self._errlog.log(logging.ERROR if m else logging.WARNING, text, "NATS: %s", text)

    async def _on_disconnected(self) -> None:
        if self._connected.is_set() and not self._closing:
            self.stats.disconnects += 1
            self._went_down()
            log.warning(
                "NATS: disconnected; buffering up to %d frames or %d MiB",
                self.capacity,
                self.capacity_bytes >> 20,
            )
        self._connected.clear()

    async def _on_reconnected(self) -> None:
        self.stats.reconnects += 1
        self._attempt = 0
        log.info("NATS: reconnected; replaying %d buffered frames", self.buffered)
        if self._stream_ok:
            self._came_back()
            self._connected.set()

    def _pick_server(self, servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
        delay = backoff_delay(self._attempt, self.cfg.reconnect_wait, self.cfg.reconnect_wait_max, self._rng)
        server = servers[self._attempt % len(servers)] if servers else None
        self._attempt += 1
        return server, delay

    async def rtt(self, limit_s: float = 2.0) -> float:
        """Round trip to the server in seconds (PING/PONG); raises on timeout or disconnect."""
        if not self.connected:
            raise nats.errors.ConnectionReconnectingError
        rtt: float = await self.nc.rtt(limit_s)  # type: ignore[arg-type]
        return rtt
