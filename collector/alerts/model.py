"""Alert engine records: alerts, incidents, transitions, notifications, commands, state.

The state is plain data: :meth:`AlertState.to_dict` gives JSON-compatible values and
:meth:`AlertState.from_dict` restores it, so an effects layer can persist it (with the
notifications it still has to deliver) and a restarted collector resumes without
notifying again what it already sent.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypedDict

from collector.alerts.config import Silence
from collector.health.actions import action_for
from collector.health.model import R_EVICTED as R_EVICTED  # resolution reasons, re-exported
from collector.health.model import R_FORGOTTEN as R_FORGOTTEN
from collector.health.model import R_MOVED as R_MOVED
from collector.health.model import R_REPLACED as R_REPLACED
from collector.health.model import REASONS as REASONS

PENDING: Final = "pending"
FIRING: Final = "firing"
RESOLVED: Final = "resolved"
SEVERITIES: Final = ("critical", "warning", "info")
# What ``GET /api/v1/alerts?state=`` selects: the lifecycle states and three flags.
ALERT_STATES: Final = (PENDING, FIRING, RESOLVED, "acknowledged", "silenced", "inhibited")


class AlertQuery(TypedDict, total=False):
    """Which alerts to list (``GET /api/v1/alerts``): each filter given narrows the list."""

    state: str | None  # one of ALERT_STATES
    provider: str | None
    host: str | None
    severity: str | None


# Notification kinds.
N_FIRING: Final = "firing"
N_RESOLVED: Final = "resolved"
N_ESCALATED: Final = "escalated"
N_REPEAT: Final = "repeat"
N_FLAPPING: Final = "flapping"
N_PROVIDER: Final = "provider_incident"
N_UPDATE: Final = "incident_update"


def fingerprint(key: str) -> str:
    """Stable identity of an alert: a hash of its rule and labels (``Observation.key``)."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


@dataclass(slots=True)
class Alert:
    """One alert (rule + labels); a condition that keeps holding stays one alert."""

    fingerprint: str
    key: str
    rule: str
    labels: dict[str, str]
    severity: str
    state: str = RESOLVED
    summary: str = ""
    advice: str = ""
    value: float | None = None
    immediate: bool = False
    active: bool = False  # the condition, per the last observation
    episode: int = 0  # how many times it started (pending) so far
    started_at: float = 0.0  # this episode went pending
    fired_at: float | None = None
    resolved_at: float | None = None
    last_seen: float = 0.0
    ack_by: str | None = None
    ack_at: float | None = None
    ack_until: float | None = None
    ack_comment: str = ""
    ack_incident: str | None = None  # acknowledged by acknowledging this incident
    silenced_by: list[str] = field(default_factory=list)
    inhibited_by: str | None = None  # fingerprint of the root-cause alert
    flapping: bool = False
    flap_bits: int = 0  # last states, newest in bit 0 (1: condition held)
    flap_n: int = 1  # how many states the history holds
    policy: str | None = None
    level: int = -1  # escalation level reached this episode (-1: nothing notified yet)
    notify_base: float | None = None  # when it became notifiable: escalation delays count from here
    notified: str | None = None  # "firing", "flapping" or "incident" (told by a provider incident)
    last_notified_at: float | None = None
    told: list[str] = field(default_factory=list)  # channels notified this episode
    incident: str | None = None
    reason: str = ""  # why the last episode resolved when not by a healthy reading (REASONS)
    # A collector group: its own first notice is held for another member's provider incident
    # (``held_by``), which tells it in its next update; told on its own at ``held_until`` if the
    # incident did not say it told it by then (docs/alerts.md, "In a collector group").
    held_by: str | None = None
    held_until: float | None = None

    @property
    def action(self) -> str:
        """What to do about it: the machine-readable action of its check (docs/health.md)."""
        return action_for(self.rule, self.labels, self.value)

    def match_labels(self) -> dict[str, str]:
        """Labels plus ``rule`` and ``severity``, as silences and policies see them."""
        return {**self.labels, "rule": self.rule, "severity": self.severity}


