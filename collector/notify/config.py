"""``[notify.*]`` channel configuration and the default escalation policy.

::

    [notify]
    external_url = "http://collector:8080"   # links in payloads (generatorURL)
    [notify.log]
    enabled = true
    [notify.nats]
    enabled = true                            # every transition and notification, JSON
    [[notify.webhook]]
    name = "oncall"
    url = "https://hooks.example/gpu"
    secret = "env:ONCALL_HMAC"                # HMAC-SHA256 key (or file:/path, or inline)
    timeout = "5s"
    retries = 3
    backoff = "500ms"
    send_resolved = true
    [[notify.alertmanager]]
    name = "am"
    url = "http://alertmanager:9093"
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from yarl import URL

from collector.alerts.config import AlertConfig, Level, Policy
from shared.config import Secret, env_name, parse_bool, parse_duration, resolve_secret
from shared.errors import ConfigError
from shared.redact import redact

LOG: Final = "log"
NATS: Final = "nats"
RESERVED: Final = frozenset({LOG, NATS})


@dataclass(frozen=True, slots=True)
class HttpChannelConfig:
    """What every HTTP channel (webhook, Alertmanager) is configured with."""

    name: str
    url: str
    timeout: float = 5.0
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    send_resolved: bool = True


@dataclass(frozen=True, slots=True)
class WebhookConfig(HttpChannelConfig):
    secret: Secret | None = None


@dataclass(frozen=True, slots=True)
class AlertmanagerConfig(HttpChannelConfig):
    """An Alertmanager v2 endpoint (nothing beyond the common settings)."""


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    log: bool = True
    nats: bool = True
    external_url: str = ""
    webhooks: tuple[WebhookConfig, ...] = ()
    alertmanagers: tuple[AlertmanagerConfig, ...] = ()

    def names(self) -> tuple[str, ...]:
        out = [LOG] if self.log else []
        if self.nats:
            out.append(NATS)
        out += [w.name for w in self.webhooks] + [a.name for a in self.alertmanagers]
        return tuple(out)


def _table(raw: Mapping[str, Any], name: str, key: str) -> Mapping[str, Any]:
    t = raw.get(name, {})
    if not isinstance(t, Mapping):
        raise ConfigError(key, "expected a table")
    return t


def _only(t: Mapping[str, Any], allowed: set[str], key: str) -> None:
    for k in t:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}", "unknown key")


def _bool(t: Mapping[str, Any], name: str, default: bool, key: str) -> bool:
    return parse_bool(t.get(name, default), f"{key}.{name}")


def _int(t: Mapping[str, Any], name: str, default: int, lo: int, hi: int, key: str) -> int:
    v = t.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{key}.{name}", f"expected an integer {lo}..{hi}, got {v!r}")
    return v


# redact (shared.redact): receiver URLs may carry credentials; logs and error rows must not.


def _url(t: Mapping[str, Any], key: str) -> str:
    url = t.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        shown = redact(url) if isinstance(url, str) else url
        raise ConfigError(f"{key}.url", f"expected an http(s) URL, got {shown!r}")
    try:
        parsed = URL(url)
        ok = bool(parsed.host) and parsed.port is not None
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{key}.url", f"not a valid URL: {redact(url)!r}")
    return url.rstrip("/") if key.startswith("notify.alertmanager") else url


def _common(t: Mapping[str, Any], key: str, seen: set[str]) -> dict[str, Any]:
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}.name", "a channel needs a name")
    if name in seen or name in RESERVED:
        raise ConfigError(f"{key}.name", f"channel name {name!r} is already used")
    seen.add(name)
    return {
        "name": name,
        "url": _url(t, key),
        "timeout": parse_duration(t.get("timeout", "5s"), f"{key}.timeout"),
        "retries": _int(t, "retries", 3, 0, 100, key),
        "backoff": parse_duration(t.get("backoff", "500ms"), f"{key}.backoff"),
        "max_backoff": parse_duration(t.get("max_backoff", "30s"), f"{key}.max_backoff"),
        "send_resolved": _bool(t, "send_resolved", True, key),
    }


def _array(raw: Mapping[str, Any], name: str, key: str) -> list[Mapping[str, Any]]:
    items = raw.get(name, [])
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise ConfigError(key, "expected an array of tables")
    return items


def notify_config_from(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> NotifyConfig:
    """Build :class:`NotifyConfig` from ``raw["notify"]``; raises :class:`ConfigError` naming the key."""
    env = os.environ if env is None else env
    notify = raw.get("notify") or {}
    if not isinstance(notify, Mapping):
        raise ConfigError("notify", "expected a table")
    notify = dict(notify)
    for sub in ("log", "nats"):  # GPUWARDEN_NOTIFY_LOG_ENABLED, GPUWARDEN_NOTIFY_NATS_ENABLED
        var = env_name(f"notify.{sub}", "enabled")
        if var in env:
            notify[sub] = {**_table(notify, sub, f"notify.{sub}"), "enabled": env[var]}
    if env_name("notify", "external_url") in env:
        notify["external_url"] = env[env_name("notify", "external_url")]
    _only(notify, {"log", "nats", "webhook", "alertmanager", "external_url"}, "notify")
    log_t = _table(notify, "log", "notify.log")
    nats_t = _table(notify, "nats", "notify.nats")
    _only(log_t, {"enabled"}, "notify.log")
    _only(nats_t, {"enabled"}, "notify.nats")
    external = notify.get("external_url", "")
    if not isinstance(external, str):
        raise ConfigError("notify.external_url", "expected a URL string")
    seen: set[str] = set()
    hooks = []
    allowed = {"name", "url", "secret", "timeout", "retries", "backoff", "max_backoff", "send_resolved"}
    for i, t in enumerate(_array(notify, "webhook", "notify.webhook")):
        key = f"notify.webhook[{i}]"
        _only(t, allowed, key)
        c = _common(t, key, seen)
        secret = t.get("secret")
        if secret is not None and not isinstance(secret, str):
            raise ConfigError(f"{key}.secret", "expected a string (inline, env:NAME or file:/path)")
        sec = resolve_secret(secret, f"{key}.secret", env) if secret else None
        hooks.append(WebhookConfig(secret=sec, **c))
    ams = []
    for i, t in enumerate(_array(notify, "alertmanager", "notify.alertmanager")):
        key = f"notify.alertmanager[{i}]"
        _only(t, allowed - {"secret"}, key)
        ams.append(AlertmanagerConfig(**_common(t, key, seen)))
    return NotifyConfig(
        log=_bool(log_t, "enabled", True, "notify.log"),
        nats=_bool(nats_t, "enabled", True, "notify.nats"),
        external_url=external.rstrip("/"),
        webhooks=tuple(hooks),
        alertmanagers=tuple(ams),
    )


def default_policy(notify: NotifyConfig) -> Policy:
    """With no ``[[escalation.policy]]``: every alert, at once, to every configured channel."""
    return Policy("default", (), (Level(0.0, notify.names()),), 0.0)


def with_channels(config: AlertConfig, notify: NotifyConfig) -> AlertConfig:
    """``config`` checked against the channels (naming the bad key), with the default policy
    added when none is configured."""
    names = set(notify.names())
    for i, p in enumerate(config.policies):
        for j, lv in enumerate(p.levels):
            for c in lv.notify:
                if c not in names:
                    raise ConfigError(
                        f"escalation.policy[{i}].levels[{j}].notify",
                        f"unknown channel {c!r} (configured: {', '.join(sorted(names)) or 'none'})",
                    )
    if config.policies or not names:
        return config
    return AlertConfig(
        config.alerts, config.for_rules, config.silences, (default_policy(notify),), config.inhibit
    )
