"""Channel configuration, the default policy, payloads (webhook v4, Alertmanager v2) and the
HMAC signature: pure functions, parametrised."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest

from collector.alerts import alert_config_from
from collector.alerts.model import Alert, Notification
from collector.notify.alertmanager import am_alert
from collector.notify.base import delivery_key, iso, payload_of
from collector.notify.config import notify_config_from, with_channels
from collector.notify.webhook import sign, verify, webhook_body
from shared.errors import ConfigError

HOOK = {"name": "oncall", "url": "https://hooks.example/gpu"}


def policy(*levels: list[str]) -> dict[str, Any]:
    return {
        "policy": [{"name": "p", "levels": [{"after": f"{i}m", "notify": n} for i, n in enumerate(levels)]}]
    }


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"notify": {"webhook": [{"name": "x"}]}}, "notify.webhook[0].url"),
        ({"notify": {"webhook": [{"url": "http://a"}]}}, "notify.webhook[0].name"),
        ({"notify": {"webhook": [HOOK, HOOK]}}, "notify.webhook[1].name"),
        ({"notify": {"webhook": [{**HOOK, "name": "log"}]}}, "notify.webhook[0].name"),
        ({"notify": {"webhook": [{**HOOK, "retries": -1}]}}, "notify.webhook[0].retries"),
        ({"notify": {"webhook": [{**HOOK, "timeout": "soon"}]}}, "notify.webhook[0].timeout"),
        ({"notify": {"webhook": [{**HOOK, "secret": "env:NOPE_NOT_SET"}]}}, "notify.webhook[0].secret"),
        ({"notify": {"webhook": [{**HOOK, "colour": "red"}]}}, "notify.webhook[0].colour"),
        ({"notify": {"alertmanager": [{"name": "am", "url": "ftp://x"}]}}, "notify.alertmanager[0].url"),
        ({"notify": {"log": {"enabled": "maybe"}}}, "notify.log.enabled"),
        ({"notify": {"pager": {}}}, "notify.pager"),
        (
            {"notify": {"webhook": [HOOK]}, "escalation": policy(["oncall"], ["manager"])},
            "escalation.policy[0].levels[1].notify",
        ),
    ],
)
def test_bad_channel_config_names_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        with_channels(alert_config_from(raw, env={}), notify_config_from(raw, env={}))
    assert e.value.key == key


def test_secret_from_a_file_and_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "hmac"
    f.write_text("from-file\n")
    raw = {"notify": {"webhook": [{**HOOK, "secret": f"file:{f}"}, {**HOOK, "name": "b", "secret": "env:K"}]}}
    cfg = notify_config_from(raw, env={"K": "from-env"})
    assert [w.secret.reveal() for w in cfg.webhooks if w.secret] == ["from-file", "from-env"]
    assert "from-env" not in repr(cfg)


def test_default_policy_sends_everything_to_every_channel() -> None:
    raw = {"notify": {"webhook": [HOOK], "alertmanager": [{"name": "am", "url": "http://am:9093/"}]}}
    n = notify_config_from(raw, env={})
    cfg = with_channels(alert_config_from(raw, env={}), n)
    (p,) = cfg.policies
    assert p.name == "default"
    assert p.matchers == ()
    assert p.levels[0].after == 0
    assert p.levels[0].notify == ("log", "nats", "oncall", "am")
    assert n.alertmanagers[0].url == "http://am:9093"
    quiet = notify_config_from({"notify": {"log": {"enabled": False}, "nats": {"enabled": False}}}, env={})
    assert with_channels(alert_config_from({}, env={}), quiet).policies == ()


def test_configured_policies_are_kept() -> None:
    raw = {"notify": {"webhook": [HOOK]}, "escalation": policy(["oncall"], ["log"])}
    cfg = with_channels(alert_config_from(raw, env={}), notify_config_from(raw, env={}))
    assert [p.name for p in cfg.policies] == ["p"]


def alert(state: str = "firing") -> Alert:
    return Alert(
        "fp1",
        "k",
        "gpu.xid",
        {"provider": "p", "host": "h", "gpu": "2", "xid": "79"},
        "critical",
        state=state,
        summary="GPU 2 XID 79",
        advice="drain and reboot",
        started_at=100.0,
        fired_at=100.5,
        resolved_at=160.0 if state == "resolved" else None,
        episode=3,
    )


def note(kind: str) -> Notification:
    a = alert("resolved" if kind == "resolved" else "firing")
    at = 160.0 if kind == "resolved" else 100.5
    return Notification(
        kind, ("oncall",), at, "fp1", "inc1", a.rule, a.labels, a.severity, a.summary, a.advice, 0, (), 3
    )


@pytest.mark.parametrize(
    ("kind", "status", "ends"), [("firing", "firing", None), ("resolved", "resolved", 160.0)]
)
def test_webhook_v4_payload(kind: str, status: str, ends: float | None) -> None:
    a = alert("resolved" if kind == "resolved" else "firing")
    p = payload_of(note(kind), a, "oncall")
    body = webhook_body(p, "oncall", "http://collector:8080")
    assert set(body) >= {
        "version",
        "groupKey",
        "status",
        "receiver",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "alerts",
    }
    assert body["version"] == "4"
    assert body["status"] == status
    assert body["groupLabels"] == {"provider": "p", "host": "h"}
    (x,) = body["alerts"]
    assert set(x) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert x["labels"] == {
        "provider": "p",
        "host": "h",
        "gpu": "2",
        "xid": "79",
        "alertname": "gpu.xid",
        "severity": "critical",
        "action": "drain_and_reboot",  # XID 79: fatal, reboot (docs/health.md, "Actions")
    }
    assert x["annotations"]["advice"] == "drain and reboot"
    assert x["annotations"]["action"] == "drain_and_reboot"
    assert p["action"] == "drain_and_reboot"
    assert x["startsAt"] == "1970-01-01T00:01:40.500Z"
    assert x["endsAt"] == iso(ends)
    assert x["generatorURL"] == "http://collector:8080/api/v1/alerts/fp1"
    am = am_alert(p)
    assert ("endsAt" in am) is (kind == "resolved")
    assert am["labels"] == x["labels"]


def test_delivery_keys_differ_by_channel_and_kind() -> None:
    keys = {delivery_key(note(k), c) for k in ("firing", "resolved") for c in ("a", "b")}
    assert len(keys) == 4


@pytest.mark.parametrize("body", [b"", b"{}", b'{"version":"4"}', bytes(range(256))])
def test_signature_is_hmac_sha256_of_the_timestamp_and_the_body(body: bytes) -> None:
    ts = "1795800000"
    sig = sign(b"k", body, ts)
    assert sig == "sha256=" + hmac.new(b"k", ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert sig != "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()  # not the body alone
    at = 1795800000.0
    assert verify(b"k", body, sig, ts, now=at)
    assert verify(b"k", body, sig, ts, now=at + 299)
    assert not verify(b"other", body, sig, ts, now=at)
    assert not verify(b"k", body + b" ", sig, ts, now=at)
    assert not verify(b"k", body, sig, "1795800001", now=at)  # a timestamp changed by a replayer
    assert not verify(b"k", body, sig, ts, now=at + 301)  # captured and replayed 5 minutes later
    assert not verify(b"k", body, sig, ts, now=at - 301)
    assert not verify(b"k", body, sig, "", now=at)
    assert not verify(b"k", body, sig, "9" * 40, now=at)


async def test_log_channel_writes_one_json_line(caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from collector.notify.log import LogChannel

    ch = LogChannel()
    p = payload_of(note("firing"), alert(), "log")
    with caplog.at_level(logging.INFO, logger="gpuwarden.notify"):
        await ch.deliver(p, "k1")
        await ch.deliver(payload_of(note("resolved"), alert("resolved"), "log"), "k2")
    first, second = caplog.records
    assert first.levelno == logging.WARNING  # a critical alert firing
    assert second.levelno == logging.INFO
    doc = json.loads(first.getMessage())
    assert doc["event"] == "notification"
    assert doc["delivery"] == "k1"
    assert doc["rule"] == "gpu.xid"
    assert doc["labels"]["host"] == "h"
    assert json.loads(second.getMessage())["status"] == "resolved"


def test_notify_toggles_from_the_environment() -> None:
    env = {"GPUWARDEN_NOTIFY_LOG_ENABLED": "false", "GPUWARDEN_NOTIFY_EXTERNAL_URL": "https://gw.example/"}
    cfg = notify_config_from({"notify": {"log": {"enabled": True}}}, env=env)
    assert not cfg.log
    assert cfg.nats
    assert cfg.external_url == "https://gw.example"
    assert cfg.names() == ("nats",)
    with pytest.raises(ConfigError) as e:
        notify_config_from({}, env={"GPUWARDEN_NOTIFY_NATS_ENABLED": "perhaps"})
    assert e.value.key == "notify.nats.enabled"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:s3cret-pw@hooks.example/x",
        "http://user:s3cret-pw@hooks.example:99999/x",
        "http://user:s3cret-pw@[::1/x",
        "https://user:s3cret-pw@/x",
    ],
)
def test_a_bad_receiver_url_is_refused_without_showing_its_credentials(url: str) -> None:
    raw = {"notify": {"webhook": [{**HOOK, "url": url}]}}
    with pytest.raises(ConfigError) as e:
        notify_config_from(raw, env={})
    assert e.value.key == "notify.webhook[0].url"
    assert "s3cret-pw" not in str(e.value)
    assert "***@" in str(e.value) or "user" not in str(e.value)


async def test_a_delivery_error_never_carries_the_url_credentials(caplog: pytest.LogCaptureFixture) -> None:
    from collector.notify.base import DeliveryError
    from collector.notify.config import WebhookConfig
    from collector.notify.webhook import WebhookChannel

    ch = WebhookChannel(WebhookConfig(name="w", url="http://user:s3cret-pw@127.0.0.1:99999/hook"))
    try:
        with pytest.raises(DeliveryError) as e:
            await ch.deliver(payload_of(note("firing"), alert(), "w"), "k")
    finally:
        await ch.close()
    assert "s3cret-pw" not in str(e.value)
    assert "***@127.0.0.1" in str(e.value)


def test_redact_hides_userinfo_of_every_url() -> None:
    from shared.redact import redact

    assert redact("x https://a:b@h/p and nats://t0k@n:4222 y") == "x https://***@h/p and nats://***@n:4222 y"
    assert redact("https://h/p?x=a@b") == "https://h/p?x=a@b"


def test_a_spool_is_taken_over_only_when_its_writer_is_gone(tmp_path: Path) -> None:
    """A group member's spool is named after it, with its process id: the next run reads the
    spools no live process holds (a previous run's, a dead member's, a lone collector's), not
    those of members alive on the same host."""
    from collector.notify.outbox import OutboxRow, Outcome, Spool  # noqa: PLC0415

    def put(spool: Spool, key: str) -> None:
        spool.append(OutboxRow(0, "hook", key, {}), Outcome("sent", 1, None, 1.0))

    def keys(spool: Spool) -> list[str]:
        return [row.key for row, _ in spool.read()]

    put(Spool(tmp_path / "notify-spool-0.jsonl"), "lone")  # its writer is gone
    live = Spool(tmp_path / "notify-spool-m1.jsonl")
    put(live, "m1")
    assert keys(live) == ["m1", "lone"]  # m1 holds its own spool from now on, and the one it took
    starting = Spool(tmp_path / "notify-spool-m2.jsonl")
    put(starting, "m2")
    assert keys(starting) == ["m2"]  # m1 is alive: neither its spool nor the one it took
    live.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notify-spool-m1.jsonl.lock", "notify-spool-m2.jsonl", "notify-spool-m2.jsonl.lock"
    ]  # fmt: skip
