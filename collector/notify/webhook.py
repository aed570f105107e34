"""The webhook channel: Alertmanager-compatible webhook v4 JSON, HMAC-SHA256 signed.

Headers: ``X-Gpuwarden-Signature: sha256=<hex>`` (HMAC-SHA256 of the exact body with the
channel's secret, when one is configured) and ``X-Gpuwarden-Delivery: <delivery key>`` (the
same for every retry of one delivery, so a receiver can drop duplicates). Any 2xx is
success; anything else, a timeout or a connection error is a failed attempt (retried by the
outbox with exponential backoff, then dead-lettered).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from collector.notify.base import HttpChannel, alert_annotations, alert_labels, iso
from collector.notify.config import WebhookConfig

SIGNATURE_HEADER = "X-Gpuwarden-Signature"
DELIVERY_HEADER = "X-Gpuwarden-Delivery"


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """Check a signature header in constant time (for receivers and tests)."""
    return hmac.compare_digest(sign(secret, body), header)


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
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: key}
        if self.cfg.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.cfg.secret.reveal().encode(), body)
        await self.post_json(self.cfg.url, body, headers)
