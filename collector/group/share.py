"""The part that shares a group member's buckets with the others and keeps its fleet view
(:mod:`collector.group.fleet`): once a second it publishes what changed in the buckets it holds
(and every ``[collector] group_refresh`` their whole content) on
``gpuwarden.group.<group_kv>.fleet.<member>``, and it takes the others' messages into the view
that the API, the live rollup and the live stream read. See docs/operations.md, "Collector
group", and docs/protocol.md, "Collector group summaries"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Final, Protocol

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from collector.alerts.model import Alert, Incident
from collector.group.fleet import SUBJECT, FleetView, HostRow, Outbox, decode, encode, health_of, row_of
from collector.group.scope import Scope
from collector.health.live import LiveRollup
from collector.notify.stream import Broadcaster
from collector.state import FleetState
from shared.ratelog import RateLimitedLog
from shared.subjects import sanitize_token
from shared.tasks import cancel_all

log = logging.getLogger(__name__)
INTERVAL: Final = 1.0  # seconds between two messages of changes
MAX_EVENTS: Final = 10_000  # live events kept for the next message (more are dropped, counted)


class _Holder(Protocol):
    settled: set[int]
    fence_timeouts: int

    def tokens(self) -> dict[int, int]: ...


class _Alerts(Protocol):
    @property
    def alerts(self) -> Mapping[str, Alert]: ...

    @property
    def incidents(self) -> Mapping[str, Incident]: ...


def subject(kv: str, member: str) -> str:
    return SUBJECT.format(kv=sanitize_token(kv), member=member)


class FleetShare:
    def __init__(
        self,
        name: str,
        kv: str,
        refresh: float,
        nc: Callable[[], NatsClient | None],
        holder: _Holder,
        scope: Scope,
        view: FleetView,
        live: LiveRollup,
        alerts: Callable[[], _Alerts],
        fleet: FleetState,
        broadcaster: Broadcaster,
        committed: Callable[[Incident], Incident] = lambda inc: inc,
        forgotten: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self.name, self.kv, self.refresh = name, kv, refresh
        self.nc, self.holder, self.scope, self.view = nc, holder, scope, view
        self.live, self.alerts, self.fleet, self.broadcaster = live, alerts, fleet, broadcaster
        self.committed = committed  # an incident as committed (what it says it told)
        self.forgotten = forgotten  # hosts forgotten that have not reported since (tombstones)
        self.outbox = Outbox(name)
        self.sent_bytes = 0
        self.sent_messages = 0
        self.received_bytes = 0
        self.undecodable = 0
        self.events_dropped = 0
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._held: frozenset[int] = frozenset()
        self._ratelog = RateLimitedLog(log, 60.0)
        self._own = subject(kv, name)

    async def start(self) -> None:
        nc = self.nc()
        assert nc is not None, "NATS starts before the group's fleet view"
        self._sub = await nc.subscribe(subject(self.kv, "*"), cb=self._on_message)
        self.broadcaster.tap = self._keep
        self._task = asyncio.create_task(self._run(), name="group-fleet")

    async def stop(self) -> None:
        self.broadcaster.tap = None
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    def collect(self) -> Iterator[Metric]:
        """``/metrics``: what the fleet view costs and how current it is, and the buckets the
        lease rounds could not take for a locked fencing row (docs/api.md)."""
        g = "gpuwarden_group_fleet_"
        v = self.view
        for name, doc, value in (
            ("sent_bytes", "Bytes of summaries this member published.", self.sent_bytes),
            ("sent_messages", "Summaries this member published.", self.sent_messages),
            ("received_bytes", "Bytes of the other members' summaries taken in.", self.received_bytes),
            ("received_messages", "Summaries taken in (the other members' and its own).", v.received),
            (
                "refused",
                "Bucket contents dropped: sent with an older lease token than the view's.",
                v.refused,
            ),
            ("undecodable", "Messages on the summary subjects that did not decode.", self.undecodable),
            ("events_dropped", "Live events not relayed: more than 10,000 waiting.", self.events_dropped),
        ):
            yield CounterMetricFamily(g + name, doc, value=float(value))
        yield CounterMetricFamily(
            "gpuwarden_group_fence_timeouts",
            "Buckets not taken at a lease round: their fencing row stayed locked past the raise's"
            " lock_timeout (lease / 8); taken at a later round.",
            value=float(self.holder.fence_timeouts),
        )
        yield GaugeMetricFamily(
            g + "hosts", "Hosts of other members' buckets in the view.", value=len(v.names())
        )
        yield GaugeMetricFamily(
            g + "stale_buckets",
            "Buckets held elsewhere that nobody has spoken for in 3 x group_refresh (their hosts: unknown).",
            value=len(v.stale_buckets()),
        )

    def _keep(self, event: dict[str, Any]) -> None:
        if len(self.outbox.events) >= MAX_EVENTS:
            self.events_dropped += 1
            return
        self.outbox.events.append(event)

    async def _on_message(self, msg: Msg) -> None:
        if msg.subject == self._own:
            return  # its own (applied when sent): not decoded
        try:
            s = decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as e:
            self.undecodable += 1
            self._ratelog.warning(
                "undecodable", "group fleet view: undecodable message on %s: %s", msg.subject, e
            )
            return
        if s.member == self.name:
            return  # its own (applied when sent)
        self.received_bytes += len(msg.data)
        self.live.touch(self.view.apply(s, time.time()))
        for event in s.events:
            self.broadcaster.publish(event, relayed=True)

    async def _run(self) -> None:
        last_full = -self.refresh
        while True:
            await asyncio.sleep(INTERVAL)
            mono = time.monotonic()
            full = mono - last_full >= self.refresh
            if full:
                last_full = mono
            try:
                await self.publish(full)
            except (nats.errors.Error, OSError) as e:
                self._ratelog.warning("publish", "group fleet view: not published: %s", e)

    async def publish(self, full: bool) -> None:
        """One round: the changes (or everything) of the buckets held and settled."""
        now = time.time()
        tokens = self.holder.tokens()
        held = {b: t for b, t in tokens.items() if b in self.holder.settled}
        if frozenset(held) != self._held:
            self._held = frozenset(held)
            self.live.invalidate()  # hosts move between judged here and read from the others
        self.live.touch(self.view.expire(now))
        hosts: dict[int, dict[str, HostRow]] = {}
        for name, hh in self.live.current().hosts.items():
            b = self.scope.bucket(name)
            if b is None or b not in held:
                continue
            fh = self.fleet.host(name)
            seen = fh.last_seen if fh is not None and fh.last_seen else hh.last_seen
            if hh.via:  # taken over, not judged here yet: the previous owner's word, now stale
                hh = health_of(row_of(hh, b, seen), hh.via, True)
            hosts.setdefault(b, {})[name] = row_of(hh, b, seen)
        state = self.alerts()
        alerts: dict[int, dict[str, Alert]] = {}
        for a in state.alerts.values():
            if (b := self.scope.of_labels(a.labels)) in held:
                alerts.setdefault(b, {})[a.fingerprint] = a
        incidents: dict[int, dict[str, Incident]] = {}
        for inc in state.incidents.values():
            if (b := self.scope.of_incident(inc)) in held:
                incidents.setdefault(b, {})[inc.id] = self.committed(inc)
        gone: dict[int, set[str]] = {}
        for name in self.forgotten():
            if (b := self.scope.bucket(name)) in held:
                gone.setdefault(b, set()).add(name)
        forgotten = {b: frozenset(names) for b, names in gone.items()}
        nc = self.nc()
        for s in self.outbox.messages(now, held, hosts, alerts, incidents, full, forgotten):
            self.view.apply(s, now)  # its own word, kept for when it loses the bucket
            data = encode(s)
            if nc is not None and nc.is_connected:
                await nc.publish(self._own, data)
                self.sent_bytes += len(data)
                self.sent_messages += 1
