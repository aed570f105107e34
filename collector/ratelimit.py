"""Per-host frame-rate limit: a token bucket per host (``[collector] host_rate`` frames per
second, ``host_burst`` at once).

The ingest charges each message at its JetStream timestamp (the time the server stored it, which
an agent cannot forge), so a collector draining a backlog refuses nothing that was sent at an
honest rate; the fast event path charges at its own clock. ``host_burst`` must hold what an
agent replays after an outage (its ``nats.buffer_frames``). Idle hosts' buckets are dropped once
full again, so the table holds only hosts that sent frames within ``host_burst / host_rate``
seconds. See docs/ingest.md ("Per-host rate limit").

:class:`RateLimitedLog` is the collector's one way of logging a repeated warning: once per
key and interval, with the count of lines it held back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Final

RATE_LIMITED: Final = "rate_limited"  # the rejection reason


class HostRateLimit:
    """Token buckets keyed by host name; ``allow`` charges one frame."""

    __slots__ = ("_buckets", "_next_sweep", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}  # host -> (tokens, at)
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str, now: float) -> bool:
        """``True`` if ``host`` may send a frame at ``now`` (seconds); charges it."""
        if self.rate <= 0:
            return True
        if now >= self._next_sweep:
            self._sweep(now)
        b = self._buckets.get(host)
        if b is None:
            tokens = self.burst
        else:
            tokens, at = b
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[host] = (tokens, max(now, b[1]) if b is not None else now)
            return False
        self._buckets[host] = (tokens - 1.0, now if b is None else max(now, b[1]))
        return True

    def _sweep(self, now: float) -> None:
        """Forget the buckets that have refilled (their hosts are back to a full burst)."""
        full = self.burst / self.rate
        self._buckets = {h: b for h, b in self._buckets.items() if now - b[1] < full}
        self._next_sweep = now + min(full, 60.0)


class RateLimitedLog:
    """Logs a message per key at most once per ``interval`` seconds, with a suppressed count."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self._interval:
            self._suppressed[key] += 1
            return
        n = self._suppressed.pop(key, 0)
        self._last[key] = now
        self._log.warning(msg + (f" (and {n} more suppressed)" if n else ""), *args, exc_info=exc_info)
