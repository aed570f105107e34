"""The log channel: one structured JSON line per notification on logger ``gpuwarden.notify``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from collector.alerts.model import N_RESOLVED

log = logging.getLogger("gpuwarden.notify")


class LogChannel:
    name = "log"
    kind = "log"
    retries = 0
    backoff = 0.0
    max_backoff = 0.0

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or log

    def wants(self, payload: Mapping[str, Any]) -> bool:
        return True

    async def deliver(self, payload: Mapping[str, Any], key: str) -> None:
        level = (
            logging.INFO
            if payload["kind"] == N_RESOLVED or payload["severity"] != "critical"
            else logging.WARNING
        )
        self.log.log(
            level, "%s", json.dumps({"event": "notification", "delivery": key, **payload}, sort_keys=True)
        )

    async def close(self) -> None:
        return None
