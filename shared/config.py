"""Configuration loading: TOML file, ``GPUWARDEN_*`` environment, flags.

Precedence: flag > environment > file > default. Every section is a frozen dataclass; every
key of section ``a.b`` is also read from ``GPUWARDEN_A_B_<KEY>``. Values are validated at
load; a bad one raises :class:`~shared.errors.ConfigError` naming the key.

Durations are strings such as ``"500ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"14d"`` (or a
number of seconds). Secrets may be given inline, as ``env:NAME`` or as ``file:/path``; they
load as :class:`Secret`, which never shows its value in ``repr``/``str`` (so never in logs).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar, Union, get_args, get_origin

from shared.errors import ConfigError

ENV_PREFIX: Final = "GPUWARDEN_"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})


def parse_duration(value: object, key: str = "duration") -> float:
    """Seconds in ``value`` (``"5s"``, ``"2m"``, ``"500ms"``, ``"1h"``, ``"14d"`` or a number)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like '5s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(key, f"expected a duration like '5s', '2m' or '500ms', got {value!r}")
    if seconds < 0:
        raise ConfigError(key, f"duration must not be negative, got {value!r}")
    return seconds


def parse_bool(value: object, key: str = "value") -> bool:
    """The one reading of a boolean: ``True``/``False``, or (from the environment, a flag or a
    query string) ``1/0``, ``true/false``, ``yes/no``, ``on/off`` in any case. Raises
    :class:`ConfigError` naming ``key`` for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ConfigError(key, f"expected true or false, got {value!r}")


class Secret:
    """A secret value (password, token, seed) that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def resolve_secret(value: str, key: str, env: Mapping[str, str] | None = None) -> Secret:
    """Resolve ``env:NAME``, ``file:/path`` or an inline value into a :class:`Secret`."""
    env = os.environ if env is None else env
    if value.startswith("env:"):
        name = value[4:]
        if name not in env:
            raise ConfigError(key, f"environment variable {name} is not set")
        return Secret(env[name])
    if value.startswith("file:"):
        path = Path(value[5:])
        try:
            return Secret(path.read_text(encoding="utf-8").strip())
        except OSError as e:
            raise ConfigError(key, f"cannot read secret file {path}: {e.strerror}") from e
    return Secret(value)


def dur(default: float | str) -> Any:
    """A dataclass field holding a duration in seconds (accepts ``"5s"`` etc. when loading)."""
    seconds = parse_duration(default) if isinstance(default, str) else float(default)
    return field(default=seconds, metadata={"duration": True})


