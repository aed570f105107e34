"""NATS republish: alert transitions and notifications as JSON on
``gpuwarden.v1.alert.<provider>.<host>`` (provider-wide incidents: host token ``_provider``).

Messages are core NATS (not JetStream): ``{"type": "transition", ...}`` for every alert
transition and ``{"type": "notification", ...}`` for notifications routed to the ``nats``
channel. See ``docs/protocol.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient

from collector.alerts.model import Transition
from collector.health.actions import action_for
from collector.notify.base import DeliveryError
from shared.errors import SubjectError
from shared.subjects import alert_subject

PROVIDER_HOST = "_provider"


def subject_of(labels: Mapping[str, str]) -> str:
    return alert_subject(labels.get("provider") or "_unknown", labels.get("host") or PROVIDER_HOST)


def transition_message(t: Transition) -> dict[str, Any]:
    return {
        "type": "transition",
        "fingerprint": t.fingerprint,
        "rule": t.rule,
        "labels": dict(t.labels),
        "at": t.at,
        "kind": t.kind,
        "state": t.state,
        "severity": t.severity,
        "summary": t.summary,
        "incident": t.incident,
        "reason": t.reason or None,
        "action": action_for(t.rule, t.labels, healthy=t.state == "resolved"),
    }


class NatsChannel:
    name = "nats"
    kind = "nats"
    retries = 3
    backoff = 0.2
    max_backoff = 5.0

    def __init__(self, client: Callable[[], NatsClient | None]) -> None:
        self.client = client
        self.errors = 0

    def wants(self, payload: Mapping[str, Any]) -> bool:
        return True

    async def deliver(self, payload: Mapping[str, Any], key: str) -> None:
        await self._publish(payload["labels"], {"type": "notification", "delivery": key, **payload})

    async def publish_transition(self, t: Transition) -> None:
        """Best effort (transitions are also stored in ``alert_transitions``)."""
        try:
            await self._publish(t.labels, transition_message(t))
        except DeliveryError:
            self.errors += 1

    async def _publish(self, labels: Mapping[str, str], msg: Mapping[str, Any]) -> None:
        nc = self.client()
        if nc is None or nc.is_closed:
            raise DeliveryError("nats: not connected")
        try:
            await nc.publish(subject_of(labels), json.dumps(msg).encode())
        except (nats.errors.Error, SubjectError) as e:
            raise DeliveryError(f"nats: {e}") from e

    async def close(self) -> None:
        return None
