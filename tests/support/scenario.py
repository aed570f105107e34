"""Alerting scenarios as data (``tests/scenarios/*.toml``): faults over time on a small
simulated fleet, and the exact notifications expected per channel.

One file is one scenario::

    title = "a fatal XID on a host outside an open provider incident"
    hosts = 10                  # host-0000 ... host-0009 (agent.fleet names)
    providers = 1               # host i belongs to provider-(i % providers)
    gpus = 2
    interval = 1.0              # seconds between samples of each host
    duration = 40.0             # seconds the fleet runs
    e2e = true                  # also run end to end (tests/test_e2e_scenarios.py)
    faults = ["host-0001:host_down@5s", "host-0007/gpu1:xid=79@12s"]   # agent --fault specs
    [config.alerts]             # collector.toml tables, over DEFAULTS below
    provider_incident_min_hosts = 3
    [[action]]                  # at a time: ack_incident = provider, ack = [host, rule],
    at = 20.0                   # silence = [matchers] with for = seconds, restart = true,
    ack_incident = "provider-0" # reboot = host, swap = "host/gpuN", checks = [...]
    [[expect]]                  # each notification, per channel (every one, no more)
    channel = "oncall"
    kind = "incident_update"
    hosts = ["host-0007"]       # the hosts it is about (an alert's: its host)
    rules = ["gpu.xid"]         # the rules it is about (an alert's: its rule)
    level = 0
    at = [12, 15]               # seconds since the start, both inclusive

The pure run (:func:`run_pure`) drives the same simulated agents (``SimulatedBackend``,
``SimulatedSystem``, the agent's event tracker and frame builders) on a virtual clock
through the health and alert engines, as the collector does: every frame batch is judged
when it arrives, and a timer runs the engines' time-driven steps. The end-to-end run
publishes the fleet over real NATS to a real collector and reads a real webhook receiver;
both reduce what was notified to :class:`Told` records and :func:`mismatches` compares them
with the expectations.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.events import EventTracker
from agent.faults import FaultSchedule
from agent.fleet import host_name, provider_name
from agent.gpu.simulated import SimulatedBackend
from agent.sampler import Sequencer, build_event, build_inventory, build_sample
from agent.system import SimulatedSystem
from collector.alerts import AckIncident, AddSilence, AlertEngine, AlertState, Silence, alert_config_from
from collector.alerts.model import Ack, Command, Notification
from collector.health import HealthEngine, HealthState, health_config_from
from collector.health.codec import health_snapshot, state_from_dict
from shared.frames import CheckResult, Frame, replace

HERE = Path(__file__).parent.parent / "scenarios"
T0 = 1_700_000_000.0
STEP = 0.25  # virtual seconds per step of the pure run
TICK = 1.0  # the collector's timer ([alerting] tick)

DEFAULTS: dict[str, Any] = {
    "alerts": {
        "for": "2s",
        "network_for": "2s",
        "correlation_window": "60s",
        "group_interval": "5s",
        "group_wait": "2s",
        "provider_incident_min_hosts": 3,
        "provider_incident_share": 0.25,
        "resolved_retention": "10m",
    },
    "health": {"stale_after": "3s", "gpu": {"xid_window": "8s"}},
    "escalation": {
        "policy": [
            {
                "name": "critical",
                "match": {"severity": "critical"},
                "levels": [{"after": "0s", "notify": ["oncall"]}, {"after": "20s", "notify": ["manager"]}],
            },
            {"name": "rest", "levels": [{"after": "0s", "notify": ["chat"]}]},
        ]
    },
}
CHANNELS = ("oncall", "manager", "chat")


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


EXPECT_KEYS = frozenset(
    {"channel", "kind", "at", "hosts", "rules", "level", "severity", "new_hosts", "reason"}
)


@dataclass(frozen=True, slots=True)
class Expect:
    channel: str
    kind: str
    at: tuple[float, float]
    hosts: frozenset[str] | None = None
    rules: frozenset[str] | None = None
    level: int | None = None
    severity: str | None = None
    new_hosts: frozenset[str] | None = None
    reason: str | None = None  # a resolution's reason (replaced, moved, forgotten, evicted)

    def matches(self, t: Told, late: float = 0.0) -> bool:
        return (
            t.channel == self.channel
            and t.kind == self.kind
            and self.at[0] <= t.at <= self.at[1] + late
            and (self.hosts is None or t.hosts == self.hosts)
            and (self.rules is None or t.rules == self.rules)
            and (self.level is None or t.level == self.level)
            and (self.severity is None or t.severity == self.severity)
            and (self.new_hosts is None or t.new_hosts == self.new_hosts)
            and (self.reason is None or t.reason == self.reason)
        )


@dataclass(frozen=True, slots=True)
class Told:
    """One notification on one channel, reduced to what scenarios compare."""

    channel: str
    kind: str
    at: float  # seconds since the start
    hosts: frozenset[str]
    rules: frozenset[str]
    level: int
    severity: str
    new_hosts: frozenset[str] = frozenset()
    summary: str = ""
    reason: str = ""

    def __str__(self) -> str:
        return (
            f"{self.at:6.2f}s {self.channel}: {self.kind} level {self.level} {self.severity} "
            f"hosts={sorted(self.hosts)} rules={sorted(self.rules)} new_hosts={sorted(self.new_hosts)}"
        )


@dataclass(slots=True)
class Scenario:
    name: str
    title: str
    hosts: int
    providers: int
    gpus: int
    interval: float
    duration: float
    faults: tuple[str, ...]
    config: dict[str, Any]
    actions: list[dict[str, Any]]
    expect: list[Expect]
    e2e: bool = False
    xfail: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def host_names(self) -> list[str]:
        return [host_name(i) for i in range(self.hosts)]


def _window(v: Any, where: str) -> tuple[float, float]:
    if isinstance(v, int | float):
        return float(v), float(v)
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return float(v[0]), float(v[1])
    raise ValueError(f"{where}: at must be a number or [from, to]")


def _set(v: Any) -> frozenset[str] | None:
    return None if v is None else frozenset(str(x) for x in v)


def load(path: Path) -> Scenario:
    raw = tomllib.loads(path.read_text())
    known = {
        "title",
        "hosts",
        "providers",
        "gpus",
        "interval",
        "duration",
        "faults",
        "config",
        "action",
        "expect",
        "e2e",
        "xfail",
    }
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path.name}: unknown keys {sorted(unknown)}")
    expect = []
    for i, e in enumerate(raw.get("expect", [])):
        where = f"{path.name}: expect[{i}]"
        extra = set(e) - {
            "channel",
            "kind",
            "at",
            "hosts",
            "rules",
            "level",
            "severity",
            "new_hosts",
            "reason",
        }
        if extra or "channel" not in e or "kind" not in e or "at" not in e:
            raise ValueError(f"{where}: needs channel, kind, at (unknown: {sorted(extra)})")
        expect.append(
            Expect(
                e["channel"],
                e["kind"],
                _window(e["at"], where),
                _set(e.get("hosts")),
                _set(e.get("rules")),
                e.get("level"),
                e.get("severity"),
                _set(e.get("new_hosts")),
                e.get("reason"),
            )
        )
    sc = Scenario(
        name=path.stem,
        title=str(raw["title"]),
        hosts=int(raw.get("hosts", 8)),
        providers=int(raw.get("providers", 1)),
        gpus=int(raw.get("gpus", 2)),
        interval=float(raw.get("interval", 1.0)),
        duration=float(raw["duration"]),
        faults=tuple(raw.get("faults", ())),
        config=merged(DEFAULTS, raw.get("config", {})),
        actions=sorted(raw.get("action", []), key=lambda a: float(a["at"])),
        expect=expect,
        e2e=bool(raw.get("e2e", False)),
        xfail=raw.get("xfail"),
        raw=raw,
    )
    FaultSchedule.parse(list(sc.faults))  # a bad spec fails the load, naming it
    return sc


def catalogue() -> list[Scenario]:
    return [load(p) for p in sorted(HERE.glob("*.toml"))]


# ----------------------------------------------------------------------------- comparing


def mismatches(sc: Scenario, told: Sequence[Told], late: float = 0.0) -> list[str]:
    """What differs: expected notifications not seen, and notifications not expected. ``late``:
    how far past its window's end a notification still counts (never before its start)."""
    left = sorted(told, key=lambda t: t.at)
    problems = []
    for e in sorted(sc.expect, key=lambda e: e.at):
        hit = next((t for t in left if e.matches(t, late)), None)
        if hit is None:
            problems.append(f"missing: {e}")
        else:
            left.remove(hit)
    problems += [f"unexpected: {t}" for t in left]
    if problems:
        problems.append(
            "all notifications:\n  " + "\n  ".join(str(t) for t in sorted(told, key=lambda t: t.at))
        )
    return problems


