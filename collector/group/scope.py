"""What a group member may judge, write and send: the buckets it holds, applied to alert state.

The alert engine of a member holds the alerts of the hosts in its buckets. Its changes are
written per bucket (PostgreSQL's ``partition`` column is the group's ``base + bucket``: the
first group registered in a database has ``GROUP_PARTITION_BASE``, :func:`partition_base`),
so that the member that takes a bucket over loads exactly that bucket's alerts, incidents,
engine state, health snapshot and pending notifications. :meth:`Scope.split` cuts one step's
changes by bucket and drops what belongs to a bucket this member no longer holds (it must not
write for it); :class:`collector.group.store.GroupAlertStore` writes the rest in one
transaction behind the fencing check.

Where a thing goes: an alert, a transition or a delivery by its ``host`` label; a provider-wide
incident and its notifications by its provider (the member holding the provider's bucket
judges it, over the whole provider: :class:`collector.alerts.correlate.Fleet`); what has
neither (the collector's own self-check alerts) is the member's own (``LOCAL``: written
unfenced, not restored by another member).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import asyncpg

from collector.alerts.model import Incident
from collector.group.assign import GROUP_PARTITION_BASE, bucket_of
from collector.store.alerts import Changes
from shared.errors import SubjectError
from shared.subjects import sanitize_token

LOCAL = GROUP_PARTITION_BASE - 1  # the partition of a member's own (host-less) alerts (the first group's)
# partitions between two groups' bases: up to 1024 buckets ([collector] buckets) and LOCAL (base - 1)
GROUP_STRIDE: Final = 2048


def part_of(bucket: int, base: int = GROUP_PARTITION_BASE) -> int:
    return base + bucket


async def partition_base(conn: asyncpg.Connection, group_kv: str) -> int:
    """The group's first partition in this database (``collector_groups``, migration 0014),
    registered at its first member's start: the first group gets ``GROUP_PARTITION_BASE`` (the
    partitions every group used before), each next one ``GROUP_STRIDE`` above the last."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE collector_groups IN SHARE ROW EXCLUSIVE MODE")
        got = await conn.fetchval("SELECT base FROM collector_groups WHERE group_kv = $1", group_kv)
        if got is None:
            got = await conn.fetchval(
                "INSERT INTO collector_groups (group_kv, base)"
                " SELECT $1, coalesce(max(base) + $2, $3) FROM collector_groups RETURNING base",
                group_kv, GROUP_STRIDE, GROUP_PARTITION_BASE,
            )  # fmt: skip
    return int(got)


class Scope:
    """``owns(bucket)`` and ``tokens()`` come from :class:`collector.group.lease.Membership`."""

    def __init__(
        self, buckets: int, owns: Callable[[int], bool], tokens: Callable[[], Mapping[int, int]]
    ) -> None:
        self.buckets = buckets
        self.owns = owns
        self.tokens = tokens
        self.dropped = 0  # changes not written: their bucket was lost meanwhile
        self.base = GROUP_PARTITION_BASE  # the group's partitions (partition_base, set at restore)
        self._cache: dict[str, int | None] = {}

    def bucket(self, host: str) -> int | None:
        b = self._cache.get(host, -1)
        if b == -1:
            try:
                b = bucket_of(sanitize_token(host), self.buckets)
            except SubjectError:
                b = None
            if len(self._cache) > 1_000_000:
                self._cache.clear()
            self._cache[host] = b
        return b

    def mine(self, host: str) -> bool:
        b = self.bucket(host)
        return b is not None and self.owns(b)

    def _of(self, host: str | None, provider: str | None = None) -> int | None:
        """The bucket of a thing (None: the member's own)."""
        if host:
            return self.bucket(host)
        if provider is not None:  # a provider-wide incident: with its provider's judge
            return self.bucket(provider)
        return None

    def of_labels(self, labels: Mapping[str, Any]) -> int | None:
        return self._of(labels.get("host"))

    def of_incident(self, inc: Incident) -> int | None:
        return self._of(inc.host, inc.provider if inc.host is None else None)

    def of_payload(self, p: Mapping[str, Any]) -> int | None:
        labels = p.get("labels") or {}
        return self._of(labels.get("host"), labels.get("provider"))

    def judges(self, provider: str) -> bool:
        """This member judges the provider's provider-wide incident (it holds its bucket)."""
        b = self.bucket(provider)
        return b is not None and self.owns(b)

    def part(self, bucket: int) -> int:
        """The partition of ``bucket`` (the group's)."""
        return self.base + bucket

    @property
    def local(self) -> int:
        """The partition of what is no bucket's (the members' own alerts)."""
        return self.base - 1

    def split(
        self, ch: Changes, state_incidents: Mapping[str, Incident], held: Iterable[int]
    ) -> dict[int, Changes]:
        """Partition -> the changes to write there (only buckets ``held``, and ``LOCAL``)."""
        held = set(held)
        out: dict[int, Changes] = {}

        def at(b: int | None) -> Changes | None:
            if b is not None and b not in held:
                self.dropped += 1
                return None
            part = self.local if b is None else self.part(b)
            got = out.get(part)
            if got is None:
                got = out[part] = Changes()
            return got

        for fp, a in ch.alerts.items():
            if (c := at(self.of_labels(a.labels))) is not None:
                c.alerts[fp] = a
        if ch.deleted:
            first = at(next(iter(held)) if held else None)
            if first is not None:
                first.deleted |= ch.deleted
        for t in ch.transitions:
            if (c := at(self.of_labels(t.labels))) is not None:
                c.transitions.append(t)
        for iid, inc in ch.incidents.items():
            if (c := at(self.of_incident(inc))) is not None:
                c.incidents[iid] = inc
        for d in ch.deliveries:
            if (c := at(self.of_payload(d[2]))) is not None:
                c.deliveries.append(d)
        if ch.engine is not None:
            for b, engine in self.split_engine(ch.engine, state_incidents, held).items():
                if b in held:
                    c = at(b)
                    assert c is not None
                    c.engine = engine
        return out

    def split_engine(
        self, engine: Mapping[str, Any], incidents: Mapping[str, Incident], held: Iterable[int]
    ) -> dict[int, dict[str, Any]]:
        """The engine's own state per held bucket: hosts seen and incident slots of its hosts."""
        out: dict[int, dict[str, Any]] = {
            b: {"open_incidents": {}, "hosts": {}, "active_silences": list(engine.get("active_silences", []))}
            for b in held
        }
        for provider, hosts in engine.get("hosts", {}).items():
            for h in hosts:
                b = self.bucket(h)
                if b in out:
                    out[b]["hosts"].setdefault(provider, []).append(h)
        for slot, iid in engine.get("open_incidents", {}).items():
            inc = incidents.get(iid)
            b = self.of_incident(inc) if inc is not None else None
            if b in out:
                out[b]["open_incidents"][slot] = iid
        return out

    def split_health(self, snapshot: Mapping[str, Any], buckets: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Partition -> the snapshot of the hosts of ``buckets`` (one each, empty when none)."""
        held = set(buckets)
        out: dict[int, dict[str, Any]] = {self.part(b): {"hosts": {}} for b in held}
        for name, h in snapshot.get("hosts", {}).items():
            b = self.bucket(name)
            if b in held:
                out[self.part(b)]["hosts"][name] = h
        return out
