"""NATS connection options and the ``GPUWARDEN`` stream's settings from ``[nats]``.

One implementation for agent and collector. Returns plain keyword arguments: this module does
not import nats-py (``shared`` depends only on msgpack). Secrets are revealed only into the
returned options, never logged.
"""

from __future__ import annotations

import ssl
from typing import Any

from shared.config import NatsConfig
from shared.errors import ConfigError
from shared.subjects import STREAM, STREAM_SUBJECTS


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


def stream_settings(cfg: NatsConfig) -> dict[str, Any]:
    """Keyword arguments for nats-py's ``StreamConfig`` of the ``GPUWARDEN`` stream (add ``storage``)."""
    return {
        "name": STREAM,
        "subjects": list(STREAM_SUBJECTS),
        "num_replicas": cfg.stream_replicas,
        "max_age": cfg.stream_max_age,
        "max_bytes": cfg.stream_max_bytes,
        "duplicate_window": cfg.dedup_window,
    }
