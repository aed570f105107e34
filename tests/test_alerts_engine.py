"""The alert engine: lifecycle, acknowledgement, escalation, silences and maintenance,
inhibition, incidents (one notification for a host down with 8 GPUs, one for a provider),
flapping, persistence, config. Pure engines; the health engine feeds it where that matters."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from collector.alerts import (
    Ack,
    AddSilence,
    AlertConfig,
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
from collector.alerts.config import AlertsSection
from collector.alerts.model import ForgetHost
from collector.health import HealthEngine, HealthState, Observation
from collector.health.model import labels_key, seen_at
from shared.errors import ConfigError
from tests.support.health_frames import sample

T0 = 1_700_000_000.0
POLICIES = {
    "policy": [
        {
            "name": "critical",
            "match": {"severity": "critical"},
            "levels": [{"after": "0s", "notify": ["oncall"]}, {"after": "10m", "notify": ["manager"]}],
            "repeat": "1h",
        },
        {"name": "rest", "levels": [{"after": "0s", "notify": ["chat"]}]},
    ]
}


def make(alerts: dict[str, Any] | None = None, escalation: dict[str, Any] | None = None) -> AlertEngine:
    raw = {"alerts": alerts or {}, "escalation": POLICIES if escalation is None else escalation}
    return AlertEngine(alert_config_from(raw, env={}))


def ob(
    check: str,
    status: str,
    at: float = T0,
    host: str = "h1",
    gpu: int | None = 0,
    provider: str = "p",
    imm: bool = False,
) -> Observation:
    labels = {"provider": provider, "host": host}
    if gpu is not None:
        labels |= {"gpu": str(gpu), "uuid": f"GPU-{host}-{gpu}"}
    return Observation(
        check, status, labels, labels_key(check, labels), at, 1.0, f"{check} is {status}", "", imm
    )


class Run:
    """Drives one engine and records everything it said."""

    def __init__(self, engine: AlertEngine, state: AlertState | None = None) -> None:
        self.engine = engine
        self.state = state or AlertState()
        self.transitions: list[Transition] = []
        self.notes: list[Notification] = []

    def __call__(
        self,
        now: float,
        *obs: Observation,
        commands: tuple[Any, ...] = (),
        hosts: dict[str, int] | None = None,
    ) -> list[Notification]:
        self.state, tr, notes = self.engine.evaluate(self.state, list(obs), now, commands, hosts)
        self.transitions += tr
        self.notes += notes
        return notes

    def kinds(self, fp: str | None = None) -> list[str]:
        return [t.kind for t in self.transitions if fp is None or t.fingerprint == fp]


def fp_of(o: Observation) -> str:
    from collector.alerts.model import fingerprint

    return fingerprint(o.key)


# ----------------------------------------------------------------------------- lifecycle


def test_for_holds_in_the_hosts_time_through_a_backlog_judged_in_a_burst() -> None:
    """Frames judged within 0.3 s of each other, 40 s apart on the host (``seen``): a condition
    the host's frames show held for its ``for`` (30 s) fires and is told before it resolves; one
    whose last frame still showing it came less than ``for`` after its first is not told, even
    when the frame that clears it comes later than that."""
    run = Run(make())
    fp = fp_of(ob("gpu.temperature", "warning"))
    warn, ok = ob("gpu.temperature", "warning"), ob("gpu.temperature", "healthy")
    host = T0 - 100  # the frames' times on the host
    run(T0, dataclasses.replace(warn, seen=host))
    run(T0 + 0.1, dataclasses.replace(warn, seen=host + 10))
    assert run.kinds(fp) == ["pending"]
    run(T0 + 0.2, dataclasses.replace(warn, seen=host + 31))  # held 31 s on the host: fires
    notes = run(T0 + 0.3, dataclasses.replace(ok, seen=host + 40))
    assert run.kinds(fp) == ["pending", "firing", "resolved"]
    assert [n.kind for n in run.notes] == ["firing", "resolved"]
    assert [n.kind for n in notes] == ["resolved"]

    run = Run(make())
    run(T0, dataclasses.replace(warn, seen=host))
    run(T0 + 0.1, dataclasses.replace(warn, seen=host + 20))  # last seen holding after 20 s
    run(T0 + 0.2, dataclasses.replace(ok, seen=host + 40))  # cleared: it held 20 to 40 s
    assert run.kinds(fp) == ["pending", "resolved"]
    assert run.notes == []

    run = Run(make())  # its last frame still showing it 30 s after the first: fired, then resolved
    run(T0, dataclasses.replace(warn, seen=host))
    run(T0 + 0.1, dataclasses.replace(warn, seen=host + 30))
    run(T0 + 0.2, dataclasses.replace(ok, seen=host + 31))
    assert run.kinds(fp) == ["pending", "firing", "resolved"]
    assert [n.kind for n in run.notes] == ["firing", "resolved"]


def test_threshold_rule_pending_then_firing_then_resolved() -> None:
    run = Run(make())
    warn = ob("gpu.temperature", "warning")
    assert run(T0, warn) == []
    assert run(T0 + 29, warn) == []
    assert run.kinds() == ["pending"]
    (n,) = run(T0 + 30)  # time alone fires it
    assert (n.kind, n.channels, n.severity, n.fingerprint) == ("firing", ("chat",), "warning", fp_of(warn))
    assert run.kinds() == ["pending", "firing"]
    assert run(T0 + 40, warn) == []  # a held condition is one alert, notified once
    (r,) = run(T0 + 50, ob("gpu.temperature", "healthy", T0 + 50))
    assert (r.kind, r.channels) == ("resolved", ("chat",))
    assert run.kinds() == ["pending", "firing", "resolved"]
    assert len(run.state.alerts) == 1


def test_pending_that_clears_is_never_notified() -> None:
    run = Run(make())
    run(T0, ob("gpu.temperature", "warning"))
    run(T0 + 10, ob("gpu.temperature", "healthy"))
    run(T0 + 100)
    assert run.notes == []
    assert run.kinds() == ["pending", "resolved"]


def test_event_rules_fire_at_once_and_per_rule_for() -> None:
    run = Run(make({"for_rules": {"host.cpu": "2m"}}))
    (n,) = run(T0, ob("gpu.xid", "critical", imm=True))
    assert (n.kind, n.channels) == ("firing", ("oncall",))
    run(T0, ob("host.cpu", "warning", gpu=None))
    assert run(T0 + 60, ob("host.cpu", "warning", gpu=None)) == []
    assert [n.rule for n in run(T0 + 120, ob("host.cpu", "warning", gpu=None))] == ["host.cpu"]


def test_refire_is_the_same_alert_in_a_new_episode() -> None:
    run = Run(make())
    xid = ob("gpu.xid", "critical", imm=True)
    run(T0, xid)
    run(T0 + 5, ob("gpu.xid", "healthy"))
    run(T0 + 10, xid)
    (a,) = run.state.alerts.values()
    assert (a.fingerprint, a.episode, a.state) == (fp_of(xid), 2, "firing")
    assert [n.kind for n in run.notes] == ["firing", "resolved", "firing"]


# ----------------------------------------------------------------------------- escalation, ack


def test_escalation_climbs_and_repeats() -> None:
    run = Run(make())
    run(T0, ob("gpu.lost", "critical", imm=True))
    assert run(T0 + 599) == []
    (e,) = run(T0 + 600)
    assert (e.kind, e.channels, e.level) == ("escalated", ("manager",), 1)
    (r,) = run(T0 + 600 + 3600)
    assert (r.kind, r.channels) == ("repeat", ("manager",))
    (res,) = run(T0 + 5000, ob("gpu.lost", "healthy"))
    assert (res.kind, set(res.channels)) == ("resolved", {"oncall", "manager"})


def test_acknowledgement_stops_escalation_until_it_expires() -> None:
    run = Run(make())
    lost = ob("gpu.lost", "critical", imm=True)
    run(T0, lost)
    run(T0 + 60, commands=(Ack(fp_of(lost), "alice", until=T0 + 1200, comment="on it"),))
    assert run(T0 + 600) == []
    assert run(T0 + 1199) == []
    (e,) = run(T0 + 1200)  # acknowledgement expired: climbs at once
    assert e.kind == "escalated"
    assert run.kinds() == ["pending", "firing", "acknowledged", "unacknowledged"]
    a = run.state.by_fp[fp_of(lost)]
    assert (a.ack_by, a.level) == (None, 1)


def test_ack_without_expiry_and_unack() -> None:
    run = Run(make())
    lost = ob("gpu.lost", "critical", imm=True)
    run(T0, lost)
    run(T0 + 1, commands=(Ack(fp_of(lost), "bob"),))
    assert run(T0 + 7200) == []  # no escalation, no repeat while acknowledged
    notes = run(T0 + 7201, commands=(Unack(fp_of(lost)),))
    assert [n.kind for n in notes] == ["escalated"]


def test_an_ack_as_an_incidents_member_names_it_and_leaves_one_acknowledged_as_it_is() -> None:
    """A collector group: the judge of an incident asks the owner of a member on its host to
    acknowledge it as the incident's (``Ack(..., incident=)``), as ``AckIncident`` does on one
    collector: only if not acknowledged yet."""
    run = Run(make())
    lost, other = ob("gpu.lost", "critical", imm=True), ob("gpu.lost", "critical", imm=True, gpu=1)
    run(T0, lost, other)
    run(T0 + 1, commands=(Ack(fp_of(other), "alice", comment="mine"),))
    cmds = tuple(Ack(fp_of(o), "ops", None, "provider down", incident="inc-1") for o in (lost, other))
    run(T0 + 2, commands=cmds)
    a, b = run.state.by_fp[fp_of(lost)], run.state.by_fp[fp_of(other)]
    assert (a.ack_by, a.ack_incident, a.ack_comment) == ("ops", "inc-1", "provider down")
    assert (b.ack_by, b.ack_incident, b.ack_comment) == ("alice", None, "mine")  # as it was
    assert run(T0 + 7200) == []  # neither escalates
    run(T0 + 7201, commands=(Ack(fp_of(lost), "bob"),))  # acknowledged on its own: no incident
    assert (a.ack_by, a.ack_incident) == ("bob", None)


def test_severity_increase_reroutes() -> None:
    run = Run(make())
    run(T0, ob("gpu.temperature", "warning"))
    (w,) = run(T0 + 30, ob("gpu.temperature", "warning"))
    assert w.channels == ("chat",)
    (c,) = run(T0 + 40, ob("gpu.temperature", "critical"))
    assert (c.kind, c.channels, c.severity) == ("firing", ("oncall",), "critical")
    assert "rerouted" in run.kinds()


# ----------------------------------------------------------------------------- silences


def test_silence_mutes_then_expiry_notifies() -> None:
    run = Run(make())
    s = Silence(
        "s1", (parse_matcher("host=~h[0-9]+"), parse_matcher("rule!=host.cpu")), T0, T0 + 3600, "ops", "work"
    )
    run(T0, commands=(AddSilence(s),))
    lost = ob("gpu.lost", "critical", imm=True)
    assert run(T0 + 1, lost) == []
    assert run(T0 + 1000) == []  # no escalation either
    assert "silenced" in run.kinds()
    a = run.state.by_fp[fp_of(lost)]
    assert (a.state, a.silenced_by) == ("firing", ["s1"])  # still recorded
    (n,) = run(T0 + 3600)  # silence over, still firing: notified now
    assert (n.kind, n.channels) == ("firing", ("oncall",))
    assert "unsilenced" in run.kinds()


def test_expire_silence_command_and_regex_is_anchored() -> None:
    run = Run(make())
    s = Silence("s2", (parse_matcher("host=~h1"),), 0, T0 + 10_000)
    run(T0, commands=(AddSilence(s),))
    assert run(T0 + 1, ob("gpu.lost", "critical", imm=True, host="h1")) == []
    assert len(run(T0 + 1, ob("gpu.lost", "critical", imm=True, host="xh1"))) == 1  # anchored
    assert len(run(T0 + 2, commands=(ExpireSilence("s2"),))) == 1
    assert run.state.silences == {}


def test_maintenance_window_from_config() -> None:
    alerts = {
        "maintenance": [{"provider": "p", "host": "h1", "starts": T0 + 100, "ends": "2023-11-14T22:16:40Z"}]
    }
    engine = make(alerts)
    assert engine.config.silences[0].ends_at == T0 + 200
    run = Run(engine)
    assert run(T0 + 150, ob("gpu.lost", "critical", imm=True)) == []
    assert len(run(T0 + 150, ob("gpu.lost", "critical", imm=True, host="h2"))) == 1  # other host
    (n,) = run(T0 + 200)
    assert n.labels["host"] == "h1"


# ----------------------------------------------------------------------------- inhibition, incidents


def fleet(
    run: Run, health: HealthEngine, hs: HealthState, hosts: list[str], down: set[str], t: float
) -> HealthState:
    for h in hosts:
        if h not in down:
            hs, o = health.observe(hs, sample(t, h, gpus=8, provider=h.split("-")[0]), t)
            run(t, *o)
    hs, o = health.tick(hs, t)
    run(t, *o)
    return hs


def test_host_down_with_8_gpus_gives_one_notification() -> None:
    run, health, hs = Run(make()), HealthEngine(), HealthState()
    hosts = [f"p-{i}" for i in range(10)]
    for t in range(0, 60, 5):
        hs = fleet(run, health, hs, hosts, set(), T0 + t)
    assert run.notes == []
    for t in range(60, 400, 5):
        hs = fleet(run, health, hs, hosts, {"p-3"}, T0 + t)
    (n,) = run.notes
    assert (n.kind, n.rule, n.labels["host"]) == ("firing", "host.unreachable", "p-3")
    stale = [a for a in run.state.alerts.values() if a.rule == "gpu.stale"]
    assert len(stale) == 8
    assert all(a.state == "firing" and a.inhibited_by == n.fingerprint for a in stale)  # recorded
    assert len({a.incident for a in run.state.alerts.values()}) == 1  # one incident
    for t in range(400, 700, 5):  # the host comes back: one resolution
        hs = fleet(run, health, hs, hosts, set(), T0 + t)
    assert [m.kind for m in run.notes] == ["firing", "resolved"]


@pytest.mark.parametrize("reverse", [False, True])
def test_forgetting_a_down_host_tells_one_resolution_whatever_the_alerts_order(reverse: bool) -> None:
    """None of its inhibited alerts (never told firing) is told resolved on its own, whichever
    alert of the host was created first and is retired first."""
    run, health, hs = Run(make()), HealthEngine(), HealthState()
    hosts = [f"p-{i}" for i in range(10)]
    for t in range(0, 60, 5):
        hs = fleet(run, health, hs, hosts, set(), T0 + t)
    for t in range(60, 400, 5):
        hs = fleet(run, health, hs, hosts, {"p-3"}, T0 + t)
    assert [n.rule for n in run.notes] == ["host.unreachable"]
    keys = run.state.by_host[("p", "p-3")]
    if reverse:  # the alerts of the host in the other order of creation
        run.state.by_host[("p", "p-3")] = dict(reversed(list(keys.items())))
    run(T0 + 400, commands=(ForgetHost("p-3"),))
    told = [(n.kind, n.rule, n.reason) for n in run.notes[1:]]
    assert told == [("resolved", "host.unreachable", "forgotten")]
    assert all(a.state == "resolved" for a in run.state.alerts.values() if a.labels["host"] == "p-3")


def test_gpu_lost_inhibits_that_gpus_other_alerts() -> None:
    run = Run(make())
    run(T0, ob("gpu.lost", "critical", imm=True, gpu=2))
    assert run(T0 + 1, ob("gpu.ecc_dbe", "critical", imm=True, gpu=2)) == []
    assert len(run(T0 + 1, ob("gpu.ecc_dbe", "critical", imm=True, gpu=3))) == 1
    n, m = run(T0 + 2, ob("gpu.lost", "healthy", gpu=2))  # root resolves: the DBE is told now
    assert (n.kind, n.rule) == ("resolved", "gpu.lost")
    assert (m.kind, m.rule, m.labels["gpu"]) == ("firing", "gpu.ecc_dbe", "2")


def test_provider_wide_incident_is_notified_once() -> None:
    run, health, hs = Run(make({"provider_incident_min_hosts": 3})), HealthEngine(), HealthState()
    hosts = [f"p-{i}" for i in range(10)] + [f"q-{i}" for i in range(10)]
    for t in range(0, 30, 5):
        hs = fleet(run, health, hs, hosts, set(), T0 + t)
    down = {"p-0", "p-1", "p-2", "p-3"}  # 40% of provider p, all at once
    for t in range(30, 120, 5):
        hs = fleet(run, health, hs, hosts, down, T0 + t)
    (n,) = run.notes
    assert (n.kind, n.fingerprint, n.hosts, n.channels) == (
        "provider_incident",
        None,
        tuple(sorted(down)),
        ("oncall",),
    )
    down |= {"p-4"}  # another host fails during the incident: an update of the incident names it
    for t in range(120, 200, 5):
        hs = fleet(run, health, hs, hosts, down, T0 + t)
    _, u = run.notes
    assert (u.kind, u.incident, u.hosts, u.new_hosts, u.rules) == (
        "incident_update",
        n.incident,
        ("p-4",),
        ("p-4",),
        ("host.unreachable",),
    )
    assert "p-4" in run.state.incidents[n.incident or ""].hosts
    down = {"q-0"}  # another provider: a single host is notified on its own
    for t in range(200, 800, 5):
        hs = fleet(run, health, hs, hosts, down, T0 + t)
    kinds = [(m.kind, m.fingerprint is None, m.labels.get("host")) for m in run.notes]
    assert kinds == [
        ("provider_incident", True, None),
        ("incident_update", True, None),
        ("firing", False, "q-0"),
        ("resolved", True, None),
    ]


def test_provider_incident_needs_more_than_the_share() -> None:
    run = Run(make({"provider_incident_min_hosts": 2, "provider_incident_share": 0.2}))
    obs = [ob("host.unreachable", "critical", host=f"h{i}", gpu=None, imm=True) for i in range(2)]
    notes = run(T0, *obs, hosts={"p": 10})  # 2 of 10 = 20%: not more than 20%
    assert [n.kind for n in notes] == ["firing", "firing"]
    notes = run(T0 + 1, ob("host.unreachable", "critical", host="h2", gpu=None, imm=True), hosts={"p": 10})
    assert [n.kind for n in notes] == ["provider_incident"]


# ----------------------------------------------------------------------------- flapping


def test_flapping_is_notified_once_then_held() -> None:
    run = Run(make())
    t = T0
    for i in range(40):
        status = "critical" if i % 2 == 0 else "healthy"
        run(t, ob("gpu.recovery_action", status, imm=True))
        t += 10
    kinds = [n.kind for n in run.notes]
    assert kinds.count("flapping") == 1
    assert kinds[-1] == "flapping"
    assert len(kinds) < 10  # not one per change
    (a,) = run.state.alerts.values()
    assert a.flapping
    held = a.state
    for _ in range(40):  # stable healthy: flapping stops, the held state settles
        run(t, ob("gpu.recovery_action", "healthy"))
        t += 10
        if not a.flapping:
            break
    assert not a.flapping
    assert a.state == "resolved"
    assert run.kinds().count("flapping_stopped") == 1
    if held == "firing":
        assert run.notes[-1].kind == "resolved"


@pytest.mark.parametrize(
    ("bits", "n", "pct"),
    [
        (0, 21, 0.0),
        (0b1, 21, 6.0),  # one change, the newest (weight 1.2 of 20)
        (0b10101010101010101010, 21, 100.0),  # every evaluation changed
        (0b1 << 20, 21, 4.0),  # oldest to second oldest: weight 0.8
    ],
)
def test_flap_percentage(bits: int, n: int, pct: float) -> None:
    engine = make()
    changes = (bits ^ (bits >> 1)) & ((1 << (n - 1)) - 1)
    assert engine.flap_pct(changes) == pytest.approx(pct)


# ----------------------------------------------------------------------------- persistence


def test_restored_state_does_not_renotify() -> None:
    engine = make()
    run = Run(engine)
    lost = ob("gpu.lost", "critical", imm=True)
    run(T0, lost, ob("gpu.temperature", "warning", gpu=1))
    run(T0 + 30, ob("gpu.temperature", "warning", gpu=1))
    assert len(run.notes) == 2
    saved = json.loads(json.dumps(run.state.to_dict()))
    restarted = Run(make(), make().restore(saved))
    assert restarted(T0 + 60, lost, ob("gpu.temperature", "warning", gpu=1)) == []
    (e,) = restarted(T0 + 600)
    assert e.kind == "escalated"
    assert restarted.state.to_dict()["alerts"][0]["level"] == 1


# ----------------------------------------------------------------------------- config


def test_alert_config_from_raw() -> None:
    raw = {
        "alerts": {
            "for": "1m",
            "correlation_window": "10m",
            "for_rules": {"gpu.temperature": "2m"},
            "silence": [{"matchers": ["host=h1", "severity=~warning|info"], "ends": "2030-01-01T00:00:00Z"}],
        },
        "escalation": POLICIES,
    }
    cfg = alert_config_from(raw, env={"GPUWARDEN_ALERTS_FOR": "45s"})
    assert cfg.alerts.for_s == 45.0
    assert cfg.alerts.correlation_window == 600.0
    assert cfg.for_of("gpu.temperature") == 120.0
    assert cfg.for_of("gpu.power") == 45.0
    (s,) = cfg.silences
    assert [str(m) for m in s.matchers] == ["host=h1", "severity=~warning|info"]
    assert [p.name for p in cfg.policies] == ["critical", "rest"]
    assert cfg.policies[0].levels[1].after == 600.0
    assert alert_config_from({}, env={}) == AlertConfig()
    top = alert_config_from({"maintenance": [{"provider": "p", "starts": 1, "ends": 2}]}, env={})
    assert [str(m) for m in top.silences[0].matchers] == ["provider=p"]
    assert AlertsSection().flap_start_pct == 30.0


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"alerts": {"for": "soon"}}, "alerts.for"),
        ({"alerts": {"fore": "1m"}}, "alerts.fore"),
        ({"alerts": {"flap_stop_pct": 40}}, "alerts.flap_stop_pct"),
        ({"alerts": {"provider_incident_share": 2}}, "alerts.provider_incident_share"),
        ({"alerts": {"for_rules": {"gpu.power": "x"}}}, "alerts.for_rules.gpu.power"),
        ({"alerts": {"silence": [{"matchers": ["host~h1"], "ends": 1}]}}, "alerts.silence[0].matchers"),
        ({"alerts": {"silence": [{"matchers": ["host=~(h1"], "ends": 1}]}}, "alerts.silence[0].matchers"),
        ({"alerts": {"silence": [{"matchers": ["host=h1"]}]}}, "alerts.silence[0].ends"),
        ({"alerts": {"silence": [{"matchers": ["host=h1"], "ends": "tomorrow"}]}}, "alerts.silence[0].ends"),
        (
            {"alerts": {"maintenance": [{"host": "h1", "starts": 1, "ends": 2}]}},
            "alerts.maintenance[0].provider",
        ),
        (
            {"alerts": {"maintenance": [{"provider": "p", "starts": 5, "ends": 2}]}},
            "alerts.maintenance[0].ends",
        ),
        ({"escalation": {"policy": [{"name": "x", "levels": []}]}}, "escalation.policy[0].levels"),
        ({"escalation": {"policy": [{"levels": [{"notify": ["a"]}]}]}}, "escalation.policy[0].name"),
        (
            {
                "escalation": {
                    "policy": [
                        {
                            "name": "x",
                            "levels": [{"after": "5m", "notify": ["a"]}, {"after": "1m", "notify": ["b"]}],
                        }
                    ]
                }
            },
            "escalation.policy[0].levels[1].after",
        ),
        (
            {"escalation": {"policy": [{"name": "x", "levels": [{"notify": []}]}]}},
            "escalation.policy[0].levels[0].notify",
        ),
        (
            {"escalation": {"policy": [{"name": "x", "match": {"severity": 2}, "levels": []}]}},
            "escalation.policy[0].match",
        ),
        (
            {"escalation": {"policy": [{"name": "x", "levels": [{"notify": ["a"]}], "repeat": "often"}]}},
            "escalation.policy[0].repeat",
        ),
        ({"escalation": {"policies": []}}, "escalation.policies"),
        ({"silence": [{"matchers": ["host=h1"], "ends": "never"}]}, "silence[0].ends"),
        (
            {
                "alerts": {
                    "silence": [
                        {"id": "a", "matchers": ["x=1"], "ends": 9},
                        {"id": "a", "matchers": ["y=1"], "ends": 9},
                    ]
                }
            },
            "alerts.silence",
        ),
    ],
)
def test_alert_config_errors_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        alert_config_from(raw, env={})
    assert e.value.key == key


def test_network_rules_have_their_own_for() -> None:
    """``for = "0s"`` pages a threshold rule at once, but a network check waits
    ``network_for`` (1 min by default); ``[alerts.for_rules]`` wins over both."""
    run = Run(make({"for": "0s"}))
    net = ob("net.target", "critical", gpu=None)
    (n,) = run(T0, ob("host.memory", "critical", gpu=None))
    assert n.rule == "host.memory"
    assert run(T0, net) == []
    assert run(T0 + 59, net) == []
    assert [n.rule for n in run(T0 + 60, net)] == ["net.target"]
    run = Run(make({"for": "0s", "network_for": "10s", "for_rules": {"net.target": "5s"}}))
    assert run(T0, net) == []
    assert [n.rule for n in run(T0 + 5, net)] == ["net.target"]
    assert make({"network_for": "2m"}).config.for_of("net.target") == 120.0
    with pytest.raises(ConfigError, match="alerts.network_for"):
        make({"network_for": "soon"})


# ----------------------------------------------------------------------------- batches

FLAPS = ["critical", "healthy"] * 20


@pytest.mark.parametrize(
    ("alerts", "check", "statuses", "told"),
    [
        ({}, "gpu.xid", ["critical", "healthy"], ["firing", "resolved"]),  # fired and cleared in one batch
        ({"group_wait": "2s"}, "gpu.temperature", ["critical", "healthy"], ["firing", "resolved"]),
        ({}, "gpu.recovery_action", ["critical", "critical", "healthy", "critical"], None),
        ({}, "gpu.recovery_action", FLAPS, None),  # paged firing, then flapping, then held
    ],
)
def test_a_batch_is_told_as_its_observations_one_call_each(
    alerts: dict[str, Any], check: str, statuses: list[str], told: list[str] | None
) -> None:
    obs = [ob(check, s, T0, imm=True) for s in statuses] + [ob("gpu.ecc", "critical", T0, gpu=1, imm=True)]
    one_by_one, batch = Run(make(alerts)), Run(make(alerts))
    for o in obs:
        one_by_one(T0, o)
    batch(T0, *obs)
    said = [(n.kind, n.rule, n.channels) for n in one_by_one.notes]
    assert [(n.kind, n.rule, n.channels) for n in batch.notes] == said
    assert batch.kinds() == one_by_one.kinds()
    kinds = [k for k, rule, _ in said if rule == check]
    assert kinds[0] == "firing"  # the first firing is a page, whatever follows in the batch
    if told is not None:
        assert kinds == told
    if statuses == FLAPS:
        assert kinds.count("flapping") == 1
        assert kinds[-1] == "flapping"


def test_seen_at_dates_observations_and_keeps_every_other_field() -> None:
    o = Observation("gpu.xid", "critical", {"host": "h"}, "k", 1.0, 79.0, "s", "a", True, "evicted", None)
    assert seen_at([o], 5.0) == [dataclasses.replace(o, seen=5.0)]
    assert [f.name for f in dataclasses.fields(Observation)][-1] == "seen"