def told_of(n: Notification, t0: float) -> list[Told]:
    if n.fingerprint is not None:
        hosts, rules = frozenset({n.labels.get("host", "")}), frozenset({n.rule})
    else:
        hosts, rules = frozenset(n.hosts), frozenset(n.rules)
    return [
        Told(
            c,
            n.kind,
            round(n.at - t0, 3),
            hosts,
            rules,
            n.level,
            n.severity,
            frozenset(n.new_hosts),
            n.summary,
            n.reason,
        )
        for c in n.channels
    ]


def told_of_webhook(channel: str, body: Mapping[str, Any], t0: float, at: float) -> list[Told]:
    """A webhook v4 body as the receiver got it (``at``: when it arrived)."""
    out = []
    for a in body["alerts"]:
        ann = a["annotations"]
        labels = a["labels"]
        incident = a["fingerprint"].startswith("incident-")
        split = lambda s: frozenset(x for x in s.split(",") if x)  # noqa: E731
        hosts = split(ann.get("hosts", "")) if incident else frozenset({labels.get("host", "")})
        rules = split(ann.get("rules", "")) if incident else frozenset({labels["alertname"]})
        out.append(
            Told(
                channel,
                ann["kind"],
                round(at - t0, 3),
                hosts,
                rules,
                int(ann["level"]),
                labels["severity"],
                split(ann.get("new_hosts", "")),
                ann["summary"],
                ann.get("reason", ""),
            )
        )
    return out


