"""Rate-limited logging, the one way the agent and the collector log a repeated message: once
per key and interval, then the count of lines held back with the next one that is logged."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any


class RateLimitedLog:
    """Logs a message per key at most once per ``interval`` seconds, with a suppressed count."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def log(self, level: int, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self._interval:
            self._suppressed[key] += 1
            return
        n = self._suppressed.pop(key, 0)
        self._last[key] = now
        self._log.log(level, msg + (f" (and {n} more suppressed)" if n else ""), *args, exc_info=exc_info)

    def warning(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        self.log(logging.WARNING, key, msg, *args, exc_info=exc_info)
