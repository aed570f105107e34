"""The collector watches itself: its own pipeline and its notifications (docs/alerts.md,
"The collector's own health").

:func:`judge` is pure: it takes :class:`Readings` (what the collector knows about itself at
``now``) and the :class:`SelfState` it left last time, and returns a :class:`SelfStatus`:

* ``impaired_since``: since when the collector's own pipeline is impaired (its NATS connection
  down, PostgreSQL unreachable, or the ingest lagging beyond ``[selfcheck] ingest_lag`` with a
  backlog). While it is set the collector cannot see its hosts, so the health engine suspends
  their staleness (``HealthEngine.tick(..., impaired_since=...)``); once it clears, staleness
  resumes from fresh arrivals (``HealthEngine.resume``).
* ``problems``: at most one ``collector.pipeline`` problem (the first cause: NATS, then
  PostgreSQL, then lag) and at most one ``collector.notify`` problem (backlog, failing
  channels), each raised once its condition has lasted ``[selfcheck] grace``. The alerting turns
  them into observations, so they alert through the normal channels like any other check.

:class:`Heartbeat` is the dead man's switch: the alerting loop calls :meth:`Heartbeat.beat`
after every completed tick, and a beat is POSTed to ``[selfcheck] heartbeat_url`` at most every
``heartbeat_interval``. It is driven by the loop's progress, not by a timer of its own: a
wedged or stopped collector stops beating, and the receiver (Healthchecks, Cronitor,
Alertmanager's Watchdog routed to an external service, ...) notices the silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from collector.health.model import CRITICAL, HEALTHY, WARNING, Observation, labels_key
from shared.tasks import cancel_all

log = logging.getLogger(__name__)

PIPELINE: Final = "collector.pipeline"
NOTIFY: Final = "collector.notify"
CHECKS: Final = (PIPELINE, NOTIFY)


@dataclass(frozen=True, slots=True)
class SelfCheckConfig:
    grace: float = 5.0  # a condition lasts this long before it is a problem (an alert)
    ingest_lag: float = 30.0  # oldest frame waiting for its commit longer than this, with a backlog
    notify_backlog: int = 100  # notifications waiting to be delivered beyond this
    channel_window: float = 300.0  # a channel whose last dead letter is this recent (and no success since)


@dataclass(frozen=True, slots=True)
class Readings:
    """What the collector knows about itself at ``now`` (Unix seconds)."""

    now: float
    nats_connected: bool = True
    postgres_down_since: float | None = None  # the first failed write of an outage still going on
    writing_since: float | None = None  # stream time of the oldest frame of the batch in hand
    unjudged_since: float | None = None  # ... of the batch being written or judged (None: all judged)
    last_commit_lag_s: float = 0.0
    consumer_pending: int = 0  # frames JetStream holds for this collector
    notify_backlog: int = 0
    channel_failed_at: Mapping[str, float] = field(default_factory=dict)  # last dead letter per channel
    channel_sent_at: Mapping[str, float] = field(default_factory=dict)  # last delivery per channel
    drained_below: int = 0  # after an outage: impaired until JetStream holds at most this (a batch)
    last_commit_at: float = 0.0  # wall time of the ingest's last committed batch
    last_newest_lag_s: float = 0.0  # the last batch's newest frame: stream time to commit


@dataclass(slots=True)
class SelfState:
    """Since-times the judge keeps between calls (owned by the caller, plain data)."""

    nats_down_since: float | None = None
    lag_since: float | None = None
    backlog_since: float | None = None
    impaired_since: float | None = None
    causes_ended_at: float | None = None  # the outage's causes are gone; its backlog may not be


@dataclass(frozen=True, slots=True)
class Problem:
    check: str  # PIPELINE or NOTIFY
    status: str  # critical or warning
    cause: str  # nats, postgres, ingest_lag, backlog, channels
    since: float
    summary: str
    advice: str
    channels: tuple[str, ...] = ()  # NOTIFY: the failing channels (not told about themselves)


@dataclass(frozen=True, slots=True)
class SelfStatus:
    impaired_since: float | None = None
    problems: tuple[Problem, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "impaired_since": self.impaired_since,
            "problems": [
                {
                    "check": p.check,
                    "status": p.status,
                    "cause": p.cause,
                    "since": p.since,
                    "summary": p.summary,
                    "advice": p.advice,
                }
                for p in self.problems
            ],
        }


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def behind(r: Readings) -> float:
    """How far the health engine's view of the stream trails ``r.now``: ``now`` minus the
    stream time of the oldest frame it has not judged yet (the batch being written or judged,
    else the first of those JetStream still holds), 0 when it has judged every frame it knows of.

    Hosts are judged stale at ``now - behind`` (``Alerting.tick``): a host whose frames wait
    behind a lagging ingest is not silent, and a 1 s host's 3 s ``stale_after`` is shorter than
    a loaded collector's lag well before ``[selfcheck] ingest_lag`` calls it impaired.
    """
    if r.unjudged_since is not None:
        return max(0.0, r.now - r.unjudged_since)
    if r.consumer_pending > 0 and r.last_commit_at > 0:  # the newest frame judged, more waiting
        return max(0.0, r.now - (r.last_commit_at - r.last_newest_lag_s))
    return 0.0


def judge(state: SelfState, r: Readings, cfg: SelfCheckConfig) -> SelfStatus:
    """The collector's own problems at ``r.now`` (updates the since-times in ``state``)."""
    now = r.now
    if r.nats_connected:
        state.nats_down_since = None
    elif state.nats_down_since is None:
        state.nats_down_since = now
    lag = now - r.writing_since if r.writing_since is not None else r.last_commit_lag_s
    lagging = r.consumer_pending > 0 and lag > cfg.ingest_lag
    if not lagging:
        state.lag_since = None
    elif state.lag_since is None:
        state.lag_since = now
    held = (
        f"JetStream holds {r.consumer_pending} frames" if r.consumer_pending else "JetStream holds the rest"
    )
    causes: list[tuple[str, float, str, str]] = []
    if state.nats_down_since is not None:
        causes.append(
            (
                "nats",
                state.nats_down_since,
                "cannot receive: the collector's NATS connection is down since "
                f"{clock(state.nats_down_since)}; agents buffer their frames meanwhile",
                "The collector's own connection to NATS is broken, not the hosts: check the NATS servers and "
                "the network between them and the collector. Agents keep their frames (nats.buffer_frames) "
                "and replay them when NATS is back; host staleness is suspended until then.",
            )
        )
    if r.postgres_down_since is not None:
        causes.append(
            (
                "postgres",
                r.postgres_down_since,
                f"cannot store: PostgreSQL unreachable since {clock(r.postgres_down_since)}; ingest paused, "
                f"nothing lost so far, {held}",
                "The collector's own database is unreachable, not the hosts: check PostgreSQL (service, "
                "disk, "
                "connections, network). Frames wait in JetStream and are stored when it is back (up to the "
                "stream's limits); pages still go out and are recorded later; host staleness is suspended.",
            )
        )
    if state.lag_since is not None:
        causes.append(
            (
                "ingest_lag",
                state.lag_since,
                f"ingest lagging: frames wait {lag:.0f} s for their commit, {held}",
                "The collector stores frames slower than they arrive (a slow PostgreSQL, too small a "
                "[collector] batch, CPU starvation): host staleness is suspended until the backlog drains.",
            )
        )
    if causes:
        first = min(c[1] for c in causes)
        if state.impaired_since is None:
            state.impaired_since = first
        state.causes_ended_at = None
    elif state.impaired_since is not None:
        # The outage is over; its backlog may not be: still impaired (no alert) until the ingest
        # has caught up (its last batch's newest frame is recent and at most a batch waits) or is
        # idle, and at least `grace` after the causes ended (time for fresh arrivals).
        if state.causes_ended_at is None:
            state.causes_ended_at = now
        caught_up = r.writing_since is None and (
            (r.last_newest_lag_s <= cfg.grace and r.consumer_pending <= r.drained_below)
            or now - r.last_commit_at > cfg.grace
        )
        if caught_up and now - state.causes_ended_at >= cfg.grace:
            state.impaired_since = state.causes_ended_at = None
    problems: list[Problem] = []
    if causes:
        cause, since, summary, advice = causes[0]
        if now - since >= cfg.grace:
            problems.append(Problem(PIPELINE, CRITICAL, cause, since, summary, advice))
    # notifications
    if r.notify_backlog > cfg.notify_backlog:
        if state.backlog_since is None:
            state.backlog_since = now
    else:
        state.backlog_since = None
    failing = sorted(
        ch
        for ch, at in r.channel_failed_at.items()
        if now - at <= cfg.channel_window and r.channel_sent_at.get(ch, 0.0) < at
    )
    notes: list[str] = []
    since = now
    if state.backlog_since is not None and now - state.backlog_since >= cfg.grace:
        notes.append(f"{r.notify_backlog} notifications waiting")
        since = state.backlog_since
    if failing:
        notes.append(f"channel {', '.join(failing)} failing (notifications dead-lettered)")
        since = min(since, min(r.channel_failed_at[c] for c in failing))
    if notes:
        problems.append(
            Problem(
                NOTIFY,
                WARNING,
                "channels" if failing else "backlog",
                since,
                f"notifications impaired: {'; '.join(notes)}",
                "Check the failing receivers (URL, credentials, their own health) in the log and "
                "notification_dead_letter; other channels still deliver.",
                tuple(failing),
            )
        )
    return SelfStatus(state.impaired_since, tuple(problems))


