"""Alert rules, silences, maintenance windows and escalation policies (frozen config).

Built from ``collector.toml`` by :func:`alert_config_from`::

    [alerts]
    for = "30s"                        # pending time of threshold rules; event rules fire at once
    correlation_window = "5m"
    group_interval = "30s"             # batch of a provider incident's updates
    group_wait = "0s"                  # first notifications wait this long to be grouped
    [alerts.for_rules]                 # per-rule pending times
    "gpu.temperature" = "1m"
    [[alerts.silence]]
    matchers = ["host=~gpu-0[0-9]", "rule=gpu.temperature"]
    ends = 2026-12-01T00:00:00Z
    author = "ops"
    comment = "chiller work"
    [[alerts.maintenance]]
    provider = "acme-east"
    host = "gpu-node-17"              # optional: the whole provider otherwise
    starts = "2026-11-30T08:00:00Z"
    ends = "2026-11-30T12:00:00Z"
    [[escalation.policy]]
    name = "critical"
    match = { severity = "critical" }
    levels = [{ after = "0s", notify = ["oncall"] }, { after = "10m", notify = ["manager"] }]
    repeat = "4h"
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any, Final

from shared.config import build_section, dur, env_name, num, parse_duration
from shared.errors import ConfigError

OPS: Final = ("=~", "!~", "!=", "=")
_MATCHER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$")
FOREVER: Final = 1e18


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(f"^(?:{pattern})$")


@dataclass(frozen=True, slots=True)
class Matcher:
    """A label matcher: ``name op value`` with op ``=``, ``!=``, ``=~`` or ``!~`` (anchored regex).

    A missing label matches as the empty string (as in Alertmanager).
    """

    name: str
    op: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.name, "")
        op = self.op
        if op == "=":
            return v == self.value
        if op == "!=":
            return v != self.value
        hit = _regex(self.value).match(v) is not None
        return hit if op == "=~" else not hit

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"


def parse_matcher(text: str, key: str = "matcher") -> Matcher:
    """Parse ``name=value``, ``name!=value``, ``name=~regex`` or ``name!~regex``."""
    m = _MATCHER.match(text)
    if not m:
        raise ConfigError(key, f"expected name=value, name!=value, name=~regex or name!~regex, got {text!r}")
    name, op, value = m.groups()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    if op in ("=~", "!~"):
        try:
            _regex(value)
        except re.error as e:
            raise ConfigError(key, f"bad regular expression {value!r}: {e}") from e
    return Matcher(name, op, value)


def matches_all(matchers: Sequence[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


@dataclass(frozen=True, slots=True)
class Silence:
    """Mutes notifications of the alerts it matches between ``starts_at`` and ``ends_at``."""

    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float = 0.0
    ends_at: float = FOREVER
    author: str = ""
    comment: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "matchers": [str(m) for m in self.matchers],
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "author": self.author,
            "comment": self.comment,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Silence:
        return cls(
            id=d["id"],
            matchers=tuple(parse_matcher(m) for m in d["matchers"]),
            starts_at=float(d["starts_at"]),
            ends_at=float(d["ends_at"]),
            author=d.get("author", ""),
            comment=d.get("comment", ""),
        )


@dataclass(frozen=True, slots=True)
class Level:
    """One escalation level: after ``after`` seconds unacknowledged, notify ``notify``."""

    after: float
    notify: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """An escalation policy: which alerts (matchers on labels, ``rule`` and ``severity``),
    ordered levels, and the repeat interval for still-firing alerts (0: never)."""

    name: str
    matchers: tuple[Matcher, ...]
    levels: tuple[Level, ...]
    repeat: float = 0.0


@dataclass(frozen=True, slots=True)
class InhibitRule:
    """While an alert of rule ``source`` fires, alerts whose rule starts with one of
    ``targets`` and that share the ``equal`` labels are inhibited (recorded, not notified)."""

    source: str
    targets: tuple[str, ...]
    equal: tuple[str, ...]


# Event-class criticals: a provider incident's update about one of these goes out at once
# (not batched at ``group_interval``): fatal XID, GPU lost, double-bit ECC, row-remap failure.
EVENT_RULES: Final = ("gpu.xid", "gpu.lost", "gpu.ecc_dbe", "gpu.row_remap")

DEFAULT_INHIBIT: Final = (
    InhibitRule("host.unreachable", ("gpu.", "host.", "net."), ("provider", "host")),
    InhibitRule("gpu.lost", ("gpu.",), ("provider", "host", "gpu")),
)


@dataclass(frozen=True, slots=True)
class AlertsSection:
    """``[alerts]`` (``for`` is spelt ``for`` in the file)."""

    for_s: float = dur("30s")  # pending time of threshold rules
    network_for: float = dur("1m")  # pending time of the network checks' rules (net.*)
    correlation_window: float = dur("5m")  # alerts of one host within it form one incident
    group_interval: float = dur("30s")  # a provider incident's updates are batched this long
    group_wait: float = dur("0s")  # a first notification (not event-class) waits this long for its group
    provider_incident_share: float = num(0.2, 0.0, 1.0)  # more than this share of hosts failing
    provider_incident_min_hosts: int = num(3, 1, 1_000_000)
    flap_history: int = num(21, 3, 63)
    flap_start_pct: float = num(30.0, 0.0, 100.0)
    flap_stop_pct: float = num(20.0, 0.0, 100.0)
    resolved_retention: float = dur("1h")  # resolved alerts kept in state this long


@dataclass(frozen=True, slots=True)
class AlertConfig:
    """Everything the alert engine needs."""

    alerts: AlertsSection = field(default_factory=AlertsSection)
    for_rules: Mapping[str, float] = field(default_factory=dict)  # rule -> pending time
    silences: tuple[Silence, ...] = ()  # from [[alerts.silence]] and [[alerts.maintenance]]
    policies: tuple[Policy, ...] = ()
    inhibit: tuple[InhibitRule, ...] = DEFAULT_INHIBIT
    event_rules: tuple[str, ...] = EVENT_RULES  # critical + immediate: incident updates at once

    def for_of(self, rule: str) -> float:
        """Pending time of ``rule``: ``[alerts.for_rules]``, else ``network_for`` for ``net.*``
        rules (the agent's network checks), else ``for``."""
        f = self.for_rules.get(rule)
        if f is not None:
            return f
        return self.alerts.network_for if rule.startswith("net.") else self.alerts.for_s

    def route(self, labels: Mapping[str, str]) -> Policy | None:
        """The first escalation policy whose matchers match (severity-based routing)."""
        for p in self.policies:
            if matches_all(p.matchers, labels):
                return p
        return None


def parse_time(value: object, key: str) -> float:
    """Unix seconds from a TOML datetime, an ISO 8601 string or a number (naive means UTC)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a date-time, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as e:
            raise ConfigError(key, f"expected an ISO 8601 date-time, got {value!r}") from e
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    raise ConfigError(key, f"expected a date-time, got {value!r}")


def _list(raw: Mapping[str, Any], name: str, key: str) -> list[Mapping[str, Any]]:
    items = raw.get(name, [])
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise ConfigError(key, "expected an array of tables")
    return items


def _strings(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "expected a list of strings")
    return tuple(value)


def _only(table: Mapping[str, Any], allowed: set[str], key: str) -> None:
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}", "unknown key")


def _silence_id(kind: str, parts: Sequence[object]) -> str:
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=6).hexdigest()
    return f"{kind}-{digest}"


def _silences(raw: Mapping[str, Any], where: str) -> list[Silence]:
    """``[[<where>.silence]]`` and ``[[<where>.maintenance]]`` (``where`` empty: top level)."""
    out = []
    dot = f"{where}." if where else ""
    for i, t in enumerate(_list(raw, "silence", f"{dot}silence")):
        key = f"{dot}silence[{i}]"
        _only(t, {"id", "matchers", "starts", "ends", "author", "comment"}, key)
        matchers = tuple(
            parse_matcher(m, f"{key}.matchers") for m in _strings(t.get("matchers"), f"{key}.matchers")
        )
        if not matchers:
            raise ConfigError(f"{key}.matchers", "a silence needs at least one matcher")
        if "ends" not in t:
            raise ConfigError(f"{key}.ends", "a silence needs an end")
        starts = parse_time(t.get("starts", 0), f"{key}.starts")
        ends = parse_time(t["ends"], f"{key}.ends")
        sid = str(t.get("id") or _silence_id("silence", [str(m) for m in matchers] + [starts, ends]))
        out.append(Silence(sid, matchers, starts, ends, str(t.get("author", "")), str(t.get("comment", ""))))
    for i, t in enumerate(_list(raw, "maintenance", f"{dot}maintenance")):
        key = f"{dot}maintenance[{i}]"
        _only(t, {"provider", "host", "starts", "ends", "author", "comment"}, key)
        if not isinstance(t.get("provider"), str) or not t["provider"]:
            raise ConfigError(f"{key}.provider", "a maintenance window names its provider")
        ms = [Matcher("provider", "=", t["provider"])]
        if "host" in t:
            if not isinstance(t["host"], str) or not t["host"]:
                raise ConfigError(f"{key}.host", "expected a host name")
            ms.append(Matcher("host", "=", t["host"]))
        for need in ("starts", "ends"):
            if need not in t:
                raise ConfigError(f"{key}.{need}", "a maintenance window needs a start and an end")
        starts, ends = parse_time(t["starts"], f"{key}.starts"), parse_time(t["ends"], f"{key}.ends")
        if ends <= starts:
            raise ConfigError(f"{key}.ends", "must be after starts")
        sid = _silence_id("maintenance", [str(m) for m in ms] + [starts, ends])
        comment = str(t.get("comment", "maintenance window"))
        out.append(Silence(sid, tuple(ms), starts, ends, str(t.get("author", "")), comment))
    return out


def _policies(raw: Mapping[str, Any]) -> tuple[Policy, ...]:
    out: list[Policy] = []
    for i, t in enumerate(_list(raw, "policy", "escalation.policy")):
        key = f"escalation.policy[{i}]"
        _only(t, {"name", "match", "match_re", "levels", "repeat"}, key)
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}.name", "a policy needs a name")
        if any(p.name == name for p in out):
            raise ConfigError(f"{key}.name", f"duplicate policy name {name!r}")
        matchers: list[Matcher] = []
        for table, op in (("match", "="), ("match_re", "=~")):
            m = t.get(table, {})
            if not isinstance(m, Mapping) or not all(isinstance(v, str) for v in m.values()):
                raise ConfigError(f"{key}.{table}", "expected a table of label = string")
            for label, value in m.items():
                matchers.append(parse_matcher(f"{label}{op}{value}", f"{key}.{table}.{label}"))
        levels: list[Level] = []
        for j, lv in enumerate(_list(t, "levels", f"{key}.levels")):
            lkey = f"{key}.levels[{j}]"
            _only(lv, {"after", "notify"}, lkey)
            after = parse_duration(lv.get("after", 0), f"{lkey}.after")
            if levels and after < levels[-1].after:
                raise ConfigError(f"{lkey}.after", "levels must be in increasing order of 'after'")
            channels = _strings(lv.get("notify"), f"{lkey}.notify")
            if not channels:
                raise ConfigError(f"{lkey}.notify", "a level notifies at least one channel")
            levels.append(Level(after, channels))
        if not levels:
            raise ConfigError(f"{key}.levels", "a policy needs at least one level")
        repeat = parse_duration(t.get("repeat", 0), f"{key}.repeat")
        out.append(Policy(name, tuple(matchers), tuple(levels), repeat))
    return tuple(out)


def alert_config_from(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> AlertConfig:
    """Build :class:`AlertConfig` from the raw top-level tables of ``collector.toml``.

    ``raw`` maps section names to tables (``CollectorConfig.raw``): ``raw["alerts"]`` (with
    ``for_rules``, ``silence`` and ``maintenance`` inside), ``raw["escalation"]`` (with
    ``policy``) and, if present, top-level ``raw["silence"]`` / ``raw["maintenance"]``.
    ``GPUWARDEN_ALERTS_<KEY>`` variables override ``[alerts]`` scalars. Raises
    :class:`ConfigError` naming the key.
    """
    env = os.environ if env is None else env
    alerts = raw.get("alerts", {}) or {}
    escalation = raw.get("escalation", {}) or {}
    if not isinstance(alerts, Mapping):
        raise ConfigError("alerts", "expected a table")
    if not isinstance(escalation, Mapping):
        raise ConfigError("escalation", "expected a table")
    _only(escalation, {"policy"}, "escalation")
    names = {f.name for f in dataclasses.fields(AlertsSection)}
    values: dict[str, Any] = {}
    for k, v in alerts.items():
        if k in ("for_rules", "silence", "maintenance"):
            continue
        name = "for_s" if k == "for" else k
        if name not in names or k == "for_s":
            raise ConfigError(f"alerts.{k}", "unknown key")
        values[name] = v
    for name in names:
        var = env_name("alerts", "for" if name == "for_s" else name)
        if var in env:
            values[name] = env[var]
    try:
        section = build_section(AlertsSection, values, "alerts", env)
    except ConfigError as e:
        if e.key != "alerts.for_s":
            raise
        raise ConfigError("alerts.for", e.message) from e
    if section.flap_stop_pct > section.flap_start_pct:
        raise ConfigError("alerts.flap_stop_pct", "must not exceed alerts.flap_start_pct")
    rules = alerts.get("for_rules", {})
    if not isinstance(rules, Mapping):
        raise ConfigError("alerts.for_rules", "expected a table of rule = duration")
    for_rules = {str(r): parse_duration(v, f"alerts.for_rules.{r}") for r, v in rules.items()}
    silences = _silences(alerts, "alerts") + _silences(raw, "")  # top-level [[silence]] too
    ids = [x.id for x in silences]
    if len(set(ids)) != len(ids):
        raise ConfigError(
            "alerts.silence", f"duplicate silence id {next(i for i in ids if ids.count(i) > 1)!r}"
        )
    return AlertConfig(section, for_rules, tuple(silences), _policies(escalation))
