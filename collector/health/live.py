"""The live rollup: an incrementally maintained health rollup for the API and ``/metrics``,
so that requests never pay for a whole-fleet recomputation (about 0.4 s at 10,000 hosts x 8
GPUs).

A host's health changes only when the health engine judges one of its frames or when the
timer marks it stale (or an XID window expires): :class:`LiveRollup` marks dirty the hosts of
each judged batch that its judging observed, and those whose GPUs a sample changed silently
(:meth:`LiveRollup.mark`, called by the engine runner: a quiet healthy sample, most of a
healthy fleet's, marks nothing; recomputing a host costs about 25-50 us), scans cheap
per-host flags once a second for what the timer changed, and recomputes only the dirty hosts with the pure
:func:`collector.health.rollup.host_health`, keeping per-provider counts up to date by
subtracting a host's old contribution and adding its new one. Small backlogs are applied
on read; large ones by :meth:`LiveRollup.refresh` in chunks, yielding to the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from collector.health.config import ProviderThresholds
from collector.health.model import CRITICAL, STATUSES, UNKNOWN, HealthState, HostState
from collector.health.rollup import FleetHealth, HostHealth, ProviderHealth, host_health, provider_status
from shared.frames import Frame, SampleFrame

SYNC_LIMIT: Final = 500  # dirty hosts recomputed inside a request; more go to the refresher
CHUNK: Final = 250  # hosts recomputed between yields to the event loop


@dataclass(slots=True)
class _Totals:
    hosts: int = 0
    hosts_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    gpus_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    usable: int = 0

    def add(self, h: HostHealth, sign: int) -> None:
        self.hosts += sign
        self.hosts_by[h.status] += sign
        for s, n in h.gpus_by_status.items():
            self.gpus_by[s] += sign * n
        self.usable += sign * h.gpus_usable


class Remote(Protocol):
    """Hosts judged elsewhere (a collector group's fleet view, :mod:`collector.group.fleet`)."""

    def names(self) -> set[str]: ...

    def host(self, name: str, held_here: bool = False) -> HostHealth | None: ...


class LiveRollup:
    """Host and provider health of the health state ``health()``, kept current at the cost
    of the changes; ``provider`` decides a provider's status from its hosts."""

    def __init__(self, health: Callable[[], HealthState], provider: ProviderThresholds) -> None:
        self.health = health
        self.provider = provider
        self.hosts: dict[str, HostHealth] = {}
        self._totals: dict[str, _Totals] = {}
        self._members: dict[str, set[str]] = {}
        self._flags: dict[str, tuple[bool, bool, str]] = {}
        self._gpus: dict[str, list[tuple[int, str, bool, bool]]] = {}  # as of the host's last recompute
        self._dirty: set[str] = set()
        self._xid_hosts: set[str] = set()
        self._full = True
        self._fleet: FleetHealth | None = None
        self._sorted: dict[str | None, list[str]] = {}
        self.remote: Remote | None = None  # its hosts count too (their health is its word)

    def mark(self, frames: Sequence[Frame], observed: Collection[str] | None = None) -> None:
        """Hosts whose health the engine may just have changed (fast event path and ingest
        alike): with ``observed`` (the hosts the judging of ``frames`` emitted observations
        for), a sample frame marks its host only when it was observed, is not in the rollup
        yet, or its GPUs' identity, staleness or loss changed (what a sample changes without an
        observation); every other check change comes with one (an emitted verdict, or a retired
        check's final one). Without ``observed``, every host of ``frames``."""
        dirty = self._dirty
        if observed is None:
            dirty.update(f.host for f in frames)
            return
        engine_hosts, have, gpus = self.health().hosts, self.hosts, self._gpus
        for f in frames:
            name = f.host
            if name in dirty:
                continue
            if name in observed or type(f) is not SampleFrame or name not in have:
                dirty.add(name)
                continue
            hs = engine_hosts.get(name)
            if hs is None or gpus.get(name) != _gpu_states(hs):
                dirty.add(name)

    def touch(self, hosts: Iterable[str]) -> None:
        """Hosts whose remote health changed."""
        self._dirty.update(hosts)

    def invalidate(self) -> None:
        """Recompute every host (the hosts judged here changed: a collector group's buckets moved)."""
        self._full = True

    def forget(self, host: str) -> None:
        """A host left the fleet (``forget-host``)."""
        self._dirty.add(host)

    def scan(self) -> None:
        """Mark what the health timer changed: staleness, never-reported hosts, XID windows."""
        engine_hosts = self.health().hosts
        flags = self._flags
        dirty = self._dirty
        for name, hs in engine_hosts.items():
            if flags.get(name) != (hs.stale, hs.last_frame_at is None, hs.provider):
                dirty.add(name)
        dirty.update(self._xid_hosts)  # XID windows expire with time (XIDs arrive in frames)
        if len(engine_hosts) < len(self.hosts):
            dirty.update(h for h, hh in self.hosts.items() if not hh.via and h not in engine_hosts)

    def _apply(self, names: list[str]) -> None:
        engine_hosts = self.health().hosts
        for name in names:
            old = self.hosts.pop(name, None)
            if old is not None:
                self._totals[old.provider].add(old, -1)
                self._members[old.provider].discard(name)
            hs = engine_hosts.get(name)
            new = self.remote.host(name, hs is None) if self.remote is not None else None
            if hs is None:
                self._flags.pop(name, None)
                self._gpus.pop(name, None)
                self._xid_hosts.discard(name)
                if new is None:
                    continue
            else:
                self._flags[name] = (hs.stale, hs.last_frame_at is None, hs.provider)
                self._gpus[name] = _gpu_states(hs)
                if new is None:
                    new = host_health(hs)
                    if any(gs.xids or gs.fatal_xids for gs in hs.gpus.values()):
                        self._xid_hosts.add(name)
                    else:
                        self._xid_hosts.discard(name)
            self.hosts[name] = new
            self._totals.setdefault(new.provider, _Totals()).add(new, 1)
            self._members.setdefault(new.provider, set()).add(name)
            if old is None or old.provider != new.provider:
                self._sorted.clear()
        if names:
            self._fleet = None

    def _take(self, n: int | None = None) -> list[str]:
        if self._full:
            self._full = False
            self._dirty.update(self.health().hosts)
            self._dirty.update(self.hosts)
            if self.remote is not None:
                self._dirty.update(self.remote.names())
        if n is None or n >= len(self._dirty):
            names, self._dirty = list(self._dirty), set()
            return names
        return [self._dirty.pop() for _ in range(n)]

    def current(self) -> FleetHealth:
        """The rollup now; applies a small backlog first (a large one is the refresher's)."""
        if self._full or (self._dirty and len(self._dirty) <= SYNC_LIMIT):
            self._apply(self._take())
        if self._fleet is None:
            self._fleet = FleetHealth(self._providers(), self.hosts)
        return self._fleet

    def names(self, provider: str | None) -> list[str]:
        """Host names (of one provider), sorted; cached until membership changes."""
        self.current()
        out = self._sorted.get(provider)
        if out is None:
            src = self.hosts if provider is None else self._members.get(provider, ())
            out = self._sorted[provider] = sorted(src)
        return out

    def _providers(self) -> dict[str, ProviderHealth]:
        cfg = self.provider
        out = {}
        for name in sorted(self._totals):
            t = self._totals[name]
            if t.hosts <= 0:
                continue
            total = sum(t.gpus_by.values())
            crit = t.gpus_by[CRITICAL] * 100.0 / total if total else 0.0
            out[name] = ProviderHealth(
                name,
                provider_status(crit, total, t.hosts_by[UNKNOWN], cfg),
                t.hosts,
                dict(t.hosts_by),
                total,
                dict(t.gpus_by),
                t.usable,
                t.usable * 100.0 / total if total else 100.0,
                crit,
            )
        return out

    async def refresh(self) -> None:
        """Scan, then recompute the dirty hosts in chunks, yielding between them; a last scan
        catches what changed during the yields, so the rollup is current when this returns."""
        self.scan()
        while self._dirty or self._full:
            self._apply(self._take(CHUNK))
            await asyncio.sleep(0)
        self.scan()  # what the health timer changed while this refresh yielded
        if len(self._dirty) <= SYNC_LIMIT:
            self._apply(self._take())


def _gpu_states(hs: HostState) -> list[tuple[int, str, bool, bool]]:
    """What of a host's GPUs its health shows and a sample changes without an observation."""
    return [(gs.index, gs.uuid, gs.stale, gs.lost) for gs in hs.gpus.values()]
