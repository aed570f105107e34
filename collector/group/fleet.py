"""The fleet view of a collector group member: the other members' hosts, alerts and incidents,
from the summaries they publish on NATS (docs/protocol.md, "Collector group summaries").

A member judges only the hosts of the buckets it holds, yet its API, page, ``/metrics``
provider totals and live stream cover the whole fleet: every member publishes, on
``gpuwarden.group.<group_kv>.fleet.<member>``, what changed in its buckets (host health
summaries, alerts, incidents, live events) about once a second, and every ``refresh`` the
whole content of its buckets, so a member that starts learns the fleet within one refresh.
Each bucket's content carries the sender's lease token on it (the KV revision: it only grows),
so a new owner's word replaces the old one's and a late message from a member that lost the
bucket is ignored.

This module is pure (messages and time in, the view out): :class:`FleetView` keeps what was
received, :class:`Outbox` computes what to send; :mod:`collector.group.share` moves them over
NATS. A bucket nobody has refreshed for ``stale_after`` (its owner died and no one took it
yet) keeps its hosts, marked stale with an unknown status: never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from collector.alerts.model import Alert, Incident, plain
from collector.health.model import STATUSES, UNKNOWN
from collector.health.rollup import HostHealth

SUBJECT: Final = "gpuwarden.group.{kv}.fleet.{member}"
MAX_ITEMS: Final = 500  # hosts, alerts, incidents or events in one message (bounds its size)
# How long past ``group_interval`` a member holds an alert's own first notice for another
# member's provider incident (collector.alerts.correlate.Fleet.handoff): the judge sees the hold
# about a second after it (one message a second), its update is committed, and the holder sees
# that about a second later; the rest is slack for a loaded machine.
HANDOFF: Final = 5.0


class HostRow(msgspec.Struct, array_like=True, frozen=True):
    """A host's health in a few dozen bytes: counts of its GPUs by status (in the order of
    :data:`collector.health.model.STATUSES`)."""

    host: str
    provider: str
    bucket: int
    status: str
    stale: bool
    gpus: tuple[int, ...]
    usable: int
    last_seen: float | None  # sent with every whole summary; alone it is not a change

    def same(self, other: HostRow | None) -> bool:
        """The same health (``last_seen`` aside: every frame moves it)."""
        return other is not None and (self.status, self.stale, self.gpus, self.usable, self.provider) == (
            other.status,
            other.stale,
            other.gpus,
            other.usable,
            other.provider,
        )


class Summary(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message: ``held`` bucket -> lease token of the buckets it speaks for; ``full``
    the buckets whose whole content it carries (what is not in it is gone)."""

    member: str
    at: float
    held: dict[int, int] = {}
    full: list[int] = []
    hosts: list[HostRow] = []
    hosts_gone: list[str] = []
    alerts: list[dict[str, Any]] = []  # collector.alerts.model.plain(Alert)
    alerts_gone: list[str] = []  # fingerprints
    incidents: list[dict[str, Any]] = []  # plain(Incident)
    incidents_gone: list[str] = []
    events: list[dict[str, Any]] = []  # live-stream events (docs/api.md), relayed as they are
    # hosts forgotten (DELETE /api/v1/hosts/{host}) that have not reported since: tombstones, in
    # the message of changes after the forget and in every whole summary of their bucket
    forgotten: list[str] = []


_encoder = msgspec.msgpack.Encoder(enc_hook=str)
_decoder = msgspec.msgpack.Decoder(Summary)


def encode(s: Summary) -> bytes:
    return _encoder.encode(s)


def decode(data: bytes) -> Summary:
    return _decoder.decode(data)


def row_of(hh: HostHealth, bucket: int, last_seen: float | None) -> HostRow:
    counts = tuple(hh.gpus_by_status.get(s, 0) for s in STATUSES)
    return HostRow(hh.host, hh.provider, bucket, hh.status, hh.stale, counts, hh.gpus_usable, last_seen)


def health_of(row: HostRow, via: str, stale: bool) -> HostHealth:
    """The host as the API and the rollup see it; ``stale``: its owner is not known now."""
    by = dict(zip(STATUSES, row.gpus, strict=True))
    if stale:
        n = sum(row.gpus)
        by = {**dict.fromkeys(STATUSES, 0), UNKNOWN: n}
        return HostHealth(row.host, row.provider, UNKNOWN, True, (), by, 0, (), row.last_seen, via)
    return HostHealth(
        row.host, row.provider, row.status, row.stale, (), by, row.usable, (), row.last_seen, via
    )


def alert_of(d: Mapping[str, Any]) -> Alert:
    return Alert(**{**d, "labels": dict(d["labels"])})


def incident_of(d: Mapping[str, Any]) -> Incident:
    return Incident(**d)


@dataclass(slots=True)
class _Claim:
    token: int
    member: str
    at: float  # when its content was last heard of (receiver's clock)


@dataclass(slots=True)
class _Bucket:
    hosts: dict[str, HostRow] = field(default_factory=dict)
    alerts: dict[str, Alert] = field(default_factory=dict)
    incidents: dict[str, Incident] = field(default_factory=dict)


