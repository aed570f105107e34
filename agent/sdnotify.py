"""systemd's notify protocol over a plain AF_UNIX datagram socket (no dependency).

Used only when ``$NOTIFY_SOCKET`` is set (``Type=notify`` units). A path starting with ``@``
names a socket in the abstract namespace. Sending never raises: a notify socket that went
away must not stop the agent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """systemd's watchdog period for this process (``WatchdogSec=``), or None when off."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class SdNotifier:
    """Sends ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1`` and ``STATUS=...`` to systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self.sent = 0
        self.watchdog_s = watchdog_seconds(env)
        if not path:
            return
        self._address = b"\0" + path[1:].encode() if path.startswith("@") else path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> bool:
        """Send one state string (``"READY=1"``); False when disabled or the send failed."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto(state.encode(), self._address)
        except OSError as e:
            log.warning("systemd notify %r failed: %s", state, e)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