def observations(status: SelfStatus, labels: Mapping[str, str], now: float) -> list[Observation]:
    """One observation per self check: its problem, or healthy (the alert engine resolves)."""
    by = {p.check: p for p in status.problems}
    out = []
    for check in CHECKS:
        p = by.get(check)
        key = labels_key(check, labels)
        if p is None:
            out.append(Observation(check, HEALTHY, labels, key, now))
        else:
            out.append(
                Observation(check, p.status, labels, key, now, now - p.since, p.summary, p.advice, True)
            )
    return out


class Heartbeat:
    """The dead man's switch: a POST to ``url`` at most every ``interval`` seconds, sent only
    when :meth:`beat` is called (by the alerting loop, after each completed tick)."""

    def __init__(self, url: str | None, interval: float, timeout: float = 10.0) -> None:
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self.sent = 0
        self.failures = 0
        self.last_sent_at: float | None = None
        self._last_try = -1e18
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def beat(self, status: SelfStatus, now: float | None = None) -> None:
        """Called with progress: start a POST if one is due and none is in flight."""
        if self.url is None:
            return
        mono = time.monotonic() if now is None else now
        if mono - self._last_try < self.interval or (self._task is not None and not self._task.done()):
            return
        self._last_try = mono
        body = {"status": "degraded" if status.problems else "ok", "at": time.time(), **status.as_dict()}
        self._task = asyncio.create_task(self._post(self.url, body), name="heartbeat")

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(url, json=body) as resp:
                if resp.status >= 300:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            self.failures += 1
            if self.failures == 1 or self.failures % 10 == 0:  # the URL is a secret: never logged
                log.warning("heartbeat not delivered (%d failures): %s", self.failures, type(e).__name__)
            return
        self.sent += 1
        self.last_sent_at = time.time()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None
        if self._session is not None:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self._session.close()
            self._session = None
