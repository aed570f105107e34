"""The remediation decisions, pure: alerts + time + state in, planned actions out.

:func:`plan` looks at the alerts (firing ones start actions; a host with no pending or firing
alert lets its held actions go on to their ``resolved`` steps), applies the rules' modes and
the safety limits (exclusions, per-host cooldown, one open action per host, the per-provider
circuit breaker, at most ``max_running`` actions running) and returns what changed: audit
events and the actions to run now. The executors (``collector.remediation.executors``) run
them and report each step with :func:`step_done`. No I/O here; the state round-trips through
PostgreSQL (``collector.remediation.store``), so a restarted collector neither starts an
action twice nor drains a node twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from collector.remediation.config import RemediationConfig, Rule

# Action states.
PLANNED: Final = "planned"  # dry_run: recorded, never run
AWAITING: Final = "awaiting_approval"
QUEUED: Final = "queued"  # approved (or auto), waiting for a running slot
RUNNING: Final = "running"
HOLDING: Final = "holding"  # firing steps done; waits for the host's alerts to resolve
DONE: Final = "done"
FAILED: Final = "failed"
DENIED: Final = "denied"
EXPIRED: Final = "expired"  # its host's alerts resolved before it was approved or could start
BLOCKED: Final = "blocked"  # excluded, cooling down, or the circuit breaker is open
OPEN: Final = frozenset({AWAITING, QUEUED, RUNNING, HOLDING})
FINAL: Final = frozenset({PLANNED, DONE, FAILED, DENIED, BLOCKED, EXPIRED})


@dataclass(frozen=True, slots=True)
class AlertView:
    """What remediation needs of an alert."""

    fingerprint: str
    episode: int
    rule: str
    labels: Mapping[str, str]
    severity: str
    action: str
    state: str  # pending, firing, resolved

    def match_labels(self) -> dict[str, str]:
        return {**self.labels, "rule": self.rule, "severity": self.severity, "action": self.action}


@dataclass(slots=True)
class Action:
    """One remediation rule applied to one alert episode."""

    id: str
    rule: str  # the remediation rule
    fingerprint: str
    episode: int
    alert_rule: str
    action: str  # the alert's action
    severity: str
    provider: str
    host: str
    node: str
    mode: str
    state: str
    created_at: float
    updated_at: float
    phase: str = "firing"  # which steps run next: firing, then resolved
    step: int = 0  # the next step to run
    started_at: float | None = None  # when it first ran (counts for the breaker and cooldown)
    drained: bool = False  # gpuwarden drained the node (only then may it resume it)
    reason: str = ""  # why blocked, denied or failed
    by: str = ""  # who approved or denied
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Action:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(slots=True)
class BreakerState:
    """One provider's circuit breaker: the hosts put under action within the window."""

    provider: str
    hosts: dict[str, float] = field(default_factory=dict)  # host -> when its action started
    tripped_at: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BreakerState:
        return cls(d["provider"], dict(d.get("hosts", {})), d.get("tripped_at"), d.get("reason", ""))


@dataclass(slots=True)
class RemediationState:
    actions: dict[str, Action] = field(default_factory=dict)  # open ones and recent final ones
    breakers: dict[str, BreakerState] = field(default_factory=dict)

    def open_for(self, host: str) -> Action | None:
        for a in self.actions.values():
            if a.host == host and a.state in OPEN:
                return a
        return None

    def running(self) -> int:
        return sum(1 for a in self.actions.values() if a.state == RUNNING)


@dataclass(frozen=True, slots=True)
class Event:
    """An audit record: ``event`` is proposed, planned, approved, denied, expired, blocked, started,
    step_ok, step_failed, failed, done, undone, breaker_tripped or breaker_reset."""

    action_id: str | None
    event: str
    at: float
    who: str = "gpuwarden"
    why: str = ""
    step: str = ""
    exit_code: int | None = None
    output: str = ""
    provider: str = ""


@dataclass(frozen=True, slots=True)
class StepResult:
    """What running one step gave (an executor's answer), recorded by :func:`step_done`."""

    ok: bool
    exit_code: int | None = None
    output: str = ""
    drained: bool | None = None  # slurm_drain: gpuwarden drained it (False: an operator had)
    undone: bool = False  # slurm_resume: the node was resumed
    why: str = ""


