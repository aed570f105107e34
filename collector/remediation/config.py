"""``[remediation]``: rules that act on alerts, their steps and modes, and the safety limits.

    [remediation]
    max_running = 4                      # actions running at once (K); more wait their turn
    cooldown = "1h"                      # per host: no new action this long after the last one
    exclude_hosts = ["login-.*"]         # full-match regexes on the host name
    exclude = ["rack=~r0[12]"]           # label matchers (name=value, !=, =~, !~)

    [remediation.breaker]                # per provider, over the last `window`
    max_share = 0.10                     # at most this share of the provider's hosts under action
    max_hosts = 20                       # and at most this many
    window = "1h"

    [remediation.slurm]
    scontrol = "scontrol"                # the command (a path or a name on PATH)
    conf = ""                            # SLURM_CONF for scontrol, when not the default
    node = "{host}"                      # host -> node name template ({host}, {provider}, labels)
    nodes = { "gpu-a1" = "node001" }     # explicit host -> node names (before the template)

    [[remediation.rule]]
    name = "fatal-xid"
    match = ["rule=gpu.xid", "severity=critical"]  # matchers on labels, rule, severity, action
    mode = "auto"                        # dry_run (default), approve, auto
      [[remediation.rule.step]]
      kind = "slurm_drain"
      [[remediation.rule.step]]
      kind = "exec"                      # validation gate: runs when the host's alerts resolved
      when = "resolved"
      argv = ["dcgmi", "diag", "-r", "2"]
      timeout = "15m"
      [[remediation.rule.step]]
      kind = "slurm_resume"

Steps run in order; those with ``when = "resolved"`` (``slurm_resume``'s default) wait until
the host has no pending or firing alert and must come after the others. See
docs/remediation.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from collector.alerts.config import Matcher, parse_matcher
from shared.config import Secret, parse_duration, resolve_secret
from shared.errors import ConfigError

MODES: Final = ("dry_run", "approve", "auto")
KINDS: Final = ("slurm_drain", "slurm_resume", "exec", "webhook")
WHEN: Final = ("firing", "resolved")


@dataclass(frozen=True, slots=True)
class Step:
    kind: str  # one of KINDS
    when: str = "firing"  # firing: when the action starts; resolved: once the host is clear
    argv: tuple[str, ...] = ()  # exec: the argument list, each a template ({host}, {node}, ...)
    timeout: float = 60.0  # exec, webhook
    url: str = ""  # webhook
    secret: Secret | None = None  # webhook: HMAC-SHA256 key, signed like the notification webhook

    def describe(self) -> str:
        if self.kind == "exec":
            return "exec " + " ".join(self.argv)
        if self.kind == "webhook":
            return f"webhook {self.url}"
        return self.kind


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: tuple[Matcher, ...]
    mode: str = "dry_run"
    steps: tuple[Step, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.match)


@dataclass(frozen=True, slots=True)
class Breaker:
    max_share: float = 0.10
    max_hosts: int = 20
    window: float = 3600.0

    def limit(self, provider_hosts: int) -> int:
        """How many of a provider's hosts may be under action within the window (at least 1)."""
        return max(1, min(self.max_hosts, int(self.max_share * provider_hosts + 1e-9)))


@dataclass(frozen=True, slots=True)
class Slurm:
    scontrol: str = "scontrol"
    conf: str = ""
    node: str = "{host}"
    nodes: Mapping[str, str] = field(default_factory=dict)

    def node_of(self, host: str, labels: Mapping[str, str]) -> str:
        if host in self.nodes:
            return self.nodes[host]
        return render(self.node, {**labels, "host": host})


@dataclass(frozen=True, slots=True)
class RemediationConfig:
    rules: tuple[Rule, ...] = ()
    max_running: int = 4
    cooldown: float = 3600.0
    exclude_hosts: tuple[str, ...] = ()
    exclude: tuple[Matcher, ...] = ()
    breaker: Breaker = Breaker()
    slurm: Slurm = Slurm()

    def excluded(self, host: str, labels: Mapping[str, str]) -> str | None:
        """Why ``host`` is excluded (the pattern), or ``None``."""
        for p in self.exclude_hosts:
            if re.fullmatch(p, host):
                return f"host matches exclusion {p!r}"
        for m in self.exclude:
            if m.matches(labels):
                return f"labels match exclusion {m.name}{m.op}{m.value}"
        return None