@dataclass(slots=True)
class Incident:
    """Alerts grouped by (provider, host) within the correlation window, or a provider-wide
    incident (``host`` is ``None``) when many of a provider's hosts fail together."""

    id: str
    provider: str
    host: str | None
    opened_at: float
    last_activity: float
    closed_at: float | None = None
    alerts: list[str] = field(default_factory=list)  # fingerprints
    hosts: list[str] = field(default_factory=list)  # provider-wide: the failing hosts
    notified: bool = False
    told: list[str] = field(default_factory=list)
    # Provider-wide incidents tell their members: by the first notification, then by updates.
    covered: dict[str, str] = field(default_factory=dict)  # fingerprint -> "episode/severity" told
    covered_at: dict[str, float] = field(default_factory=dict)  # fingerprint -> when it was told
    pending: list[str] = field(default_factory=list)  # joined, waiting for the next update
    update_due: float | None = None  # when the pending members are told
    last_sent_at: float | None = None  # the first notification or the last update
    updates: int = 0  # notifications sent about it so far (first, updates, escalations)
    policy: str | None = None  # the policy that routed its first notification
    total_hosts: int = 0  # the provider's hosts when it opened
    ack_by: str | None = None
    ack_at: float | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of an alert: ``kind`` is a lifecycle state (pending, firing, resolved) or a
    flag change (acknowledged, unacknowledged, silenced, unsilenced, inhibited, uninhibited,
    flapping, flapping_stopped, severity, rerouted) or, in a collector group, ``held`` (its first
    notice held for another member's provider incident) and ``incident_told`` (that incident
    told it)."""

    fingerprint: str
    rule: str
    labels: Mapping[str, str]
    at: float
    kind: str
    state: str
    severity: str
    summary: str
    incident: str | None = None
    reason: str = ""  # a resolution's reason (``Alert.reason``), else empty


@dataclass(frozen=True, slots=True)
class Notification:
    """Something an effects layer delivers to ``channels``.

    ``kind``: firing, resolved, escalated, repeat, flapping, provider_incident or
    incident_update. An alert's notification has ``fingerprint``; an incident's
    (provider-wide) has ``fingerprint=None``, lists the hosts it is about in ``hosts`` (the
    first: every failing host; an update: the hosts of its new members), the rules in
    ``rules``, the alerts it tells (covers) in ``alerts`` and, for an update, the hosts new
    to the incident in ``new_hosts``. For an incident's notifications ``episode`` counts
    them (0 for the first).
    """

    kind: str
    channels: tuple[str, ...]
    at: float
    fingerprint: str | None
    incident: str | None
    rule: str
    labels: Mapping[str, str]
    severity: str
    summary: str
    advice: str = ""
    level: int = 0
    hosts: tuple[str, ...] = ()
    episode: int = 0  # the alert's episode: (fingerprint, episode, kind, level) identifies a delivery
    rules: tuple[str, ...] = ()
    alerts: tuple[str, ...] = ()  # fingerprints an incident's notification tells
    new_hosts: tuple[str, ...] = ()
    reason: str = ""  # a resolution's reason (``Alert.reason``), else empty


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge a pending or firing alert (optionally until ``until``): stops escalation.

    ``incident``: acknowledged as a member of that incident, which another member of a collector
    group holds (its judge acknowledged it, :class:`AckIncident`, and asks the alert's owner):
    applied only if not acknowledged yet, and ``Alert.ack_incident`` names the incident."""

    fingerprint: str
    by: str
    until: float | None = None
    comment: str = ""
    incident: str | None = None


@dataclass(frozen=True, slots=True)
class AckIncident:
    """Acknowledge an incident: each of its pending or firing members not yet acknowledged is
    acknowledged (``Alert.ack_incident`` names the incident); members that join later are not."""

    incident: str
    by: str
    until: float | None = None
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Unack:
    fingerprint: str
    by: str = ""


