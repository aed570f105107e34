from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from shared.config import NatsConfig, Secret
from shared.errors import ConfigError
from shared.natsconf import connect_options, stream_settings, tls_context


def test_plain_options_reconnect_forever() -> None:
    opts = connect_options(NatsConfig(servers=("nats://a:4222", "nats://b:4222")), "gpuwarden-agent-x")
    assert opts["servers"] == ["nats://a:4222", "nats://b:4222"]
    assert opts["name"] == "gpuwarden-agent-x"
    assert opts["max_reconnect_attempts"] == -1
    assert "tls" not in opts
    assert "user" not in opts


def test_auth_and_secrets_are_revealed_only_into_the_options() -> None:
    cfg = NatsConfig(user="agent-1", password=Secret("pw"), token=Secret("tok"), name="custom")
    opts = connect_options(cfg, "ignored")
    assert (opts["user"], opts["password"], opts["token"], opts["name"]) == ("agent-1", "pw", "tok", "custom")
    assert "pw" not in repr(cfg)


def test_nkey_seed_is_passed_as_seed_string() -> None:
    opts = connect_options(NatsConfig(nkey_seed=Secret("SUAEXAMPLE"), creds="/etc/x.creds"), "n")
    assert opts["nkeys_seed_str"] == "SUAEXAMPLE"
    assert opts["user_credentials"] == "/etc/x.creds"


def test_tls_scheme_gets_a_verifying_context() -> None:
    ctx = tls_context(NatsConfig(servers=("tls://nats-1:4222",)))
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    opts = connect_options(NatsConfig(servers=("tls://n:4222",), tls_hostname="nats.internal"), "n")
    assert opts["tls_hostname"] == "nats.internal"


def test_unreadable_tls_files_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"nats\.tls_ca"):
        connect_options(NatsConfig(tls_ca=str(bad)), "n")
    with pytest.raises(ConfigError, match=r"nats\.tls_ca"):
        tls_context(NatsConfig(tls_ca=str(tmp_path / "missing.pem")))


def test_stream_settings_follow_the_config() -> None:
    s = stream_settings(NatsConfig(stream_replicas=3, stream_max_age=3600.0, dedup_window=60.0))
    assert s["name"] == "GPUWARDEN"
    assert s["subjects"] == ["gpuwarden.v1.sample.>", "gpuwarden.v1.event.>", "gpuwarden.v1.inventory.>"]
    assert (s["num_replicas"], s["max_age"], s["duplicate_window"]) == (3, 3600.0, 60.0)