class FleetView:
    """What the other members said about their buckets. ``local(bucket)``: held here (read
    from the engines, not from here); ``bucket_of(host)`` as :class:`collector.group.scope.Scope`."""

    def __init__(
        self, stale_after: float, local: Callable[[int], bool], bucket_of: Callable[[str], int | None]
    ) -> None:
        self.stale_after = stale_after
        self.local = local
        self.bucket_of = bucket_of
        self.claims: dict[int, _Claim] = {}
        self.buckets: dict[int, _Bucket] = {}
        self.received = 0
        self.refused = 0  # bucket contents from a member whose token was older than the view's
        self._stale: set[int] = set()
        # told each tombstone taken in (a forgotten host: it leaves the member's fleet state too)
        self.on_forgotten: Callable[[str], None] = lambda _name: None

    # ------------------------------------------------------------------ in

    def apply(self, s: Summary, now: float) -> set[str]:
        """Take a message in; the hosts whose row changed."""
        self.received += 1
        ok: set[int] = set()
        for b, token in s.held.items():
            c = self.claims.get(b)
            if c is None or token >= c.token:
                self.claims[b] = _Claim(token, s.member, now)
                ok.add(b)
                self._stale.discard(b)
            else:
                self.refused += 1
        changed: set[str] = set()
        for b in ok.intersection(s.full):
            old = self.buckets.pop(b, None)
            if old is not None:
                changed.update(old.hosts)
        for r in s.hosts:
            if r.bucket in ok:
                self._at(r.bucket).hosts[r.host] = r
                changed.add(r.host)
        for name in s.hosts_gone:
            if self.bucket_of(name) in ok and self.forget(name):
                changed.add(name)
        for name in s.forgotten:
            if self.bucket_of(name) in ok:
                self.forget(name)
                changed.add(name)
                self.on_forgotten(name)
        for d in s.alerts:
            ab = self.bucket_of(d.get("labels", {}).get("host") or "")
            if ab is not None and ab in ok:
                a = alert_of(d)
                self._at(ab).alerts[a.fingerprint] = a
        for d in s.incidents:
            ib = self.bucket_of(d.get("host") or d.get("provider") or "")  # a provider's: its bucket
            if ib is not None and ib in ok:
                inc = incident_of(d)
                self._at(ib).incidents[inc.id] = inc
        for b in ok:
            got = self.buckets.get(b)
            if got is not None:
                for fp in s.alerts_gone:
                    got.alerts.pop(fp, None)
                for iid in s.incidents_gone:
                    got.incidents.pop(iid, None)
        return changed

    def forget(self, name: str) -> bool:
        """Drop host ``name``'s row (gone from its bucket, or forgotten); False if none."""
        got = self.buckets.get(self.bucket_of(name))  # type: ignore[arg-type]
        return got is not None and got.hosts.pop(name, None) is not None

    def _at(self, b: int) -> _Bucket:
        got = self.buckets.get(b)
        if got is None:
            got = self.buckets[b] = _Bucket()
        return got

    def expire(self, now: float) -> set[str]:
        """Buckets nobody refreshed for ``stale_after`` become stale: their hosts (changed)."""
        out: set[str] = set()
        for b, c in self.claims.items():
            if b not in self._stale and now - c.at > self.stale_after:
                self._stale.add(b)
                if (got := self.buckets.get(b)) is not None:
                    out.update(got.hosts)
        return out

    # ------------------------------------------------------------------ out

    def _remote(self) -> Iterator[tuple[int, _Bucket]]:
        for b, got in self.buckets.items():
            if not self.local(b):
                yield b, got

    def names(self) -> set[str]:
        return {h for _, got in self._remote() for h in got.hosts}

    def host(self, name: str, held_here: bool = False) -> HostHealth | None:
        """Another member's host; ``held_here``: also of a bucket held here (the previous
        owner's last word, for a host the engines here have not judged since the takeover)."""
        b = self.bucket_of(name)
        if b is None or (self.local(b) and not held_here):
            return None
        got = self.buckets.get(b)
        row = got.hosts.get(name) if got is not None else None
        if row is None:
            return None
        c = self.claims.get(b)
        return health_of(row, c.member if c is not None else "", b in self._stale)

    def alerts(self) -> Iterator[Alert]:
        return (a for _, got in self._remote() for a in got.alerts.values())

    def alert(self, fingerprint: str) -> Alert | None:
        return next((a for _, got in self._remote() if (a := got.alerts.get(fingerprint))), None)

    def incidents(self) -> Iterator[Incident]:
        return (i for _, got in self._remote() for i in got.incidents.values())

    def incident(self, iid: str) -> Incident | None:
        return next((i for _, got in self._remote() if (i := got.incidents.get(iid))), None)

    def stale_buckets(self) -> list[int]:
        return sorted(b for b in self._stale if not self.local(b))


@dataclass(slots=True)
class _Sent:
    hosts: dict[str, HostRow] = field(default_factory=dict)
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    incidents: dict[str, dict[str, Any]] = field(default_factory=dict)
    forgotten: frozenset[str] = frozenset()