@dataclass(slots=True)
class Plan:
    events: list[Event] = field(default_factory=list)
    run: list[str] = field(default_factory=list)  # action ids to run now (state RUNNING)
    changed: set[str] = field(default_factory=set)  # action ids whose record changed
    breakers: set[str] = field(default_factory=set)  # providers whose breaker changed


def action_id(rule: str, fingerprint: str, episode: int) -> str:
    return hashlib.blake2b(f"{rule}/{fingerprint}/{episode}".encode(), digest_size=8).hexdigest()


def steps_of(rule: Rule, phase: str) -> list[int]:
    return [i for i, s in enumerate(rule.steps) if s.when == phase]


def plan(
    state: RemediationState,
    cfg: RemediationConfig,
    alerts: Iterable[AlertView],
    now: float,
    provider_hosts: Mapping[str, int],
) -> Plan:
    """Decide: new actions for firing alerts, held actions whose host is clear, queued
    actions that may start. ``alerts``: every pending or firing alert (this partition's)."""
    out = Plan()
    rules = {r.name: r for r in cfg.rules}
    on_host: dict[str, list[AlertView]] = {}  # host -> its pending or firing alerts
    firing: list[AlertView] = []
    for a in alerts:
        host = a.labels.get("host")
        if not host or a.state not in ("pending", "firing"):
            continue
        on_host.setdefault(host, []).append(a)
        if a.state == "firing":
            firing.append(a)

    def clear(act: Action) -> bool:
        """The host has no pending or firing alert that is critical or matches the action's
        rule (a lasting warning elsewhere on the host does not hold a node drained forever)."""
        rule = rules.get(act.rule)
        for a in on_host.get(act.host, ()):
            if a.severity == "critical" or (rule is not None and rule.matches(a.match_labels())):
                return False
        return True

    _expire(state, cfg, now, out)
    for a in firing:
        _propose(state, cfg, a, now, provider_hosts, out)
    for act in state.actions.values():
        unstarted = act.state == QUEUED and act.phase == "firing" and act.started_at is None
        if (act.state == AWAITING or unstarted) and clear(act):
            # never act on a host that recovered before the action was approved or could start
            act.state, act.updated_at = EXPIRED, now
            act.reason = "the host's alerts resolved before it " + (
                "was approved" if act.by == "" else "could start"
            )
            out.events.append(Event(act.id, "expired", now, why=act.reason))
            out.changed.add(act.id)
            continue
        if act.state == HOLDING and clear(act):
            rule = rules.get(act.rule)
            act.phase, act.step, act.updated_at = "resolved", 0, now
            if rule is None or not steps_of(rule, "resolved"):
                act.state = DONE
                out.events.append(Event(act.id, "done", now, why="the host's alerts resolved"))
            else:
                act.state = QUEUED
                out.events.append(
                    Event(act.id, "queued", now, why="the host's alerts resolved: validation and resume")
                )
            out.changed.add(act.id)
    _start(state, cfg, now, provider_hosts, out)
    return out


def _expire(state: RemediationState, cfg: RemediationConfig, now: float, out: Plan) -> None:
    """Forget final actions older than the cooldown and breaker window; breaker entries out
    of the window."""
    keep = max(cfg.cooldown, cfg.breaker.window)
    for aid in [i for i, a in state.actions.items() if a.state in FINAL and now - a.updated_at > keep]:
        del state.actions[aid]
    for b in state.breakers.values():
        old = [h for h, t in b.hosts.items() if now - t > cfg.breaker.window]
        for h in old:
            del b.hosts[h]
        if old:
            out.breakers.add(b.provider)


