"""The collector's configuration (``collector.toml``), built once: file, then env, then flags.

The section shape is the contract in docs/configuration.md. ``[health]``, ``[alerts]``, ``[notify]``,
``[escalation]``, ``[silence]``, ``[maintenance]`` and ``[remediation]`` belong to the
health/alert engine (and remediation): those present in the file are kept raw
(``CollectorConfig.raw``, top-level name to table or array of tables) for that engine to
build (``health_config_from``, ``alert_config_from``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from shared.config import NatsConfig, Secret, dur, load_sections, num, resolve_secret
from shared.errors import ConfigError

DEFAULT_DSN: Final = "postgresql://gpuwarden@127.0.0.1/gpuwarden"
DEFAULT_DURABLE: Final = "gpuwarden-collector"


def group_kv_of(durable: str) -> str:
    """The group's KV bucket when ``[collector] group_kv`` is unset: one per ``durable``."""
    return f"{durable}-group"


DEFAULT_GROUP_KV: Final = group_kv_of(DEFAULT_DURABLE)
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a JetStream consumer's and a KV bucket's name, a subject token
SSLMODES: Final = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
RAW_SECTIONS: Final = frozenset(
    {"health", "alerts", "notify", "escalation", "silence", "maintenance", "remediation"}
)


@dataclass(frozen=True, slots=True)
class CollectorSection:
    """``[collector]``: the process, its partition of the hosts and the ingest tuning."""

    listen: str = "0.0.0.0:8080"
    partitions: int = num(1, 1, 4096)
    partition: int = num(0, 0, 4095)
    durable: str = DEFAULT_DURABLE  # consumer name prefix; the bucket (or partition) is appended
    batch: int = num(1000, 1, 10_000)  # messages fetched (and committed) at once
    fetch_timeout: float = dur("1s")
    linger: float = dur("100ms")  # a batch that is not full waits this long for more (0: not at all)
    ack_wait: float = dur("60s")
    max_ack_pending: int = num(20_000, 1, 1_000_000)
    max_deliver: int = num(5, 2, 10_000)  # the last delivery is recorded as poison and terminated
    max_frame_bytes: int = num(1 << 20, 1024, 64 << 20)
    host_rate: float = num(20.0, 0, 1e6)  # frames/s one host may send (0: no limit); excess refused
    host_burst: int = num(25_000, 1, 10_000_000)  # at once: holds an agent's replay after an outage
    shutdown_timeout: float = dur("20s")
    # a collector group (docs/operations.md): members share the hosts by leases in NATS.
    # Unset: a group unless the static partitions are asked for (partitions > 1).
    group: bool | None = None
    buckets: int = num(64, 1, 1024)  # host buckets leased to members (fixed for a group)
    lease: float = dur("8s")  # a dead member's buckets are taken over after about this long
    group_kv: str = ""  # the JetStream key-value bucket of members and leases (unset: <durable>-group)
    member: str = ""  # this member's name in the group (default: host name and process id)
    group_refresh: float = dur("10s")  # every member's whole summary, for the others' fleet view

    def __post_init__(self) -> None:
        # the defaults that depend on other keys: a group unless partitions > 1; one group per
        # durable (collectors with distinct consumers on one stream never join each other's group)
        if self.group is None:
            object.__setattr__(self, "group", self.partitions == 1)
        if not self.group_kv:
            object.__setattr__(self, "group_kv", group_kv_of(self.durable))


@dataclass(frozen=True, slots=True)
class PostgresSection:
    """``[postgres]``: connection, pool, TLS, retention and partitioning."""

    dsn: Secret = field(default_factory=lambda: Secret(DEFAULT_DSN))
    pool_min: int = num(1, 0, 100)
    pool_max: int = num(4, 1, 200)
    connect_timeout: float = dur("10s")
    sslmode: str | None = None  # disable, allow, prefer, require, verify-ca, verify-full
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    retention_days: int = num(14, 1, 3650)
    rollup_retention_days: int = num(180, 1, 36500)
    partitions_ahead: int = num(3, 1, 60)  # daily sample partitions created ahead of today
    maintenance_interval: float = dur("1h")  # partition creation and retention


