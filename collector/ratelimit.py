"""Per-host frame-rate limit: a token bucket per host (``[collector] host_rate`` frames per
second, ``host_burst`` at once).

The ingest charges each message at its JetStream timestamp (the time the server stored it, which
an agent cannot forge), so a collector draining a backlog refuses nothing that was sent at an
honest rate; the fast event path charges at its own clock. ``host_burst`` must hold what an
agent replays after an outage (its ``nats.buffer_frames``). Idle hosts' buckets are dropped once
full again, so the table holds only hosts that sent frames within ``host_burst / host_rate``
seconds. See docs/ingest.md ("Per-host rate limit").
"""

from __future__ import annotations

from typing import Final

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
