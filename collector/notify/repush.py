"""The Alertmanager re-push: firing alerts pushed again every ``[alerting] alertmanager_resend``
so that Alertmanager does not time them out (its ``resolve_timeout``).

One re-push per Alertmanager, each its own task, skipped while the previous one of that
Alertmanager is still in flight: a hanging receiver delays neither the engine runner's timer
(staleness, ``for``, escalation) nor another channel. An alert is pushed to the
Alertmanagers that were told about it, while it is neither silenced nor inhibited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence

from collector.alerts.model import FIRING, Alert, quiet_ok
from collector.notify.alertmanager import AlertmanagerChannel, am_alert
from collector.notify.base import DeliveryError, firing_payload
from shared.tasks import cancel_all

log = logging.getLogger(__name__)


class AlertmanagerRepush:
    def __init__(
        self,
        alertmanagers: Sequence[AlertmanagerChannel],
        alerts: Callable[[], Iterable[Alert]],
        interval: float,
        external_url: str = "",
    ) -> None:
        self.alertmanagers, self.alerts = list(alertmanagers), alerts
        self.interval, self.external_url = interval, external_url
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pushes: dict[str, asyncio.Task[None]] = {}  # in flight, by Alertmanager

    async def start(self) -> None:
        if self.alertmanagers:
            self._stop.clear()
            self._task = asyncio.create_task(self._loop(), name="alertmanager-repush")

    async def stop(self) -> None:
        self._stop.set()
        tasks = [t for t in (self._task, *self._pushes.values()) if t is not None]
        self._task, self._pushes = None, {}
        await cancel_all(tasks)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            if not self._stop.is_set():
                self.start_pushes()

    def start_pushes(self) -> None:
        """Start a re-push to each Alertmanager whose previous one has ended."""
        for am in self.alertmanagers:
            running = self._pushes.get(am.name)
            if running is None or running.done():
                self._pushes[am.name] = asyncio.create_task(self.push(am), name=f"resend-{am.name}")

    async def push(self, am: AlertmanagerChannel) -> None:
        batch = [
            am_alert(firing_payload(a, am.name), self.external_url)
            for a in self.alerts()
            if a.state == FIRING and am.name in a.told and quiet_ok(a)
        ]
        if batch:
            try:
                await am.post(batch)
            except DeliveryError as e:
                log.warning("alertmanager %s: re-push failed: %s", am.name, e)