@dataclass(frozen=True, slots=True)
class ApiSection:
    """``[api]``: who may write and read (docs/api.md), and what API reads may cost PostgreSQL.

    Tokens are secrets (inline, ``env:NAME`` or ``file:/path``). ``tokens`` entries are named
    ``token-N`` in the audit trail; ``named_tokens`` entries are ``NAME=SECRET`` and are named
    ``NAME``. With ``read_tokens`` set, reads (API and stream) need a read or a write token.
    """

    tokens: tuple[str, ...] = ()
    named_tokens: tuple[str, ...] = ()
    read_tokens: tuple[str, ...] = ()
    allow_anonymous_writes: bool = False
    allowed_origins: tuple[str, ...] = ()  # besides the page's own origin (scheme://host[:port])
    db_pool_max: int = num(5, 2, 100)  # connections of the API's own read pool
    statement_timeout: float = dur("10s")  # each API query is cancelled after this long
    max_heavy_queries: int = num(4, 1, 99)  # concurrent history queries; beyond: 503 + Retry-After


@dataclass(frozen=True, slots=True)
class InventorySection:
    """``[inventory]``: the expected inventory (a JSON file or an HTTP(S) URL)."""

    source: str | None = None
    refresh: float = dur("5m")
    timeout: float = dur("10s")


@dataclass(frozen=True, slots=True)
class AlertingSection:
    """``[alerting]``: how the collector runs the health and alert engines (docs/alerts.md)."""

    tick: float = dur("1s")  # timer for staleness, `for`, escalation, repeats, silence expiry
    health_snapshot: float = dur("30s")  # health state saved to PostgreSQL this often (and at stop)
    alertmanager_resend: float = dur("1m")  # firing alerts pushed again to Alertmanager
    shutdown_delivery: float = dur("5s")  # at stop, wait this long for queued notifications
    fast_events: bool = True  # judge event frames on arrival (core NATS), before they are stored
    persist_timeout: float = dur("5s")  # one write of alert state; beyond it PostgreSQL counts as down
    spool: str | None = None  # a directory: durable record of pages sent while PostgreSQL is down


@dataclass(frozen=True, slots=True)
class SelfCheckSection:
    """``[selfcheck]``: the collector watches itself (docs/alerts.md, "The collector's own health")."""

    grace: float = dur("5s")  # a condition of its own lasts this long before it alerts
    ingest_lag: float = dur("30s")  # frames waiting longer than this for their commit: impaired
    notify_backlog: int = num(100, 1, 10_000_000)  # notifications waiting beyond this: a problem
    channel_window: float = dur("5m")  # a channel that dead-lettered within this (no success since)
    heartbeat_url: Secret | None = None  # dead man's switch: POSTed after alerting ticks (a secret)
    heartbeat_interval: float = dur("30s")
    heartbeat_timeout: float = dur("10s")


