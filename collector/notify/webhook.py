"""The webhook channel: Alertmanager-compatible webhook v4 JSON, HMAC-SHA256 signed.

Headers: ``X-Gpuwarden-Timestamp: <Unix seconds>`` (the time of this attempt),
``X-Gpuwarden-Signature: sha256=<hex>`` (HMAC-SHA256 with the channel's secret, when one is
configured, of ``<timestamp>.<body>``: the timestamp is signed with the body, so a captured
request cannot be replayed later, as Stripe and Slack sign theirs) and
``X-Gpuwarden-Delivery: <delivery key>`` (the same for every retry of one delivery, so a
receiver can drop duplicates). A receiver recomputes the signature and refuses a timestamp
more than a few minutes from its clock (:func:`verify`, docs/alerts.md). Any 2xx is success;
anything else, a timeout or a connection error is a failed attempt (retried by the outbox
with exponential backoff, then dead-lettered).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any, Final

from collector.notify.base import HttpChannel, alert_annotations, alert_labels, iso
from collector.notify.config import WebhookConfig

SIGNATURE_HEADER: Final = "X-Gpuwarden-Signature"
TIMESTAMP_HEADER: Final = "X-Gpuwarden-Timestamp"
DELIVERY_HEADER: Final = "X-Gpuwarden-Delivery"
TOLERANCE: Final = 300.0  # seconds a receiver accepts between the timestamp and its clock


def sign(secret: bytes, body: bytes, timestamp: str) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of
    ``<timestamp>.<body>`` (``timestamp``: the ``X-Gpuwarden-Timestamp`` header's value)."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(
    secret: bytes,
    body: bytes,
    header: str,
    timestamp: str,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE,
) -> bool:
    """What a receiver checks: the signature (constant time) over ``timestamp`` and ``body``,
    and a timestamp within ``tolerance`` seconds of ``now`` (a replayed request is refused)."""
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def webhook_body(p: Mapping[str, Any], receiver: str, external_url: str = "") -> dict[str, Any]:
    """Alertmanager webhook v4 payload of one notification."""
    labels = alert_labels(p)
    ann = alert_annotations(p)
    group = {k: labels[k] for k in ("provider", "host") if k in labels}
    generator = (
        f"{external_url}/api/v1/alerts/{p['fingerprint']}" if external_url and p["fingerprint"] else ""
    )
    return {
        "version": "4",
        "groupKey": f"{{}}:{{incident={json.dumps(p['incident'] or p['fingerprint'])}}}",
        "truncatedAlerts": 0,
        "status": p["status"],
        "receiver": receiver,
        "groupLabels": group,
        "commonLabels": labels,
        "commonAnnotations": ann,
        "externalURL": external_url,
        "alerts": [
            {
                "status": p["status"],
                "labels": labels,
                "annotations": ann,
                "startsAt": iso(p["starts_at"]),
                "endsAt": iso(p["ends_at"]),
                "generatorURL": generator,
                "fingerprint": p["fingerprint"] or f"incident-{p['incident']}",
            }
        ],
    }


class WebhookChannel(HttpChannel[WebhookConfig]):
    kind = "webhook"

    async def deliver(self, payload: Mapping[str, Any], key: str) -> None:
        body = json.dumps(webhook_body(payload, self.name, self.external_url)).encode()
        ts = str(int(time.time()))  # each attempt its own: a retry is not a replay
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: key, TIMESTAMP_HEADER: ts}
        if self.cfg.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.cfg.secret.reveal().encode(), body, ts)
        await self.post_json(self.cfg.url, body, headers)