@dataclass(frozen=True, slots=True)
class AddSilence:
    silence: Silence


@dataclass(frozen=True, slots=True)
class ExpireSilence:
    id: str


@dataclass(frozen=True, slots=True)
class ForgetHost:
    """Resolve every alert of ``host`` (under any provider) with reason ``forgotten`` and drop
    the host from the hosts the engine counts (``gpuwarden collector forget-host``)."""

    host: str


Command = Ack | AckIncident | Unack | AddSilence | ExpireSilence | ForgetHost


class Outcome(NamedTuple):
    state: AlertState
    transitions: list[Transition]
    notifications: list[Notification]


def plain(obj: Alert | Incident) -> dict[str, Any]:
    """An alert or incident as JSON-compatible data (what PostgreSQL stores; see ``from_dict``)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
    return out


@dataclass(slots=True)
class AlertState:
    """Alerts by ``Observation.key``, runtime silences, incidents and known hosts."""

    alerts: dict[str, Alert] = field(default_factory=dict)
    silences: dict[str, Silence] = field(default_factory=dict)  # added at run time (API)
    incidents: dict[str, Incident] = field(default_factory=dict)
    open_incidents: dict[str, str] = field(
        default_factory=dict
    )  # "host:<provider>/<host>" or "provider:<provider>" -> id
    hosts: dict[str, dict[str, None]] = field(default_factory=dict)  # provider -> hosts seen
    active_silences: list[str] = field(default_factory=list)  # ids active at the last evaluation
    next_due: float = 0.0  # the earliest time something time-driven happens
    # pending alert (fingerprint) -> the host's times (its frames') it went pending at and was
    # last seen still holding, when observed from frames: ``for`` also holds in the host's time
    # (a backlog judged in a burst). Not persisted: a pending alert restored counts from its
    # ``started_at``, before the gap.
    pending_seen: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Derived indexes (rebuilt by reindex(), not persisted).
    by_fp: dict[str, Alert] = field(default_factory=dict)
    by_host: dict[tuple[str, str], dict[str, None]] = field(default_factory=dict)
    roots: dict[tuple[str, tuple[str, ...]], dict[str, None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alerts": [plain(a) for a in self.alerts.values()],
            "silences": [s.to_dict() for s in self.silences.values()],
            "incidents": [plain(i) for i in self.incidents.values()],
            "open_incidents": dict(self.open_incidents),
            "hosts": {p: list(h) for p, h in self.hosts.items()},
            "active_silences": list(self.active_silences),
            "next_due": self.next_due,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlertState:
        """Restore a state saved by :meth:`to_dict`; call the engine's ``reindex`` after."""
        d = copy.deepcopy(d)  # the restored state shares nothing with ``d``
        alerts = [Alert(**{**a, "labels": dict(a["labels"])}) for a in d.get("alerts", [])]
        return cls(
            alerts={a.key: a for a in alerts},
            silences={s["id"]: Silence.from_dict(s) for s in d.get("silences", [])},
            incidents={i["id"]: Incident(**i) for i in d.get("incidents", [])},  # older rows: defaults
            open_incidents=dict(d.get("open_incidents", {})),
            hosts={p: dict.fromkeys(h) for p, h in d.get("hosts", {}).items()},
            active_silences=list(d.get("active_silences", [])),
            next_due=float(d.get("next_due", 0.0)),
        )


def notifiable(a: Alert) -> bool:
    """Firing, not silenced, inhibited nor flapping: may be notified as firing."""
    return a.state == FIRING and not a.silenced_by and a.inhibited_by is None and not a.flapping


def quiet_ok(a: Alert) -> bool:
    """Not silenced nor inhibited: may be told about (resolution, flapping)."""
    return not a.silenced_by and a.inhibited_by is None
