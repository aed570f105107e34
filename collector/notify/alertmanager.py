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

import aiohttp

from collector.notify.base import DeliveryError, alert_annotations, alert_labels, iso
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


class AlertmanagerChannel:
    kind = "alertmanager"

    def __init__(self, cfg: AlertmanagerConfig, external_url: str = "") -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.retries, self.backoff, self.max_backoff = cfg.retries, cfg.backoff, cfg.max_backoff
        self.external_url = external_url
        self._session: aiohttp.ClientSession | None = None

    def wants(self, payload: Mapping[str, Any]) -> bool:
        return self.cfg.send_resolved or payload["status"] != "resolved"

    async def deliver(self, payload: Mapping[str, Any], key: str) -> None:
        await self.post([am_alert(payload, self.external_url)])

    async def post(self, alerts: list[dict[str, Any]]) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.timeout))
        body = json.dumps(alerts).encode()
        try:
            async with self._session.post(
                f"{self.cfg.url}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                if not 200 <= resp.status < 300:
                    text = (await resp.text())[:200]
                    raise DeliveryError(f"alertmanager {self.name}: HTTP {resp.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DeliveryError(f"alertmanager {self.name}: {str(e) or type(e).__name__}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