_FIELD: Final = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def render(template: str, values: Mapping[str, str]) -> str:
    """``{name}`` replaced by ``values[name]`` (an unknown name stays as written); no other
    formatting, so a value cannot inject anything (exec takes an argument list, no shell)."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _table(v: object, key: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ConfigError(key, "expected a table")
    return v


def _only(t: Mapping[str, Any], allowed: set[str], key: str) -> None:
    extra = sorted(set(t) - allowed)
    if extra:
        raise ConfigError(f"{key}.{extra[0]}", f"unknown key (expected one of {', '.join(sorted(allowed))})")


def _strs(v: object, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(key, "expected a list of strings")
    return tuple(v)


def _step(t: Mapping[str, Any], key: str, env: Mapping[str, str] | None) -> Step:
    _only(t, {"kind", "when", "argv", "timeout", "url", "secret"}, key)
    kind = t.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    when = t.get("when", "resolved" if kind == "slurm_resume" else "firing")
    if when not in WHEN:
        raise ConfigError(f"{key}.when", f"expected firing or resolved, got {when!r}")
    if kind == "slurm_drain" and when != "firing":
        raise ConfigError(f"{key}.when", "slurm_drain runs when the action starts (firing)")
    if kind == "slurm_resume" and when != "resolved":
        raise ConfigError(f"{key}.when", "slurm_resume runs once the host's alerts resolved")
    argv: tuple[str, ...] = ()
    if kind == "exec":
        argv = _strs(t.get("argv"), f"{key}.argv")
        if not argv:
            raise ConfigError(f"{key}.argv", "expected a non-empty argument list")
    url, secret = "", None
    if kind == "webhook":
        url = t.get("url", "")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.url", "expected an http(s) URL")
        if t.get("secret") is not None:
            if not isinstance(t["secret"], str):
                raise ConfigError(f"{key}.secret", "expected a string (inline, env:NAME or file:/path)")
            secret = resolve_secret(t["secret"], f"{key}.secret", env)
    timeout = parse_duration(t.get("timeout", "60s"), f"{key}.timeout")
    if timeout <= 0:
        raise ConfigError(f"{key}.timeout", "must be positive")
    return Step(kind, when, argv, timeout, url, secret)


def _rule(t: Mapping[str, Any], key: str, env: Mapping[str, str] | None) -> Rule:
    _only(t, {"name", "match", "mode", "step"}, key)
    name = t.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"{key}.name", "expected a name of letters, digits, '_', '.', '-' (at most 64)")
    match = tuple(parse_matcher(m, f"{key}.match") for m in _strs(t.get("match", []), f"{key}.match"))
    mode = t.get("mode", "dry_run")
    if mode not in MODES:
        raise ConfigError(f"{key}.mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
    raw_steps = t.get("step", [])
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{key}.step", "expected at least one [[remediation.rule.step]]")
    steps = tuple(
        _step(_table(s, f"{key}.step[{i}]"), f"{key}.step[{i}]", env) for i, s in enumerate(raw_steps)
    )
    seen_resolved = False
    for i, s in enumerate(steps):
        if s.when == "resolved":
            seen_resolved = True
        elif seen_resolved:
            raise ConfigError(
                f"{key}.step[{i}]", "steps run when firing must come before those run when resolved"
            )
    return Rule(name, match, mode, steps)


def remediation_config_from(
    raw: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> RemediationConfig:
    """Build :class:`RemediationConfig` from ``raw["remediation"]`` (absent: no rules)."""
    r = raw.get("remediation")
    if r is None:
        return RemediationConfig()
    r = _table(r, "remediation")
    _only(
        r, {"rule", "max_running", "cooldown", "exclude_hosts", "exclude", "breaker", "slurm"}, "remediation"
    )
    rules_raw = r.get("rule", [])
    if not isinstance(rules_raw, list):
        raise ConfigError("remediation.rule", "expected [[remediation.rule]] tables")
    rules = tuple(
        _rule(_table(x, f"remediation.rule[{i}]"), f"remediation.rule[{i}]", env)
        for i, x in enumerate(rules_raw)
    )
    names = [x.name for x in rules]
    if len(set(names)) != len(names):
        raise ConfigError("remediation.rule", "rule names must be unique")
    max_running = r.get("max_running", 4)
    if not isinstance(max_running, int) or isinstance(max_running, bool) or max_running < 1:
        raise ConfigError("remediation.max_running", "expected a positive integer")
    cooldown = parse_duration(r.get("cooldown", "1h"), "remediation.cooldown")
    exclude_hosts = _strs(r.get("exclude_hosts", []), "remediation.exclude_hosts")
    for p in exclude_hosts:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError("remediation.exclude_hosts", f"bad regular expression {p!r}: {e}") from e
    exclude = tuple(
        parse_matcher(m, "remediation.exclude") for m in _strs(r.get("exclude", []), "remediation.exclude")
    )
    b = _table(r.get("breaker", {}), "remediation.breaker")
    _only(b, {"max_share", "max_hosts", "window"}, "remediation.breaker")
    share = b.get("max_share", 0.10)
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
        raise ConfigError("remediation.breaker.max_share", "expected a share in (0, 1]")
    hosts = b.get("max_hosts", 20)
    if not isinstance(hosts, int) or isinstance(hosts, bool) or hosts < 1:
        raise ConfigError("remediation.breaker.max_hosts", "expected a positive integer")
    breaker = Breaker(
        float(share), hosts, parse_duration(b.get("window", "1h"), "remediation.breaker.window")
    )
    s = _table(r.get("slurm", {}), "remediation.slurm")
    _only(s, {"scontrol", "conf", "node", "nodes"}, "remediation.slurm")
    nodes = _table(s.get("nodes", {}), "remediation.slurm.nodes")
    if not all(isinstance(v, str) for v in nodes.values()):
        raise ConfigError("remediation.slurm.nodes", "expected host = node name strings")
    for k in ("scontrol", "conf", "node"):
        if not isinstance(s.get(k, ""), str):
            raise ConfigError(f"remediation.slurm.{k}", "expected a string")
    slurm = Slurm(s.get("scontrol", "scontrol"), s.get("conf", ""), s.get("node", "{host}"), dict(nodes))
    return RemediationConfig(rules, max_running, cooldown, exclude_hosts, exclude, breaker, slurm)


def rules_of(cfg: RemediationConfig) -> Sequence[str]:
    return [r.name for r in cfg.rules]
