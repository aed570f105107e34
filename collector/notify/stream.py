"""In-process fan-out of live events (health changes, alert transitions, incidents) to the
API's WebSocket clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Subscription:
    """One client's queue. ``overflowed`` is set (and the subscription detached) when the
    client fell ``maxsize`` events behind: the API then closes its socket (code 1013)."""

    def __init__(self, owner: Broadcaster, maxsize: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self.overflowed = False
        self._owner: Broadcaster | None = owner

    def close(self) -> None:
        if self._owner is not None:
            self._owner._subs.discard(self)
            self._owner = None


class Broadcaster:
    """In-process fan-out of live events (health changes, alert transitions) to WebSocket clients."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.published = 0
        self.dropped_subscribers = 0
        # a collector group member relays its own events to the others (collector/group/share.py)
        self.tap: Callable[[dict[str, Any]], None] | None = None

    def publish(self, event: dict[str, Any], *, relayed: bool = False) -> None:
        """Never blocks, never raises. ``event["type"]``: ``alert``, ``health`` or ``incident``;
        ``relayed``: another group member's event (not relayed again)."""
        self.published += 1
        if self.tap is not None and not relayed:
            self.tap(event)
        for sub in list(self._subs):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.overflowed = True
                sub.close()
                self.dropped_subscribers += 1

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subs.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subs)