def _propose(
    state: RemediationState,
    cfg: RemediationConfig,
    a: AlertView,
    now: float,
    provider_hosts: Mapping[str, int],
    out: Plan,
) -> None:
    labels = a.match_labels()
    host, provider = a.labels.get("host", ""), a.labels.get("provider", "")
    for rule in cfg.rules:
        if not rule.matches(labels):
            continue
        aid = action_id(rule.name, a.fingerprint, a.episode)
        if aid in state.actions:
            return  # decided already (idempotent across restarts: the id is stable)
        if rule.mode != "dry_run" and state.open_for(host) is not None:
            return  # one open action per host: the node is drained once
        act = Action(
            aid,
            rule.name,
            a.fingerprint,
            a.episode,
            a.rule,
            a.action,
            a.severity,
            provider,
            host,
            cfg.slurm.node_of(host, a.labels),
            rule.mode,
            QUEUED,
            now,
            now,
            labels=dict(a.labels),
        )
        state.actions[aid] = act
        out.changed.add(aid)
        why = f"{a.rule} {a.severity} ({a.action}) on {host}"
        out.events.append(
            Event(aid, "proposed", now, why=why, step="; ".join(s.describe() for s in rule.steps))
        )
        blocked = cfg.excluded(host, a.labels) or _cooldown(state, cfg, host, now)
        if blocked is None and rule.mode != "dry_run":
            b = state.breakers.get(provider)
            if b is not None and b.tripped_at is not None:
                blocked = f"circuit breaker for {provider} is open: {b.reason}"
        if blocked is not None:
            act.state, act.reason = BLOCKED, blocked
            out.events.append(Event(aid, "blocked", now, why=blocked))
        elif rule.mode == "dry_run":
            act.state = PLANNED
            out.events.append(
                Event(aid, "planned", now, why="dry_run: nothing done", step=_plan_text(rule, act))
            )
        elif rule.mode == "approve":
            act.state = AWAITING
        else:
            act.by = "auto"
            out.events.append(Event(aid, "approved", now, who="auto", why="mode auto"))
        return  # the first matching rule decides


def _plan_text(rule: Rule, act: Action) -> str:
    parts = []
    for s in rule.steps:
        if s.kind == "slurm_drain":
            parts.append(f'scontrol update NodeName={act.node} State=DRAIN Reason="{drain_reason(act)}"')
        elif s.kind == "slurm_resume":
            parts.append(f"when resolved: scontrol update NodeName={act.node} State=RESUME")
        else:
            parts.append(("when resolved: " if s.when == "resolved" else "") + s.describe())
    return "; ".join(parts)


def drain_reason(act: Action) -> str:
    return f"gpuwarden: {act.rule} {act.fingerprint}"


def _cooldown(state: RemediationState, cfg: RemediationConfig, host: str, now: float) -> str | None:
    for a in state.actions.values():
        if (
            a.host == host
            and a.started_at is not None
            and now - a.started_at < cfg.cooldown
            and a.state not in OPEN
        ):
            return f"cooldown: an action started on {host} {now - a.started_at:.0f} s ago"
    return None


def _start(
    state: RemediationState, cfg: RemediationConfig, now: float, provider_hosts: Mapping[str, int], out: Plan
) -> None:
    running = state.running()
    for act in sorted(state.actions.values(), key=lambda x: (x.created_at, x.id)):
        if act.state != QUEUED:
            continue
        if running >= cfg.max_running:
            return
        if act.phase == "firing" and act.started_at is None:
            b = state.breakers.setdefault(act.provider, BreakerState(act.provider))
            out.breakers.add(act.provider)
            if b.tripped_at is not None:
                act.state, act.reason, act.updated_at = (
                    BLOCKED,
                    f"circuit breaker for {act.provider} is open",
                    now,
                )
                out.events.append(Event(act.id, "blocked", now, why=act.reason))
                out.changed.add(act.id)
                continue
            hosts = set(b.hosts) | {act.host}
            total = max(provider_hosts.get(act.provider, 0), 1)
            limit = cfg.breaker.limit(total)
            if len(hosts) > limit:
                b.tripped_at = now
                b.reason = (
                    f"{len(hosts)} of {total} hosts of {act.provider} would be under action within "
                    f"{cfg.breaker.window:.0f} s (limit {limit}: max_share {cfg.breaker.max_share:g}, "
                    f"max_hosts {cfg.breaker.max_hosts})"
                )
                out.events.append(Event(None, "breaker_tripped", now, why=b.reason, provider=act.provider))
                act.state, act.reason, act.updated_at = BLOCKED, f"circuit breaker tripped: {b.reason}", now
                out.events.append(Event(act.id, "blocked", now, why=act.reason))
                out.changed.add(act.id)
                continue
            b.hosts[act.host] = now
            act.started_at = now
        act.state, act.updated_at = RUNNING, now
        running += 1
        out.run.append(act.id)
        out.changed.add(act.id)
        out.events.append(Event(act.id, "started", now, why=f"{act.phase} steps"))