# ----------------------------------------------------------------------------- the pure run


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return T0 + self.t


@dataclass(slots=True)
class Agent:
    name: str
    provider: str
    seqr: Sequencer
    backend: SimulatedBackend
    system: SimulatedSystem
    tracker: EventTracker
    slot: float
    inventory_sent: bool = False
    checks: tuple[CheckResult, ...] = ()


class PureRun:
    """The scenario's fleet and a collector's engines, on a virtual clock."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.clock = Clock()
        self.health_engine = HealthEngine(health_config_from(sc.config))
        self.engine = AlertEngine(alert_config_from(sc.config, env={}))
        self.health = HealthState()
        self.state = AlertState()
        self.told: list[Told] = []
        self.notes: list[Notification] = []
        schedule = FaultSchedule.parse(list(sc.faults))
        self.agents = []
        for i, name in enumerate(sc.host_names()):
            mine = schedule.for_host(name)
            a = Agent(
                name,
                provider_name(i % sc.providers),
                Sequencer(host=name, provider=provider_name(i % sc.providers)),
                SimulatedBackend(
                    sc.gpus, host=name, seed=i, faults=mine, clock=self.clock.mono, wall=self.clock.wall
                ),
                SimulatedSystem(host=name, seed=i, faults=mine, clock=self.clock.mono),
                EventTracker(),
                slot=(i * sc.interval / sc.hosts),
            )
            a.backend.open()
            a.tracker.set_inventory(a.backend.inventory().gpus)
            self.agents.append(a)
        self.actions = list(sc.actions)
        self.commands: list[Command] = []

    @property
    def now(self) -> float:
        return self.clock.wall()

    def run(self) -> list[Told]:
        sc = self.sc
        n_steps = int(round(sc.duration / STEP))
        next_tick = 0.0
        next_sample = {a.name: a.slot for a in self.agents}
        for k in range(n_steps + 1):
            self.clock.t = t = k * STEP
            while self.actions and float(self.actions[0]["at"]) <= t + 1e-9:
                self.act(self.actions.pop(0))
            frames: list[Frame] = []
            for a in self.agents:
                down = a.backend.faults.host_down(t)
                for ev in a.backend.poll_events():
                    got = a.tracker.accept(ev, t)
                    if got is not None and not down:
                        frames.append(build_event(a.seqr, *got))
                if t + 1e-9 >= next_sample[a.name]:
                    next_sample[a.name] += sc.interval
                    if down:
                        continue
                    if not a.inventory_sent:
                        a.inventory_sent = True
                        frames.append(
                            build_inventory(a.seqr, a.backend.inventory(), a.system.host_facts(), ts=self.now)
                        )
                    frame = build_sample(
                        a.seqr,
                        interval_s=sc.interval,
                        gpus=a.backend.sample(),
                        system=a.system.sample(),
                        ts=self.now,
                    )
                    if a.checks:
                        frame = replace(frame, checks=a.checks)
                    frames.append(frame)
            if frames or self.commands:
                obs = []
                for f in frames:
                    self.health, o = self.health_engine.observe(self.health, f, self.now)
                    obs += o
                self.evaluate(obs)
            if t + 1e-9 >= next_tick or self.state.next_due <= self.now:
                if t + 1e-9 >= next_tick:
                    next_tick += TICK
                self.health, obs = self.health_engine.tick(self.health, self.now)
                self.evaluate(obs)
        return self.told

    def evaluate(self, obs: list[Any]) -> None:
        commands, self.commands = self.commands, []
        hosts = self.health.provider_hosts() if obs else None
        self.state, _, notes = self.engine.evaluate(self.state, obs, self.now, commands, hosts)
        self.notes += notes
        for n in notes:
            self.told += told_of(n, T0)

    # ------------------------------------------------------------------ actions

    def agent(self, host: str) -> Agent:
        return next(a for a in self.agents if a.name == host)

    def act(self, action: Mapping[str, Any]) -> None:
        if "ack_incident" in action:
            p = action["ack_incident"]
            iid = self.state.open_incidents.get(f"provider:{p}")
            assert iid is not None, f"no open incident of {p} to acknowledge at {action['at']}"
            self.commands.append(AckIncident(iid, "scenario"))
        elif "ack" in action:
            host, rule = action["ack"]
            for a in self.state.alerts.values():
                if a.labels.get("host") == host and a.rule == rule and a.state != "resolved":
                    self.commands.append(Ack(a.fingerprint, "scenario"))
        elif "silence" in action:
            from collector.alerts import parse_matcher

            ms = tuple(parse_matcher(m) for m in action["silence"])
            sid = f"s{len(self.state.silences)}-{action['at']}"
            self.commands.append(AddSilence(Silence(sid, ms, self.now, self.now + float(action["for"]), "t")))
        elif action.get("restart"):
            self.restart()
        elif "reboot" in action:
            a = self.agent(action["reboot"])
            a.seqr = Sequencer(host=a.name, provider=a.provider)  # a new boot id, seq from 1
            a.system._boot_id = f"{a.seqr.boot_id}-kernel"  # and a new kernel boot id, as a reboot gives
            a.inventory_sent = False
        elif "swap" in action:
            host, _, gpu = str(action["swap"]).partition("/gpu")
            a = self.agent(host)
            g = a.backend._gpus[int(gpu)]  # the simulator's GPU: a new board, a new serial and UUID
            g.uuid, g.serial = f"GPU-swapped-{host}-{gpu}", f"swapped-{host}-{gpu}"
            a.backend._inventory = None
            a.inventory_sent = False
            a.tracker.set_inventory(a.backend.inventory().gpus)
        elif "checks" in action:
            for c in action["checks"]:
                targets = self.agents if c.get("host", "*") == "*" else [self.agent(c["host"])]
                check = CheckResult(
                    id=c["id"],
                    kind=c["kind"],
                    target=c.get("target", ""),
                    ok=bool(c["ok"]),
                    latency_ms=c.get("latency_ms"),
                    error=c.get("error"),
                )
                for a in targets:
                    a.checks = tuple(x for x in a.checks if x.id != check.id) + (check,)
        else:
            raise ValueError(f"unknown action {dict(action)}")
        if self.commands:
            self.evaluate([])

    def restart(self) -> None:
        """As a collector restart: the alert state through its saved JSON, the health state
        through its lean snapshot; hosts that were not stale get a fresh stale_after."""
        saved = json.loads(json.dumps(self.state.to_dict()))
        saved["next_due"] = 0.0
        self.state = self.engine.restore(saved)
        snap = json.loads(json.dumps(health_snapshot(self.health, self.health_engine.healthy_for)))
        self.health = state_from_dict(snap)
        for hs in self.health.hosts.values():
            if not hs.stale and hs.last_frame_at is not None:
                hs.last_frame_at = max(hs.last_frame_at, self.now)


def run_pure(sc: Scenario) -> list[Told]:
    return PureRun(sc).run()


def channels_of(told: Iterable[Told]) -> set[str]:
    return {t.channel for t in told}
