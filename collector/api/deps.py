"""What the HTTP API is given (:func:`collector.api.app.make_app`): the read and command
interfaces of the collector's parts, nothing else. :mod:`collector.wiring` fills it in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, Unpack

import asyncpg
from aiohttp import web
from prometheus_client.registry import Collector

from collector.alerts.config import Silence
from collector.alerts.model import Alert, AlertQuery
from collector.config import CollectorConfig
from collector.health.live import LiveRollup
from collector.health.model import HealthState
from collector.health.rollup import HostHealth
from collector.ingest import IngestStats
from collector.metrics import FleetCollector
from collector.notify.stream import Broadcaster
from collector.remediation.service import Remediator
from collector.state import FleetState


class Alerts(Protocol):
    """Reads and commands of the engine runner (:class:`collector.alerting.Alerting`)."""

    health: HealthState

    def host_health(self, host: str) -> HostHealth | None: ...

    def list_alerts(self, **query: Unpack[AlertQuery]) -> list[Alert]: ...

    def get_alert(self, fingerprint: str) -> Alert | None: ...

    def inhibited_by_root(self) -> dict[str, list[Alert]]: ...

    def list_incidents(self, *, open_only: bool = False) -> list[dict[str, Any]]: ...

    def get_incident(self, iid: str) -> dict[str, Any] | None: ...

    def silences(self) -> tuple[list[Silence], list[Silence]]: ...

    def self_report(self) -> dict[str, Any]: ...

    async def ack(
        self, fingerprint: str, by: str, until: float | None = None, comment: str = ""
    ) -> dict[str, Any]: ...

    async def ack_incident(
        self, iid: str, by: str, until: float | None = None, comment: str = ""
    ) -> dict[str, Any]: ...

    async def add_silence(
        self, matchers: list[str], starts_at: float | None, ends_at: float, author: str, comment: str
    ) -> Silence: ...

    async def expire_silence(self, silence_id: str) -> bool: ...

    async def forget_host(self, host: str) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ApiDeps:
    config: CollectorConfig  # [api], [collector] listen, tokens
    fleet: FleetState  # the latest readings of every host
    live: LiveRollup  # health by provider and host, kept current
    alerts: Alerts
    broadcaster: Broadcaster  # the live stream's events
    remediation: Remediator
    metrics: FleetCollector  # /metrics, rendered at scrape time
    ingest_stats: Callable[[], IngestStats]
    nats_connected: Callable[[], bool]
    pool: Callable[[], asyncpg.Pool | None]  # the service's pool (remediation's audit reads)
    collectors: tuple[Collector, ...] = ()  # more /metrics families (a group member's fleet view)


DEPS: Final = web.AppKey("deps", ApiDeps)
