"""NATS connection options and the ``GPUWARDEN`` stream's settings from ``[nats]``.

One implementation for agent and collector. Returns plain keyword arguments: this module does
not import nats-py (``shared`` depends only on msgpack). Secrets are revealed only into the
returned options, never logged.

Stream size: ``stream_max_bytes = 0`` (the default) sizes the stream from the configuration,
:func:`stream_max_bytes`::

    min(stream_hosts x 10 KiB x stream_max_age / 5 s, 80 GiB), at least 64 MiB

10 KiB is an 8-GPU sample frame (the largest frame an agent sends every interval), 5 s the
agent's default interval, and 80 GiB is 80 % of the JetStream file store the ``nats`` role
gives the server (``nats_jetstream_max_file: 100G``): the stream discards its oldest frames
(``discard: old``) before the server's store is full, so publishing never fails for want of
space. A server whose store is smaller refuses such a stream ("insufficient storage
resources"): the size is then halved until the server accepts it (:func:`fit_max_bytes`), with
a warning naming the size used. The collector counts what the stream discarded before it was
consumed.

:func:`stream_drift` compares a stream's configuration with the wanted one: what NATS can
update in place and what it cannot, each with the ``nats stream edit`` command that applies it.
"""

from __future__ import annotations

import logging
import shlex
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from shared.config import NatsConfig
from shared.errors import ConfigError
from shared.subjects import STREAM, STREAM_SUBJECTS

log = logging.getLogger(__name__)
T = TypeVar("T")
# JetStream API error codes for "the server cannot reserve that much storage"
TOO_BIG_CODES: Final = frozenset({10023, 10047})
NAME_IN_USE_CODE: Final = 10058  # "stream name already in use with a different configuration"


def tls_context(cfg: NatsConfig) -> ssl.SSLContext | None:
    """An SSL context from ``tls_ca``/``tls_cert``/``tls_key`` (or for ``tls://`` servers), else None.

    Raises :class:`ConfigError` naming ``nats.tls_ca`` when the files cannot be loaded.
    """
    if not (cfg.tls_ca or cfg.tls_cert or any(s.startswith("tls://") for s in cfg.servers)):
        return None
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca)
        if cfg.tls_cert:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("nats.tls_ca", f"cannot load TLS files: {e}") from e
    return ctx


