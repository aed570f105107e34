"""What every channel shares: the payload of one delivery, the channel protocol, its figures.

A delivery's payload is channel-independent JSON (it is stored in the outbox before it is
sent); each channel renders it in its own format (webhook v4, Alertmanager v2, a log line,
a NATS message).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

import aiohttp

from collector.alerts.model import N_FIRING, N_RESOLVED, Alert, Notification
from collector.health.actions import action_for
from collector.notify.config import HttpChannelConfig
from shared.errors import GpuwardenError
from shared.redact import redact

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not set"


class DeliveryError(GpuwardenError):
    """One delivery attempt failed (it may be retried)."""


def iso(ts: float | None) -> str:
    """RFC 3339 UTC time of Unix seconds ``ts`` (Alertmanager's "not set" for ``None``)."""
    if ts is None:
        return ZERO_TIME
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload_of(n: Notification, alert: Alert | None, channel: str) -> dict[str, Any]:
    """The JSON-ready record of one notification for one channel (what the outbox stores)."""
    resolved = n.kind == N_RESOLVED
    starts = n.at
    ends: float | None = n.at if resolved else None
    if alert is not None:
        starts = alert.fired_at or alert.started_at or n.at
        if resolved and alert.resolved_at is not None:
            ends = alert.resolved_at
    return {
        "kind": n.kind,
        "status": "resolved" if resolved else "firing",
        "channel": channel,
        "fingerprint": n.fingerprint,
        "incident": n.incident,
        "rule": n.rule,
        "labels": dict(n.labels),
        "severity": n.severity,
        "summary": n.summary,
        "advice": n.advice,
        "level": n.level,
        "hosts": list(n.hosts),
        "new_hosts": list(n.new_hosts),
        "rules": list(n.rules),
        "alerts": list(n.alerts),
        "episode": n.episode,
        "at": n.at,
        "starts_at": starts,
        "ends_at": ends,
        "reason": n.reason or None,  # why it resolved without a healthy reading (replaced, ...)
        "action": action_for(n.rule, n.labels, alert.value if alert is not None else None),
    }


def firing_payload(a: Alert, channel: str) -> dict[str, Any]:
    """A firing alert's payload as :func:`payload_of` built it when it was told (what the
    Alertmanager re-push sends again)."""
    n = Notification(
        kind=N_FIRING, channels=(channel,), at=a.last_notified_at or a.fired_at or a.started_at,
        fingerprint=a.fingerprint, incident=a.incident, rule=a.rule, labels=a.labels,
        severity=a.severity, summary=a.summary, advice=a.advice, level=max(a.level, 0), episode=a.episode,
    )  # fmt: skip
    return payload_of(n, a, channel)


def delivery_key(n: Notification, channel: str) -> str:
    """Identifies one delivery: (fingerprint or incident, episode, kind, level, time, channel)."""
    subject = n.fingerprint or f"incident:{n.incident}"
    return f"{subject}/{n.episode}/{n.kind}/{n.level}/{n.at:.6f}/{channel}"


def alert_labels(p: Mapping[str, Any]) -> dict[str, str]:
    """Labels as Alertmanager sees them: ours plus ``alertname`` (the rule) and ``severity``."""
    labels = {str(k): str(v) for k, v in p["labels"].items()}
    labels["alertname"] = str(p["rule"])
    labels["severity"] = str(p["severity"])
    if p.get("action"):
        labels["action"] = str(p["action"])
    return labels


def alert_annotations(p: Mapping[str, Any]) -> dict[str, str]:
    out = {"summary": str(p["summary"]), "kind": str(p["kind"]), "level": str(p["level"])}
    if p.get("advice"):
        out["advice"] = str(p["advice"])
    if p.get("hosts"):
        out["hosts"] = ",".join(p["hosts"])
    if p.get("new_hosts"):
        out["new_hosts"] = ",".join(p["new_hosts"])
    if p.get("rules"):
        out["rules"] = ",".join(p["rules"])
    if p.get("incident"):
        out["incident"] = str(p["incident"])
    if p.get("reason"):
        out["reason"] = str(p["reason"])
    if p.get("action"):
        out["action"] = str(p["action"])
    return out


class Channel(Protocol):
    """A notification channel: ``deliver`` one payload or raise :class:`DeliveryError`."""

    name: str
    kind: str  # log | webhook | nats | alertmanager
    retries: int  # attempts after the first
    backoff: float  # first retry delay, doubled each time
    max_backoff: float

    def wants(self, payload: Mapping[str, Any]) -> bool: ...

    async def deliver(self, payload: Mapping[str, Any], key: str) -> None: ...

    async def close(self) -> None: ...


C = TypeVar("C", bound=HttpChannelConfig)


class HttpChannel(Generic[C]):
    """What the HTTP channels (webhook, Alertmanager) share: the retry figures and
    ``send_resolved`` of their config, one lazily opened client session, and the POST."""

    kind: str

    def __init__(self, cfg: C, external_url: str = "") -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.retries, self.backoff, self.max_backoff = cfg.retries, cfg.backoff, cfg.max_backoff
        self.external_url = external_url
        self._session: aiohttp.ClientSession | None = None

    def wants(self, payload: Mapping[str, Any]) -> bool:
        return self.cfg.send_resolved or payload["status"] != "resolved"

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.timeout))
        return self._session

    async def post_json(
        self, url: str, body: bytes, headers: Mapping[str, str], *, error_text: bool = False
    ) -> None:
        """POST ``body``; anything but a 2xx, a timeout or a connection error raises
        :class:`DeliveryError` (with the first 200 characters of the reply if ``error_text``)."""
        try:
            async with self.session().post(url, data=body, headers=headers) as resp:
                if not 200 <= resp.status < 300:
                    text = f": {redact((await resp.text())[:200])}" if error_text else ""
                    raise DeliveryError(f"{self.kind} {self.name}: HTTP {resp.status}{text}")
        except (aiohttp.ClientError, TimeoutError) as e:  # the text may hold the URL: no credentials
            raise DeliveryError(redact(f"{self.kind} {self.name}: {str(e) or type(e).__name__}")) from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass(slots=True)
class ChannelStats:
    """Self-metrics of one channel (exported by ``/metrics``)."""

    kind: str
    sent: int = 0
    failed: int = 0  # deliveries given up (dead-lettered)
    errors: int = 0  # failed attempts (retried or not)
    latency_sum_s: float = 0.0  # notification decided -> delivered
    latency_count: int = 0
    latency_max_s: float = 0.0
    last_sent_at: float = 0.0  # wall time of the last delivery (the self-check's view)
    last_failed_at: float = 0.0  # wall time of the last dead letter

    def observe(self, decided_at: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        lat = max(0.0, now - decided_at)
        self.last_sent_at = now
        self.sent += 1
        self.latency_sum_s += lat
        self.latency_count += 1
        self.latency_max_s = max(self.latency_max_s, lat)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sent": self.sent,
            "failed": self.failed,
            "errors": self.errors,
            "latency_sum_s": self.latency_sum_s,
            "latency_count": self.latency_count,
            "latency_max_s": self.latency_max_s,
        }
