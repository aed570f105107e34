"""The fleet view of a collector group member (collector/group/fleet.py): pure, messages and
time in, the view out. The view through real members is tested in tests/test_group_e2e.py."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from collector.alerts import AlertEngine, alert_config_from
from collector.alerts.correlate import Fleet
from collector.alerts.model import Alert, AlertState, Incident, Notification
from collector.group.assign import bucket_of
from collector.group.fleet import MAX_ITEMS, FleetView, HostRow, Outbox, Summary, decode, encode
from collector.health.model import STATUSES, UNKNOWN, Observation, labels_key

BUCKETS = 64


def bucket(host: str) -> int:
    return bucket_of(host, BUCKETS)


def row(host: str, status: str = "healthy", gpus: int = 8) -> HostRow:
    counts = tuple(gpus if s == status else 0 for s in STATUSES)
    return HostRow(host, "p", bucket(host), status, False, counts, gpus if status == "healthy" else 0, 100.0)


def content(hosts: list[str], status: str = "healthy") -> dict[int, dict[str, HostRow]]:
    out: dict[int, dict[str, HostRow]] = {}
    for h in hosts:
        out.setdefault(bucket(h), {})[h] = row(h, status)
    return out


def alert(host: str, state: str = "firing") -> Alert:
    return Alert(
        f"fp-{host}", f"gpu.xid/{host}", "gpu.xid", {"host": host, "provider": "p"}, "critical", state
    )


def view(local: set[int] = frozenset()) -> FleetView:  # type: ignore[assignment]
    return FleetView(30.0, lambda b: b in local, bucket)


HOSTS = [f"gpu-{i:04d}" for i in range(200)]


def held_of(hosts: list[str], token: int = 5) -> dict[int, int]:
    return {bucket(h): token for h in hosts}


def send(
    out: Outbox,
    hosts: list[str],
    *,
    now: float = 0.0,
    full: bool = False,
    token: int = 5,
    status: str = "healthy",
    alerts: Mapping[int, Mapping[str, Alert]] | None = None,
    incidents: Mapping[int, Mapping[str, Incident]] | None = None,
) -> list[Summary]:
    return out.messages(
        now, held_of(hosts, token), content(hosts, status), alerts or {}, incidents or {}, full
    )


def test_a_new_member_learns_every_host_then_only_changes_travel() -> None:
    out, v = Outbox("m1"), view()
    first = send(out, HOSTS)
    assert sum(len(s.hosts) for s in first) == 200
    assert all(s.full for s in first)
    for s in first:
        v.apply(decode(encode(s)), 0.0)
    assert v.names() == set(HOSTS)
    assert send(out, HOSTS, now=1.0) == []  # nothing changed: nothing sent
    changed = HOSTS[:3]
    rest = [h for h in HOSTS if h not in changed]
    msgs = out.messages(2.0, held_of(HOSTS), content(rest), {}, {}, False)
    # the three hosts are gone from their buckets (those buckets' other hosts did not change)
    gone = [h for s in msgs for h in s.hosts_gone]
    assert sorted(gone) == sorted(changed)
    assert all(not s.full and not s.hosts for s in msgs)
    for s in msgs:
        v.apply(decode(encode(s)), 2.0)
    assert v.names() == set(rest)


def test_a_host_that_turns_critical_is_one_row() -> None:
    out, v = Outbox("m1"), view()
    for s in send(out, HOSTS):
        v.apply(s, 0.0)
    hosts = content(HOSTS)
    hosts[bucket(HOSTS[7])][HOSTS[7]] = row(HOSTS[7], "critical")
    msgs = out.messages(1.0, held_of(HOSTS), hosts, {}, {}, False)
    assert [r.host for s in msgs for r in s.hosts] == [HOSTS[7]]
    assert list(msgs[0].held) == [bucket(HOSTS[7])]  # only the bucket spoken for
    for s in msgs:
        v.apply(s, 1.0)
    hh = v.host(HOSTS[7])
    assert hh is not None
    assert hh.status == "critical"
    assert hh.via == "m1"
    assert hh.gpus_by_status["critical"] == 8


def test_a_newer_owner_replaces_the_old_and_a_late_message_of_the_old_is_ignored() -> None:
    v = view()
    old, new = Outbox("m1"), Outbox("m2")
    for s in send(old, HOSTS, token=5):
        v.apply(s, 0.0)
    for s in send(new, HOSTS, token=9, status="warning"):
        v.apply(s, 1.0)
    late = send(old, HOSTS, token=5, full=True, now=2.0)
    for s in late:
        v.apply(s, 2.0)
    assert v.refused > 0
    hh = v.host(HOSTS[0])
    assert hh is not None
    assert hh.status == "warning"
    assert hh.via == "m2"


def test_a_forgotten_host_is_a_tombstone_after_the_forget_and_in_every_whole_summary() -> None:
    out, v = Outbox("m1"), view()
    told: list[str] = []
    v.on_forgotten = told.append
    for s in send(out, HOSTS):
        v.apply(decode(encode(s)), 0.0)
    gone, rest = HOSTS[4], [h for h in HOSTS if h != HOSTS[4]]
    tomb = {bucket(gone): frozenset({gone})}
    msgs = out.messages(1.0, held_of(HOSTS), content(rest), {}, {}, False, tomb)
    assert [h for s in msgs for h in s.forgotten] == [gone]
    for s in msgs:
        v.apply(decode(encode(s)), 1.0)
    assert told == [gone]
    assert gone not in v.names()
    assert out.messages(2.0, held_of(HOSTS), content(rest), {}, {}, False, tomb) == []  # told once
    whole = out.messages(3.0, held_of(HOSTS), content(rest), {}, {}, True, tomb)
    assert [h for s in whole for h in s.forgotten] == [gone]  # a member that missed it hears again
    # an older owner's tombstone is not taken (nor its content)
    late = Summary(member="m0", at=4.0, held={bucket(HOSTS[5]): 1}, forgotten=[HOSTS[5]])
    v.apply(late, 4.0)
    assert told == [gone]
    assert HOSTS[5] in v.names()


def test_a_dead_members_hosts_stay_marked_stale_and_unknown() -> None:
    v = view()
    for s in send(Outbox("m1"), HOSTS):
        v.apply(s, 0.0)
    assert v.expire(10.0) == set()
    stale = v.expire(31.0)
    assert stale == set(HOSTS)  # all of them changed: the rollup recomputes them
    hh = v.host(HOSTS[0])
    assert hh is not None
    assert hh.status == UNKNOWN
    assert hh.stale
    assert hh.gpus_by_status[UNKNOWN] == 8
    assert hh.gpus_usable == 0
    assert v.names() == set(HOSTS)  # never dropped
    assert v.stale_buckets() == sorted({bucket(h) for h in HOSTS})
    # a taker speaks for them again: fresh
    for s in send(Outbox("m2"), HOSTS, token=7, now=40.0):
        v.apply(s, 40.0)
    hh = v.host(HOSTS[0])
    assert hh is not None
    assert hh.status == "healthy"
    assert not hh.stale


def test_the_buckets_held_here_are_read_from_the_engines_not_the_view() -> None:
    mine = {bucket(HOSTS[0])}
    v = view(mine)
    for s in send(Outbox("m1"), HOSTS, alerts={bucket(HOSTS[0]): {"fp-x": alert(HOSTS[0])}}):
        v.apply(s, 0.0)
    assert v.host(HOSTS[0]) is None
    assert HOSTS[0] not in v.names()
    # just taken over: until the engines here judge it, the previous owner's last word stands
    got = v.host(HOSTS[0], held_here=True)
    assert got is not None
    assert got.via == "m1"
    assert list(v.alerts()) == []
    assert v.alert(f"fp-{HOSTS[0]}") is None


def test_alerts_and_incidents_travel_and_leave() -> None:
    out, v = Outbox("m1"), view()
    b = bucket(HOSTS[3])
    a = alert(HOSTS[3])
    inc = Incident("inc-1", "p", HOSTS[3], 1.0, 1.0, alerts=[a.fingerprint])
    for s in send(out, HOSTS, alerts={b: {a.fingerprint: a}}, incidents={b: {inc.id: inc}}):
        v.apply(decode(encode(s)), 0.0)
    got = v.alert(a.fingerprint)
    assert got is not None
    assert got.labels == a.labels
    assert got.state == "firing"
    assert [i.id for i in v.incidents()] == ["inc-1"]
    a.state = "resolved"
    for s in send(out, HOSTS, now=1.0, alerts={b: {a.fingerprint: a}}, incidents={b: {}}):
        assert s.held == {b: 5}
        v.apply(decode(encode(s)), 1.0)
    got = v.alert(a.fingerprint)
    assert got is not None
    assert got.state == "resolved"
    assert list(v.incidents()) == []
    assert v.incident("inc-1") is None


def test_messages_are_bounded_and_events_are_relayed() -> None:
    many = [f"h-{i:05d}" for i in range(3 * MAX_ITEMS)]
    out = Outbox("m1")
    first = send(out, many)
    assert all(len(s.hosts) <= MAX_ITEMS + 100 for s in first)  # whole buckets, about MAX_ITEMS
    assert sorted(b for s in first for b in s.full) == sorted({bucket(h) for h in many})
    out.events = [{"type": "alert", "host": f"h-{i}"} for i in range(2 * MAX_ITEMS + 1)]
    msgs = send(out, many, now=1.0)
    assert [len(s.events) for s in msgs] == [MAX_ITEMS, MAX_ITEMS, 1]
    assert out.events == []


def test_the_size_of_a_200_host_fleets_summaries() -> None:
    """About what a member of a 200-host group sends (docs/operations.md quotes it)."""
    out = Outbox("collector-a-12345")
    full = sum(len(encode(s)) for s in send(out, HOSTS, now=1.7e9, full=True))
    hosts = content(HOSTS)
    hosts[bucket(HOSTS[7])][HOSTS[7]] = row(HOSTS[7], "critical")
    one = sum(len(encode(s)) for s in out.messages(1.7e9, held_of(HOSTS), hosts, {}, {}, False))
    print(f"200 hosts: full summary {full} bytes, one host changed {one} bytes")
    assert full < 200 * 80
    assert one < 200


def test_a_frame_that_only_moves_last_seen_sends_nothing() -> None:
    out = Outbox("m1")
    b = bucket(HOSTS[3])
    a = alert(HOSTS[3])
    send(out, HOSTS, alerts={b: {a.fingerprint: a}})
    hosts = content(HOSTS)
    hosts[b][HOSTS[3]] = msgspec.structs.replace(hosts[b][HOSTS[3]], last_seen=999.0)
    a.last_seen, a.value = 999.0, 3.0
    assert out.messages(1.0, held_of(HOSTS), hosts, {b: {a.fingerprint: a}}, {}, False) == []
    a.ack_by = "ops"
    msgs = out.messages(2.0, held_of(HOSTS), hosts, {b: {a.fingerprint: a}}, {}, False)
    assert [d["ack_by"] for s in msgs for d in s.alerts] == ["ops"]


# ----------------------------------------------------------------------------- provider-wide incidents

T0 = 1_700_000_000.0
ESCALATION = {
    "policy": [
        {
            "name": "critical",
            "match": {"severity": "critical"},
            "levels": [{"after": "0s", "notify": ["oncall"]}],
        }
    ]
}


def engine() -> AlertEngine:
    raw = {"alerts": {"provider_incident_min_hosts": 3}, "escalation": ESCALATION}
    return AlertEngine(alert_config_from(raw, env={}))


def down(host: str, at: float, status: str = "critical") -> Observation:
    labels = {"provider": "p", "host": host}
    key = labels_key("host.unreachable", labels)
    return Observation("host.unreachable", status, labels, key, at, 1.0, f"unreachable: {status}", "", True)


class Member:
    """One member's engine, judging provider ``p`` or not, reading the other's alerts."""

    def __init__(self, judges: bool) -> None:
        self.engine, self.state, self.judges = engine(), AlertState(), judges
        self.notes: list[Notification] = []

    def __call__(self, now: float, other: Member, *obs: Observation) -> None:
        fleet = Fleet(lambda p: self.judges, dict(other.state.by_fp))
        self.state, _, notes = self.engine.evaluate(self.state, list(obs), now, (), {"p": 10}, fleet)
        self.notes += notes

    def kinds(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(n.kind, n.hosts if n.fingerprint is None else (n.labels["host"],)) for n in self.notes]


def test_one_member_judges_a_provider_over_every_members_hosts() -> None:
    a, b = Member(judges=True), Member(judges=False)
    # 3 of the provider's 10 hosts fail: one judged by a, two by b; none alone has enough
    b(T0, a, down("h5", T0), down("h6", T0))
    a(T0 + 0.5, b, down("h0", T0 + 0.5))
    for t in range(1, 120, 5):
        b(T0 + t, a)
        a(T0 + t, b)
    assert b.kinds() == [("firing", ("h5",)), ("firing", ("h6",))]  # told by their owner
    assert [i for i in b.state.incidents.values() if i.host is None] == []  # b judges no provider
    assert a.kinds()[0] == ("provider_incident", ("h0", "h5", "h6"))  # one incident, the whole provider
    assert [k for k, _ in a.kinds()] == ["provider_incident"]
    (inc,) = [i for i in a.state.incidents.values() if i.host is None]
    assert inc.hosts == ["h0", "h5", "h6"]
    assert inc.total_hosts == 10
    # every host recovers: the judge closes it once the others' alerts resolved too
    t0 = T0 + 200
    b(t0, a, down("h5", t0, "healthy"), down("h6", t0, "healthy"))
    a(t0, b, down("h0", t0, "healthy"))
    for t in range(0, 900, 30):
        b(t0 + t, a)
        a(t0 + t, b)
    assert inc.closed_at is not None
    assert [k for k, _ in a.kinds()] == ["provider_incident", "resolved"]


def test_the_judge_opens_it_from_the_others_alerts_alone() -> None:
    a, b = Member(judges=True), Member(judges=False)
    b(T0, a, down("h5", T0), down("h6", T0), down("h7", T0))
    assert [i for i in b.state.incidents.values() if i.host is None] == []
    for t in range(1, 120, 5):
        a(T0 + t, b)  # no frame of its own: the others' alerts are enough
    assert a.kinds() == [("provider_incident", ("h5", "h6", "h7"))]


def test_a_member_that_does_not_judge_opens_nothing_even_with_enough_hosts() -> None:
    a, b = Member(judges=True), Member(judges=False)
    b(T0, a, *(down(f"h{i}", T0) for i in range(5, 10)))
    for t in range(1, 120, 5):
        b(T0 + t, a)
    assert [k for k, _ in b.kinds()] == ["firing"] * 5
    assert [i for i in b.state.incidents.values() if i.host is None] == []
