"""The engine runner (collector.alerting.Alerting) as its tests build it: one webhook channel
that keeps what it is handed, no NATS channel, ``for = "0s"``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from collector.alerting import Alerting
from collector.alerts import AlertEngine, alert_config_from
from collector.api import views
from collector.config import CollectorConfig
from collector.health import HealthEngine, health_config_from
from collector.notify import Channels
from collector.notify.config import notify_config_from, with_channels
from collector.notify.nats import NatsChannel
from collector.notify.outbox import Deliverer
from collector.notify.stream import Broadcaster
from collector.state import FleetState

CONFIG = """
[alerts]
for = "0s"
[notify.log]
enabled = false
[notify.nats]
enabled = false
[[notify.webhook]]
name = "hook"
url = "https://hooks.example/gpu"
"""


class Recorder:
    """A channel that keeps what it is handed."""

    name = kind = "hook"
    retries = 0
    backoff = max_backoff = 0.01

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    def wants(self, payload: Mapping[str, Any]) -> bool:
        return True

    async def deliver(self, payload: Mapping[str, Any], key: str) -> None:
        self.payloads.append(dict(payload))

    async def close(self) -> None:
        return None


def build_runner(cfg: CollectorConfig, store: Any, **extra: Any) -> tuple[Alerting, Recorder, Broadcaster]:
    """A runner over ``store`` (its AlertStore and the deliverer's OutboxStore), its channel
    and its live stream; ``extra``: more of Alerting's keywords (clock, scope, on_fenced...)."""
    notify = notify_config_from(cfg.raw)
    channel = Recorder()
    broadcaster = Broadcaster()
    runner = Alerting(
        cfg,
        health_engine=HealthEngine(health_config_from(cfg.raw)),
        alert_engine=AlertEngine(with_channels(alert_config_from(cfg.raw), notify)),
        notify=notify,
        store=store,
        deliverer=Deliverer(store, [channel]),
        channels=Channels([channel], []),
        nats=NatsChannel(lambda: None),
        broadcaster=broadcaster,
        views=views,
        fleet=FleetState(),
        **{"nats_connected": lambda: True, **extra},  # (unless told) the collector's own pipeline is fine
    )
    return runner, channel, broadcaster