COLLECTOR_SCHEMA: Final[dict[str, type[Any]]] = {
    "collector": CollectorSection,
    "nats": NatsConfig,
    "postgres": PostgresSection,
    "api": ApiSection,
    "inventory": InventorySection,
    "alerting": AlertingSection,
    "selfcheck": SelfCheckSection,
}


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One configured bearer token: its audit name, its secret, and whether it may write."""

    name: str
    secret: Secret
    write: bool = True


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    collector: CollectorSection
    nats: NatsConfig
    postgres: PostgresSection
    api: ApiSection
    inventory: InventorySection
    alerting: AlertingSection = field(default_factory=AlertingSection)
    selfcheck: SelfCheckSection = field(default_factory=SelfCheckSection)
    api_tokens: tuple[ApiToken, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)  # RAW_SECTIONS present in the file


def load_collector_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> CollectorConfig:
    """Load ``collector.toml`` (see ``docs/configuration.md``); raises :class:`ConfigError`.

    ``flags`` keys are ``"section.key"`` (e.g. ``"postgres.dsn"``); ``None`` values are unset.
    """
    raw_names = frozenset(RAW_SECTIONS)
    s = load_sections(COLLECTOR_SCHEMA, path, env, flags, extra_sections=raw_names)
    c: CollectorSection = s["collector"]
    pg: PostgresSection = s["postgres"]
    if c.group and c.partitions > 1:
        raise ConfigError(
            "collector.group", "a group shares the hosts by leases: leave partitions at 1 (static override)"
        )
    if not _NAME.match(c.durable):
        raise ConfigError("collector.durable", f"expected letters, digits, '-' and '_', got {c.durable!r}")
    if c.group and not _NAME.match(c.group_kv):
        raise ConfigError("collector.group_kv", f"expected letters, digits, '-' and '_', got {c.group_kv!r}")
    if c.group and c.lease < 2.0:
        raise ConfigError("collector.lease", f"must be at least 2s, got {c.lease}s")
    if c.group and c.group_refresh < 1.0:
        raise ConfigError("collector.group_refresh", f"must be at least 1s, got {c.group_refresh}s")
    if c.partition >= c.partitions:
        raise ConfigError(
            "collector.partition", f"must be below partitions ({c.partitions}), got {c.partition}"
        )
    if pg.sslmode is not None and pg.sslmode not in SSLMODES:
        raise ConfigError("postgres.sslmode", f"expected one of {sorted(SSLMODES)}, got {pg.sslmode!r}")
    if pg.pool_min > pg.pool_max:
        raise ConfigError("postgres.pool_min", "must not exceed postgres.pool_max")
    if pg.rollup_retention_days < pg.retention_days:
        raise ConfigError("postgres.rollup_retention_days", "must be at least postgres.retention_days")
    _check_listen(c.listen)
    api: ApiSection = s["api"]
    if api.max_heavy_queries >= api.db_pool_max:
        raise ConfigError(
            "api.max_heavy_queries",
            f"must be below api.db_pool_max ({api.db_pool_max}), so light reads always find a connection",
        )
    tokens = api_tokens(s["api"], env)
    hb: SelfCheckSection = s["selfcheck"]
    if hb.heartbeat_url is not None and not re.match(r"https?://[^/\s]", hb.heartbeat_url.reveal()):
        raise ConfigError("selfcheck.heartbeat_url", "expected an http:// or https:// URL")  # not echoed
    return CollectorConfig(
        collector=c,
        nats=s["nats"],
        postgres=pg,
        api=s["api"],
        inventory=s["inventory"],
        alerting=s["alerting"],
        selfcheck=s["selfcheck"],
        api_tokens=tokens,
        raw={name: s[name] for name in raw_names if s[name] is not None},
    )


TOKEN_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}")
ORIGIN: Final = re.compile(r"https?://[^/?#\s@]+")


def api_tokens(api: ApiSection, env: Mapping[str, str] | None = None) -> tuple[ApiToken, ...]:
    """The bearer tokens of ``[api]``, resolved, each with its audit name (unique)."""
    out: list[ApiToken] = []
    for i, t in enumerate(api.tokens):
        out.append(ApiToken(f"token-{i}", resolve_secret(t, "api.tokens", env)))
    for t in api.named_tokens:
        name, sep, spec = t.partition("=")
        if not sep or not TOKEN_NAME.fullmatch(name) or not spec:
            raise ConfigError(
                "api.named_tokens", "each entry is NAME=SECRET (NAME: letters, digits, _ . @ + -)"
            )
        out.append(ApiToken(name, resolve_secret(spec, "api.named_tokens", env)))
    for i, t in enumerate(api.read_tokens):
        out.append(ApiToken(f"read-token-{i}", resolve_secret(t, "api.read_tokens", env), write=False))
    names = [tok.name for tok in out]
    for tok in out:
        if names.count(tok.name) > 1:
            raise ConfigError("api.named_tokens", f"token name {tok.name!r} is used twice")
        if not tok.secret.reveal():
            raise ConfigError("api.tokens", f"token {tok.name!r} is empty")
    for o in api.allowed_origins:
        if not ORIGIN.fullmatch(o):
            raise ConfigError("api.allowed_origins", f"expected scheme://host[:port], got {o!r}")
    return tuple(out)


def _check_listen(listen: str) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError("collector.listen", f"expected HOST:PORT, got {listen!r}")