def step_done(
    state: RemediationState,
    cfg: RemediationConfig,
    aid: str,
    res: StepResult,
    now: float,
    *,
    step: str,
) -> Plan:
    """Record the outcome ``res`` of the action's next step (``step`` describes it); returns the
    events (and, when the phase is over, the action's new state)."""
    out = Plan()
    act = state.actions[aid]
    out.changed.add(aid)
    act.updated_at = now
    if res.drained is not None:
        act.drained = res.drained
    ev = "step_ok" if res.ok else "step_failed"
    out.events.append(Event(aid, ev, now, step=step, exit_code=res.exit_code, output=res.output, why=res.why))
    if res.undone:
        out.events.append(Event(aid, "undone", now, step=step, why=f"node {act.node} resumed"))
    if not res.ok:
        act.state, act.reason = FAILED, f"{step} failed" + (f": {res.why}" if res.why else "")
        out.events.append(Event(aid, "failed", now, why=act.reason, exit_code=res.exit_code))
        return out
    cur = current_step(cfg, act)
    advance(state, cfg, aid, now, out, after=cur)
    return out


def advance(
    state: RemediationState, cfg: RemediationConfig, aid: str, now: float, out: Plan, after: int | None
) -> None:
    """Move the action past step ``after`` (``None``: its phase has no step left)."""
    act = state.actions[aid]
    rule = {r.name: r for r in cfg.rules}.get(act.rule)
    remaining = [i for i in steps_of(rule, act.phase) if after is not None and i > after] if rule else []
    out.changed.add(aid)
    if remaining:
        act.step = remaining[0]
        return
    if act.phase == "firing" and rule is not None and steps_of(rule, "resolved"):
        act.state = HOLDING
        out.events.append(Event(aid, "holding", now, why="waits for the host's alerts to resolve"))
    else:
        act.state = DONE
        out.events.append(Event(aid, "done", now))


def current_step(cfg: RemediationConfig, act: Action) -> int | None:
    """The index of the step the action runs next, or ``None`` when its phase has no more."""
    rule = {r.name: r for r in cfg.rules}.get(act.rule)
    if rule is None:
        return None
    idx = steps_of(rule, act.phase)
    cand = [i for i in idx if i >= act.step]
    return cand[0] if cand else None


def decide(state: RemediationState, aid: str, approve: bool, who: str, now: float, comment: str = "") -> Plan:
    """An approval or a denial of an action awaiting one (``KeyError`` if unknown, ``ValueError``
    if it is not awaiting approval)."""
    act = state.actions[aid]
    if act.state != AWAITING:
        raise ValueError(f"action {aid} is {act.state}, not awaiting approval")
    out = Plan()
    act.by, act.updated_at = who, now
    if approve:
        act.state = QUEUED
        out.events.append(Event(aid, "approved", now, who=who, why=comment))
    else:
        act.state, act.reason = DENIED, comment or "denied"
        out.events.append(Event(aid, "denied", now, who=who, why=comment))
    out.changed.add(aid)
    return out


def reset_breaker(state: RemediationState, provider: str, who: str, now: float) -> Plan:
    b = state.breakers.get(provider)
    if b is None:
        raise KeyError(provider)
    out = Plan()
    was = b.reason
    b.tripped_at, b.reason, b.hosts = None, "", {}
    out.breakers.add(provider)
    out.events.append(
        Event(None, "breaker_reset", now, who=who, why=f"was: {was}" if was else "", provider=provider)
    )
    return out


def tripped(state: RemediationState) -> Sequence[BreakerState]:
    return [b for b in state.breakers.values() if b.tripped_at is not None]