def num(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """A numeric field with an inclusive range checked when loading."""
    return field(default=default, metadata={"range": (lo, hi)})


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """``[nats]``: how to reach NATS, shared by agent and collector."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str | None = None  # client connection name; defaults to the service and host
    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    creds: str | None = None  # path to a .creds file (JWT + nkey)
    nkey_seed: Secret | None = None  # an nkey seed; "file:/etc/gpuwarden/agent.nk"
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_hostname: str | None = None
    connect_timeout: float = dur("5s")
    reconnect_wait: float = dur("1s")  # base of the jittered reconnect backoff
    reconnect_wait_max: float = dur("30s")
    buffer_frames: int = num(20_000, 0, 10_000_000)  # frames kept while NATS is unreachable
    # ... and at most this many bytes of frames: below the agent unit's MemoryHigh=192M with
    # the agent's own ~60 MB (docs/configuration.md explains the default).
    buffer_bytes: int = num(64 << 20, 1 << 20, 1 << 40)
    publish_timeout: float = dur("5s")
    create_stream: bool = True  # create or verify the GPUWARDEN stream if allowed
    stream_replicas: int = num(1, 1, 5)
    stream_max_age: float = dur("7d")
    stream_max_bytes: int = num(0, -1, None)  # 0: sized from stream_hosts (shared.natsconf), -1: none
    stream_hosts: int = num(100, 1, 10_000_000)  # the fleet size the automatic stream size is for
    dedup_window: float = dur("2m")


@dataclass(frozen=True, slots=True)
class AgentSection:
    """``[agent]``."""

    host: str = field(default_factory=socket.gethostname)
    provider: str = "default"
    interval: float = dur("5s")
    backend: str = "auto"  # "auto", "nvml" or "simulated"
    poll: bool = True  # answer gpuwarden.v1.poll.<host>
    kmsg: bool = True  # read NVRM Xid lines from the kernel log
    kmsg_path: str = "/dev/kmsg"
    nvml_events: bool = True  # listen on the NVML event set (XID, ECC, recovery action)
    processes: bool = True  # per-process attribution
    proc_root: str = "/proc"


@dataclass(frozen=True, slots=True)
class NetworkChecksConfig:
    """``[checks.network]``."""

    targets: tuple[str, ...] = ()  # "host:port" TCP connect checks
    timeout: float = dur("2s")
    nats_rtt: bool = True


@dataclass(frozen=True, slots=True)
class SimulateConfig:
    """``[simulate]``: simulated GPUs (tests, demo and load only)."""

    gpus: int = num(0, 0, 64)  # 0: use real GPUs
    faults: tuple[str, ...] = ()
    seed: int = 0
    model: str = "NVIDIA H100 80GB HBM3"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """``[node]``: the node beyond its GPUs: InfiniBand, kernel modules, services, clock, D state."""

    sys_root: str = "/sys"  # InfiniBand ports are read under <sys_root>/class/infiniband
    ib: bool = True
    modules: tuple[str, ...] = ("nvidia", "nvidia_uvm")  # expected kernel modules
    peermem_with_ib: bool = True  # also expect nvidia_peermem where InfiniBand ports exist
    services: tuple[str, ...] = ("nvidia-persistenced",)  # expected systemd services
    fabricmanager: bool = True  # also expect nvidia-fabricmanager where NVSwitches exist
    services_every: float = dur("30s")  # systemctl is asked this often (0: never)
    clock: bool = True  # read the kernel clock's synchronisation (adjtimex)
    dstate_every: float = dur("30s")  # scan /proc for D-state processes this often (0: never)
    mounts: tuple[str, ...] = ()  # paths whose mounts are reported even when network file systems


AGENT_SCHEMA: Final[dict[str, type[Any]]] = {
    "agent": AgentSection,
    "nats": NatsConfig,
    "checks.network": NetworkChecksConfig,
    "simulate": SimulateConfig,
    "node": NodeConfig,
}


@dataclass(frozen=True, slots=True)
class AgentConfig:
    agent: AgentSection
    nats: NatsConfig
    network: NetworkChecksConfig
    simulate: SimulateConfig
    node: NodeConfig = field(default_factory=NodeConfig)


def load_agent_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Load the agent's configuration (see ``docs/configuration.md``)."""
    s = load_sections(AGENT_SCHEMA, path, env, flags)
    return AgentConfig(
        agent=s["agent"], nats=s["nats"], network=s["checks.network"], simulate=s["simulate"], node=s["node"]
    )


# ----------------------------------------------------------------------------- loader

T = TypeVar("T")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(str(path), "config file not found") from e
    except OSError as e:
        raise ConfigError(str(path), f"cannot read config file: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"invalid TOML: {e}") from e


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.replace('.', '_')}_{key}".upper()


def load_sections(
    schema: Mapping[str, type[Any]],
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    extra_sections: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Build every section of ``schema`` from file, env and flags (keys ``"section.key"``).

    Unknown sections and keys in the file are errors (they are usually typos), except the
    top-level sections named in ``extra_sections`` (kept raw under their name).
    """
    env = os.environ if env is None else env
    flags = flags or {}
    data = read_toml(path) if path is not None else {}
    out: dict[str, Any] = {}
    _reject_unknown(data, schema, extra_sections, str(path or "config"))
    for section, cls in schema.items():
        raw = dict(_dig(data, section))
        for f in dataclasses.fields(cls):
            name = env_name(section, f.name)
            if name in env:
                raw[f.name] = _EnvValue(env[name], name)
        for key, value in flags.items():
            sec, _, k = key.rpartition(".")
            if sec == section and value is not None:
                raw[k] = value
        out[section] = build_section(cls, raw, section, env)
    for name in extra_sections:
        out[name] = data.get(name)
    return out


class _EnvValue(str):
    """A value that came from the environment (a string to parse), and its variable's name."""

    env: str

    def __new__(cls, value: str, env: str) -> _EnvValue:
        obj = super().__new__(cls, value)
        obj.env = env
        return obj


def _dig(data: Mapping[str, Any], section: str) -> Mapping[str, Any]:
    node: Any = data
    for part in section.split("."):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    if not isinstance(node, Mapping):
        raise ConfigError(section, "expected a table")
    return {k: v for k, v in node.items() if not isinstance(v, Mapping)}


def _reject_unknown(
    data: Mapping[str, Any], schema: Mapping[str, type[Any]], extra: frozenset[str], source: str
) -> None:
    known_sections = set(schema)
    prefixes = {s.split(".")[0] for s in schema} | {
        ".".join(s.split(".")[:i]) for s in schema for i in range(1, s.count(".") + 1)
    }

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            full = f"{prefix}.{k}" if prefix else k
            if not prefix and k in extra:
                continue
            if isinstance(v, Mapping) and (full in known_sections or full in prefixes):
                walk(v, full)
            elif prefix in known_sections:
                keys = {f.name for f in dataclasses.fields(schema[prefix])}
                if k not in keys:
                    raise ConfigError(f"{full}", f"unknown key in {source}")
            else:
                raise ConfigError(full, f"unknown section or key in {source}")

    walk(data, "")


def build_section(cls: type[T], raw: Mapping[str, Any], section: str, env: Mapping[str, str]) -> T:
    """Build one section dataclass from raw values, coercing and validating each."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in raw:
            continue
        value = raw[f.name]
        key = value.env if isinstance(value, _EnvValue) else f"{section}.{f.name}"
        kwargs[f.name] = coerce(value, hints[f.name], f.metadata, key, env)
    return cls(**kwargs)


def coerce(value: Any, hint: Any, meta: Mapping[str, Any], key: str, env: Mapping[str, str]) -> Any:
    """Turn one raw value (TOML value, env string or flag) into ``hint``'s type."""
    from_env = isinstance(value, _EnvValue)
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None or (from_env and value == ""):
            return None
        hint, origin = args[0], get_origin(args[0])
    if meta.get("duration"):
        return parse_duration(str(value) if from_env else value, key)
    if hint is Secret:
        if isinstance(value, Secret):
            return value
        if not isinstance(value, str):
            raise ConfigError(key, "expected a string ('env:NAME', 'file:/path' or the value)")
        return resolve_secret(str(value), key, env)
    if origin is tuple:
        if from_env:
            items: list[Any] = [s.strip() for s in value.split(",") if s.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ConfigError(key, f"expected a list, got {type(value).__name__}")
        if not all(isinstance(i, str) for i in items):
            raise ConfigError(key, "expected a list of strings")
        return tuple(items)
    if hint is bool:
        return parse_bool(str(value) if from_env else value, key)
    if hint in (int, float):
        return _coerce_number(value, hint, meta, key, from_env)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__}")
        return str(value)
    raise ConfigError(key, f"unsupported setting type {hint!r}")


def _coerce_number(value: Any, hint: type, meta: Mapping[str, Any], key: str, from_env: bool) -> Any:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a number, got {value!r}")
    try:
        if isinstance(value, str):
            number: Any = hint(value.strip())
        elif hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        else:
            number = hint(value)
    except (TypeError, ValueError) as e:
        kind = "an integer" if hint is int else "a number"
        raise ConfigError(key, f"expected {kind}, got {value!r}") from e
    if number != number:  # NaN
        raise ConfigError(key, "expected a number, got NaN")
    lo, hi = meta.get("range", (None, None))
    if lo is not None and number < lo:
        raise ConfigError(key, f"must be at least {lo}, got {number}")
    if hi is not None and number > hi:
        raise ConfigError(key, f"must be at most {hi}, got {number}")
    return number
