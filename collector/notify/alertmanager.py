"""Push to a Prometheus Alertmanager over its v2 API (``POST /api/v2/alerts``).

Firing alerts are posted without ``endsAt`` (Alertmanager then keeps them for its
``resolve_timeout``, 5 m by default, unless pushed again: a policy ``repeat`` below that, or
the re-push of firing alerts every ``[notify] alertmanager_resend``, keeps them alive);
resolved alerts are posted with ``endsAt``, which resolves them at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from collector.notify.base import HttpChannel, alert_annotations, alert_labels, iso
from collector.notify.config import AlertmanagerConfig


def am_alert(p: Mapping[str, Any], external_url: str = "") -> dict[str, Any]:
    """One element of the v2 ``postableAlerts`` array."""
    out: dict[str, Any] = {
        "labels": alert_labels(p),
        "annotations": alert_annotations(p),
        "startsAt": iso(p["starts_at"]),
    }
    if p["status"] == "resolved" and p["ends_at"] is not None:
        out["endsAt"] = iso(p["ends_at"])
    if external_url and p["fingerprint"]:
        out["generatorURL"] = f"{external_url}/api/v1/alerts/{p['fingerprint']}"
    return out


class AlertmanagerChannel(HttpChannel[AlertmanagerConfig]):
    kind = "alertmanager"

    async def deliver(self, payload: Mapping[str, Any], key: str) -> None:
        await self.post([am_alert(payload, self.external_url)])

    async def post(self, alerts: list[dict[str, Any]]) -> None:
        await self.post_json(
            f"{self.cfg.url}/api/v2/alerts",
            json.dumps(alerts).encode(),
            {"Content-Type": "application/json"},
            error_text=True,
        )
