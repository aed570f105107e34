"""Property tests of the alert engine over random observation and command sequences:

- lifecycle: every alert follows pending -> firing -> resolved (or pending -> resolved), is in
  exactly one state, and never firing and resolved at once;
- escalation: within one episode and policy the level never decreases, and it does not move
  while the alert stays acknowledged (but for a first notice still due: level 0);
- a silenced or inhibited alert never produces a notification;
- every alert that reaches firing, unsilenced, is covered by a notification (its own, or its
  provider incident's first notification or an update) within ``group_interval`` + 1 s,
  unless it is silenced, inhibited or flapping before then (the driver wakes the engine
  when ``state.next_due`` says, at most 1 s late, as the collector's timer does);
- replaying the same inputs from the same (saved and restored) state gives the same
  transitions and notifications.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from collector.alerts import (
    Ack,
    AckIncident,
    AddSilence,
    AlertEngine,
    AlertState,
    ExpireSilence,
    Notification,
    Silence,
    Transition,
    Unack,
    alert_config_from,
    parse_matcher,
)
from collector.alerts.config import matches_all
from collector.health import Observation
from collector.health.model import labels_key

T0 = 1_700_000_000.0
RAW = {
    "alerts": {
        "for": "30s",
        "provider_incident_min_hosts": 2,
        "provider_incident_share": 0.3,
        "group_interval": "30s",
        "group_wait": "2s",
        "silence": [
            {"id": "cfg", "matchers": ["host=h2", "rule=~gpu\\..*"], "starts": T0 + 500, "ends": T0 + 1500}
        ],
    },
    "escalation": {
        "policy": [
            {
                "name": "critical",
                "match": {"severity": "critical"},
                "levels": [
                    {"after": "0s", "notify": ["oncall"]},
                    {"after": "5m", "notify": ["lead"]},
                    {"after": "15m", "notify": ["manager"]},
                ],
                "repeat": "20m",
            },
            {
                "name": "rest",
                "levels": [{"after": "0s", "notify": ["chat"]}, {"after": "10m", "notify": ["lead"]}],
            },
        ]
    },
}
CHECKS = ("gpu.temperature", "gpu.xid", "gpu.lost", "host.unreachable", "gpu.stale", "host.disk")
STATUSES = ("healthy", "healthy", "warning", "critical", "unknown", "info")

obs_st = st.tuples(
    st.integers(0, 3), st.integers(0, 1), st.sampled_from(CHECKS), st.sampled_from(STATUSES), st.booleans()
)
cmd_st = st.one_of(
    st.none(),
    st.tuples(st.just("ack"), st.integers(0, 60), st.one_of(st.none(), st.integers(1, 3000))),
    st.tuples(st.just("unack"), st.integers(0, 60), st.none()),
    st.tuples(st.just("ack_incident"), st.integers(0, 60), st.one_of(st.none(), st.integers(1, 3000))),
    st.tuples(st.just("silence"), st.integers(0, 3), st.integers(1, 3000)),
    st.tuples(st.just("expire"), st.integers(0, 5), st.none()),
)
steps_st = st.lists(
    st.tuples(st.one_of(st.integers(0, 12), st.integers(0, 400)), st.lists(obs_st, max_size=6), cmd_st),
    min_size=1,
    max_size=40,
)
Step = tuple[int, list[tuple[int, int, str, str, bool]], Any]

ENGINE = AlertEngine(alert_config_from(RAW, env={}))
LIFECYCLE = {"pending", "firing", "resolved"}
ALLOWED = {
    (None, "pending"),
    ("resolved", "pending"),
    ("pending", "firing"),
    ("pending", "resolved"),
    ("firing", "resolved"),
}


def observation(host: int, gpu: int, check: str, status: str, imm: bool, now: float) -> Observation:
    labels = {"provider": "p" if host < 3 else "q", "host": f"h{host}"}
    if check.startswith("gpu."):
        labels |= {"gpu": str(gpu), "uuid": f"GPU-{host}-{gpu}"}
    if check == "host.disk":
        labels["mount"] = "/"
    return Observation(
        check, status, labels, labels_key(check, labels), now, 1.0, f"{check} {status}", "", imm
    )


class Driver:
    """Runs steps against one state, checking the invariants after each evaluation."""

    def __init__(self, state: AlertState, now: float = T0) -> None:
        self.state = state
        self.now = now
        self.silences: dict[str, Silence] = {s.id: s for s in ENGINE.config.silences}
        self.silences.update(state.silences)
        self.lifecycle: dict[str, str] = {a.fingerprint: a.state for a in state.alerts.values()}
        self.levels: dict[str, tuple[int, str | None, int, float | None]] = {}
        self.log: list[tuple[list[Transition], list[Notification]]] = []
        self.last_eval = now - 1.0
        self.said: tuple[list[Transition], list[Notification]] = ([], [])
        self.owed: dict[str, float] = {}  # fingerprint -> when it fired, not yet covered
        self.gi = ENGINE.config.alerts.group_interval

    def commands(self, cmd: Any) -> tuple[Any, ...]:
        if cmd is None:
            return ()
        kind, n, extra = cmd
        fps = sorted(self.state.by_fp)
        if kind in ("ack", "unack"):
            if not fps:
                return ()
            fp = fps[n % len(fps)]
            return (Ack(fp, "alice", self.now + extra if extra else None),) if kind == "ack" else (Unack(fp),)
        if kind == "ack_incident":
            open_ = sorted(self.state.open_incidents.values())
            if not open_:
                return ()
            return (AckIncident(open_[n % len(open_)], "carol", self.now + extra if extra else None),)
        if kind == "silence":
            s = Silence(f"s{n}", (parse_matcher(f"host=h{n}"),), self.now, self.now + extra, "bob")
            self.silences[s.id] = s
            return (AddSilence(s),)
        self.silences.pop(f"s{n}", None)
        return (ExpireSilence(f"s{n}"),)

    def step(self, step: Step) -> None:
        dt, raw_obs, cmd = step
        target = self.now + dt
        for _ in range(200):  # the collector's timer: wake when something is due (<= 1 s late)
            t = max(self.state.next_due, self.last_eval + 1.0)
            if t >= target:
                break
            self.evaluate(t, [], ())
        self.now = target
        commands = self.commands(cmd)
        obs = [observation(*o, now=self.now) for o in raw_obs]
        self.evaluate(self.now, obs, commands)
        self.log.append((self.said[0], self.said[1]))  # one entry per step, its ticks included
        self.said = ([], [])

    def evaluate(self, now: float, obs: list[Observation], commands: tuple[Any, ...]) -> None:
        self.now = self.last_eval = now
        before = {a.fingerprint: (a.ack_by, a.ack_at) for a in self.state.alerts.values()}
        self.state, transitions, notes = ENGINE.evaluate(self.state, obs, now, commands)
        self.said[0].extend(transitions)
        self.said[1].extend(notes)
        self.check_lifecycle(transitions)
        self.check_notifications(notes, {t.fingerprint for t in transitions if t.kind == "inhibited"})
        self.check_escalation(before, {t.fingerprint for t in transitions if t.kind == "rerouted"})
        self.check_coverage(transitions, notes)

    def check_coverage(self, transitions: list[Transition], notes: list[Notification]) -> None:
        """Every alert that fires notifiable is told within group_interval + 1 s."""
        for n in notes:
            for fp in (n.fingerprint, *n.alerts):
                at = self.owed.pop(fp, None) if fp is not None and n.kind != "resolved" else None
                assert at is None or n.at <= at + self.gi + 1.0, f"told at {n.at - at} s: {n}"
        for t in transitions:
            if t.kind in ("silenced", "inhibited", "flapping"):
                self.owed.pop(t.fingerprint, None)  # muted before it was told: nothing owed
            if t.kind == "firing":
                a = self.state.by_fp.get(t.fingerprint)
                if a is not None and ENGINE.notifiable(a) and a.level < 0:
                    self.owed[t.fingerprint] = t.at
        for fp, at in list(self.owed.items()):
            a = self.state.by_fp.get(fp)
            if a is None or a.silenced_by or a.inhibited_by is not None or a.flapping:
                del self.owed[fp]  # muted before it was due: nothing owed
                continue
            assert self.now <= at + self.gi + 1.0, (
                f"{a.rule} {a.labels} fired at {at - T0} untold at {self.now - T0}"
            )

    def check_lifecycle(self, transitions: list[Transition]) -> None:
        for t in transitions:
            if t.kind in LIFECYCLE:
                assert t.state == t.kind
                assert (self.lifecycle.get(t.fingerprint), t.kind) in ALLOWED
                self.lifecycle[t.fingerprint] = t.kind
        for a in self.state.alerts.values():
            assert a.state == self.lifecycle[a.fingerprint]
            if a.state == "firing":
                assert a.fired_at is not None
                assert a.resolved_at is None
            if a.state == "resolved":
                assert a.resolved_at is not None
        assert set(self.lifecycle) >= set(self.state.by_fp)

    def check_notifications(self, notes: list[Notification], inhibited_now: set[str]) -> None:
        """``inhibited_now``: alerts inhibited in this evaluation, maybe after they were told: a
        batch is told as one call per frame would tell it (``AlertEngine._tell``), so a frame
        after the one that fired an alert may inhibit it once told."""
        for n in notes:
            assert n.channels
            if n.fingerprint is None:
                assert n.kind in ("provider_incident", "incident_update", "escalated", "repeat", "resolved")
                for fp in n.alerts:  # the members it tells are neither silenced nor inhibited
                    m = self.state.by_fp[fp]
                    assert not m.silenced_by, (n, m)
                    assert m.inhibited_by is None or fp in inhibited_now, (n, m)
                continue
            a = self.state.by_fp[n.fingerprint]
            if n.episode != a.episode:
                assert n.kind in ("resolved", "firing")  # (told as it resolved) it started again since
                continue
            labels = a.match_labels()
            for s in self.silences.values():
                assert not (s.active(self.now) and matches_all(s.matchers, labels)), (n, s)
            assert a.inhibited_by is None or a.fingerprint in inhibited_now
            assert not a.silenced_by

    def check_escalation(
        self, before: dict[str, tuple[str | None, float | None]], rerouted: set[str]
    ) -> None:
        for fp in [fp for fp in self.levels if fp not in self.state.by_fp]:
            del self.levels[fp]  # resolved_retention passed: forgotten, a new alert if it comes back
        for a in self.state.alerts.values():
            prev = self.levels.get(a.fingerprint)
            now = (a.episode, a.policy, a.level, a.ack_at)
            # (rerouted in this evaluation, maybe away and back: its escalation starts again)
            if prev is not None and prev[:2] == now[:2] and a.fingerprint not in rerouted:
                assert a.level >= prev[2]  # never decreases within an episode and policy
                acked = before.get(a.fingerprint, (None, None))
                if acked[0] is not None and a.ack_by is not None and acked[1] == a.ack_at:
                    # acknowledged: escalation stopped (a first notice still waiting for
                    # group_wait goes out, at level 0 only)
                    assert a.level == prev[2] or (prev[2], a.level) == (-1, 0)
            self.levels[a.fingerprint] = now


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_st)
@example(  # an XID told mid-batch (before h0's second observation), inhibited by a later one
    steps=[
        (
            0,
            [
                (0, 0, "gpu.temperature", "warning", True),
                (1, 0, "gpu.xid", "critical", True),
                (0, 0, "gpu.temperature", "healthy", False),
                (1, 0, "gpu.lost", "warning", True),
            ],
            None,
        )
    ]
)
@example(  # resolved, forgotten after resolved_retention (1 h), then firing again: a new alert
    steps=[
        (0, [(1, 0, "gpu.temperature", "warning", True)], None),
        (0, [(1, 0, "gpu.temperature", "healthy", False)], None),
        *((400, [], None) for _ in range(9)),
        (1, [(1, 0, "gpu.temperature", "warning", True)], None),
    ]
)
def test_invariants_hold(steps: list[Step]) -> None:
    d = Driver(AlertState())
    for s in steps:
        d.step(s)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=steps_st, rest=steps_st)
@example(  # an XID inhibited by its host past its 5 m escalation: escalates when uninhibited
    first=[
        (0, [(0, 0, "gpu.xid", "critical", True)], None),
        (0, [(0, 0, "host.unreachable", "warning", False)], None),
        (300, [], None),
    ],
    rest=[(0, [(0, 0, "host.unreachable", "healthy", False)], None)],
)
def test_replay_from_saved_state_is_identical(first: list[Step], rest: list[Step]) -> None:
    d = Driver(AlertState())
    for s in first:
        d.step(s)
    saved = d.state.to_dict()
    a = Driver(ENGINE.restore(saved), d.now)
    b = Driver(ENGINE.restore(saved), d.now)
    for s in rest:
        a.step(s)
        b.step(s)
    assert a.log == b.log
    assert a.state.to_dict() == b.state.to_dict()
    for s in rest:  # and the original, never saved, state agrees with both
        d.step(s)
    assert d.log[len(first) :] == a.log