class Outbox:
    """What a member sends: changes since its last message, and every ``refresh`` (and for a
    bucket newly held) the whole content of its buckets."""

    def __init__(self, member: str) -> None:
        self.member = member
        self.sent: dict[int, _Sent] = {}
        self.events: list[dict[str, Any]] = []

    def messages(
        self,
        now: float,
        held: Mapping[int, int],
        hosts: Mapping[int, Mapping[str, HostRow]],
        alerts: Mapping[int, Mapping[str, Alert]],
        incidents: Mapping[int, Mapping[str, Incident]],
        full: bool,
        forgotten: Mapping[int, frozenset[str]] | None = None,
    ) -> list[Summary]:
        """``hosts``, ``alerts``, ``incidents``: the content of each held bucket now;
        ``forgotten``: each held bucket's hosts forgotten that have not reported since."""
        forgotten = forgotten or {}
        out: list[Summary] = []
        for b in [b for b in self.sent if b not in held]:
            del self.sent[b]  # lost: its new owner speaks for it
        fresh = [b for b in held if b not in self.sent]
        whole = sorted(held) if full else sorted(fresh)
        delta = Summary(member=self.member, at=now)
        for b in sorted(held):
            now_hosts = hosts.get(b, {})
            now_alerts = {fp: plain(a) for fp, a in alerts.get(b, {}).items()}
            now_incs = {iid: plain(i) for iid, i in incidents.get(b, {}).items()}
            now_gone = forgotten.get(b, frozenset())
            before = self.sent.get(b)
            if b in whole or before is None:
                self.sent[b] = _Sent(dict(now_hosts), now_alerts, now_incs, now_gone)
                continue
            hosts_new = [r for h, r in now_hosts.items() if not r.same(before.hosts.get(h))]
            hosts_gone = [h for h in before.hosts if h not in now_hosts]
            alerts_new = [d for fp, d in now_alerts.items() if _changed(d, before.alerts.get(fp))]
            alerts_gone = [fp for fp in before.alerts if fp not in now_alerts]
            incs_new = [d for iid, d in now_incs.items() if before.incidents.get(iid) != d]
            incs_gone = [iid for iid in before.incidents if iid not in now_incs]
            gone_new = sorted(now_gone - before.forgotten)
            if not any((hosts_new, hosts_gone, alerts_new, alerts_gone, incs_new, incs_gone, gone_new)):
                # nothing to say (most buckets, most seconds): what was sent stands as it is
                # (``forgotten`` can only have shrunk: a host back is no tombstone any more)
                before.forgotten = now_gone
                continue
            delta.held[b] = held[b]
            delta.hosts += hosts_new
            delta.hosts_gone += hosts_gone
            delta.alerts += alerts_new
            delta.alerts_gone += alerts_gone
            delta.incidents += incs_new
            delta.incidents_gone += incs_gone
            delta.forgotten += gone_new
            # what the others have now: a row's last_seen as last sent, until it changes
            rows = {
                h: r if not r.same(before.hosts.get(h)) else before.hosts[h] for h, r in now_hosts.items()
            }
            kept = {
                fp: d if _changed(d, before.alerts.get(fp)) else before.alerts[fp]
                for fp, d in now_alerts.items()
            }
            self.sent[b] = _Sent(rows, kept, now_incs, now_gone)
        out += _chunks(delta, self.events)
        self.events = []
        batch = Summary(member=self.member, at=now)
        for b in whole:
            s = self.sent[b]
            batch.held[b] = held[b]
            batch.full.append(b)
            batch.hosts += s.hosts.values()
            batch.alerts += s.alerts.values()
            batch.incidents += s.incidents.values()
            batch.forgotten += sorted(s.forgotten)
            if max(len(getattr(batch, k)) for k in _WHOLE) >= MAX_ITEMS:
                out.append(batch)
                batch = Summary(member=self.member, at=now)
        if batch.full:
            out.append(batch)
        return out


_WHOLE: Final = ("hosts", "alerts", "incidents", "forgotten")  # the lists of a whole summary
_MOVING: Final = ("last_seen", "value")  # an active alert's, at every observation: not a change


def _changed(d: Mapping[str, Any], before: Mapping[str, Any] | None) -> bool:
    if before is None:
        return True
    return any(v != before.get(k) for k, v in d.items() if k not in _MOVING)


_LISTS: Final = ("hosts", "hosts_gone", "alerts", "alerts_gone", "incidents", "incidents_gone", "forgotten")


def _chunks(delta: Summary, events: list[dict[str, Any]]) -> list[Summary]:
    """The changes (and events), at most :data:`MAX_ITEMS` of each kind per message; the
    held tokens go with every chunk."""
    delta.events = events
    longest = max(len(getattr(delta, k)) for k in (*_LISTS, "events"))
    if longest == 0:
        return []
    out = []
    for i in range(0, longest, MAX_ITEMS):
        part = Summary(member=delta.member, at=delta.at, held=delta.held)
        for k in (*_LISTS, "events"):
            setattr(part, k, getattr(delta, k)[i : i + MAX_ITEMS])
        out.append(part)
    return out