def connect_options(cfg: NatsConfig, name: str) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``: servers, auth, TLS, timeouts, reconnect forever.

    ``name`` is the connection name used when ``[nats] name`` is not set. Raises
    :class:`ConfigError` for unusable TLS files, or creds/nkeys without the ``nkeys`` package.
    """
    opts: dict[str, Any] = {
        "servers": list(cfg.servers),
        "name": cfg.name or name,
        "connect_timeout": cfg.connect_timeout,
        "reconnect_time_wait": cfg.reconnect_wait,
        "max_reconnect_attempts": -1,  # reconnect forever
        "allow_reconnect": True,
    }
    if cfg.user:
        opts["user"] = cfg.user
    if cfg.password is not None:
        opts["password"] = cfg.password.reveal()
    if cfg.token is not None:
        opts["token"] = cfg.token.reveal()
    if cfg.creds or cfg.nkey_seed is not None:
        try:
            import nkeys  # type: ignore[import-not-found, import-untyped, unused-ignore]  # noqa: F401
        except ImportError as e:
            raise ConfigError("nats.creds", "creds and nkey_seed need the 'nkeys' package") from e
    if cfg.creds:
        opts["user_credentials"] = cfg.creds
    if cfg.nkey_seed is not None:
        opts["nkeys_seed_str"] = cfg.nkey_seed.reveal()
    ctx = tls_context(cfg)
    if ctx is not None:
        opts["tls"] = ctx
        if cfg.tls_hostname:
            opts["tls_hostname"] = cfg.tls_hostname
    return opts


FRAME_BYTES: Final = 10 * 1024  # an 8-GPU sample frame (measured: about 9.5 KB)
FRAME_INTERVAL_S: Final = 5.0  # the agent's default interval
STORE_CAP_BYTES: Final = 80 << 30  # 80 % of the nats role's JetStream file store (100G)
MIN_STREAM_BYTES: Final = 64 << 20
_AGE_IF_UNLIMITED_S: Final = 7 * 86400.0


def stream_max_bytes(cfg: NatsConfig) -> int:
    """``stream_max_bytes``, or when it is 0 the size from the formula in the module doc (-1: none)."""
    if cfg.stream_max_bytes != 0:
        return cfg.stream_max_bytes
    age = cfg.stream_max_age if cfg.stream_max_age > 0 else _AGE_IF_UNLIMITED_S
    wanted = cfg.stream_hosts * FRAME_BYTES * (age / FRAME_INTERVAL_S)
    return int(max(MIN_STREAM_BYTES, min(wanted, STORE_CAP_BYTES)))


def stream_settings(cfg: NatsConfig) -> dict[str, Any]:
    """Keyword arguments for nats-py's ``StreamConfig`` of the ``GPUWARDEN`` stream (add ``storage``).

    ``discard: old``: a full stream drops its oldest frames rather than refusing new ones. No
    rollup headers (``Nats-Rollup`` from any agent would purge the stream).
    """
    return {
        "name": STREAM,
        "subjects": list(STREAM_SUBJECTS),
        "num_replicas": cfg.stream_replicas,
        "max_age": cfg.stream_max_age,
        "max_bytes": stream_max_bytes(cfg),
        "duplicate_window": cfg.dedup_window,
        "discard": "old",
        "allow_rollup_hdrs": False,
    }


def is_name_in_use(e: BaseException) -> bool:
    """Another client created the stream meanwhile (with a size fitted by its own tries)."""
    return getattr(e, "err_code", None) == NAME_IN_USE_CODE


def is_too_big(e: BaseException) -> bool:
    """A JetStream API error saying the server cannot hold a stream of that size."""
    return getattr(e, "err_code", None) in TOO_BIG_CODES


async def fit_max_bytes(attempt: Callable[[int], Awaitable[T]], max_bytes: int) -> tuple[T, int]:
    """``attempt(max_bytes)``; while the server refuses the size (:func:`is_too_big`), again
    with half of it, down to 64 MiB. Returns the result and the size the server took."""
    size = max_bytes
    while True:
        try:
            return await attempt(size), size
        except Exception as e:
            if not is_too_big(e) or size <= 0 or size // 2 < MIN_STREAM_BYTES:
                raise
            log.warning(
                "stream %s: the server cannot hold max_bytes %d; trying %d (set [nats] stream_max_bytes)",
                STREAM,
                size,
                size // 2,
            )
            size //= 2


@dataclass(frozen=True, slots=True)
class Drift:
    """One setting of the stream that differs from the configuration."""

    field: str
    have: Any
    want: Any
    updatable: bool  # NATS can change it in place (a stream update)
    command: str  # what an operator runs to apply it by hand


def _secs(v: float) -> str:
    return f"{round(v)}s" if v == round(v) else f"{round(v * 1000)}ms"


def _edit(flag: str) -> str:
    return f"nats stream edit {STREAM} {flag} -f"


def stream_drift(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[Drift]:
    """The settings of stream configuration ``have`` that differ from ``want``.

    Both are mappings of :func:`stream_settings`'s keys plus ``storage`` and ``retention``
    (``"file"``, ``"limits"``; enums of nats-py compare equal to their string values).
    Durations in seconds. Subjects: every wanted subject must be captured; extra ones are kept.
    """
    subjects = list(have.get("subjects") or [])
    merged = subjects + [s for s in want["subjects"] if s not in subjects]
    max_age, dupe = float(want["max_age"]), float(want["duplicate_window"])
    max_bytes, replicas = int(want["max_bytes"]), int(want["num_replicas"])
    # (setting, have, want, differs, flag of `nats stream edit`)
    checks: list[tuple[str, Any, Any, bool, str]] = [
        ("subjects", subjects, merged, merged != subjects, f"--subjects {shlex.quote(','.join(merged))}"),
        ("max_age", have.get("max_age"), max_age, _differ(have.get("max_age"), max_age),
         f"--max-age {_secs(max_age)}"),
        ("duplicate_window", have.get("duplicate_window"), dupe, _differ(have.get("duplicate_window"), dupe),
         f"--dupe-window {_secs(dupe)}"),
        ("max_bytes", have.get("max_bytes"), max_bytes, int(have.get("max_bytes") or -1) != max_bytes,
         f"--max-bytes {max_bytes}"),
        ("discard", _value(have.get("discard")), want["discard"],
         str(_value(have.get("discard")) or "old") != want["discard"], f"--discard {want['discard']}"),
        ("allow_rollup_hdrs", bool(have.get("allow_rollup_hdrs")), bool(want["allow_rollup_hdrs"]),
         bool(have.get("allow_rollup_hdrs")) != bool(want["allow_rollup_hdrs"]),
         "--allow-rollup" if want["allow_rollup_hdrs"] else "--no-allow-rollup"),
        ("num_replicas", have.get("num_replicas"), replicas, int(have.get("num_replicas") or 1) != replicas,
         f"--replicas {replicas}"),
    ]  # fmt: skip
    out = [Drift(k, h, w, True, _edit(flag)) for k, h, w, differs, flag in checks if differs]
    recreate = (
        f"nats stream rm {STREAM} -f  # then restart the collector, which creates it anew "
        "(frames not yet consumed are lost; or move them first with nats stream backup/restore)"
    )
    out += [
        Drift(key, _value(have.get(key)), want[key], False, recreate)
        for key in ("storage", "retention")
        if key in want and str(_value(have.get(key))) != str(want[key])
    ]
    return out


def _differ(have: Any, want: float) -> bool:
    return abs(float(have or 0) - want) > 1e-3


def _value(v: Any) -> Any:
    """An enum's value (nats-py's StorageType, DiscardPolicy, ...), anything else as it is."""
    return getattr(v, "value", v)
