"""InfiniBand / RoCE ports from sysfs (``<sys_root>/class/infiniband/<device>/ports/<port>``).

Each port directory holds ``state`` (``4: ACTIVE``), ``phys_state`` (``5: LinkUp``), ``rate``
(``400 Gb/sec (4X NDR)``), ``link_layer`` (``InfiniBand`` or ``Ethernet``) and ``counters/``
(one cumulative counter per file; kernel ABI ``Documentation/ABI/stable/sysfs-class-infiniband``).
The port list is cached and rescanned every ``rescan_every`` reads (or when a port vanishes),
so a tick reads only the files it reports. A node without ``class/infiniband`` (or with no
port under it) has no IB: :meth:`IbReader.read` returns ``None`` ("absent"), never an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Final

from shared.frames import IbPort

# sysfs counter file -> IbPort field
COUNTERS: Final = (
    ("symbol_error", "symbol_error"),
    ("link_downed", "link_downed"),
    ("link_error_recovery", "link_error_recovery"),
    ("port_rcv_errors", "port_rcv_errors"),
    ("port_rcv_remote_physical_errors", "port_rcv_remote_physical_errors"),
    ("port_rcv_switch_relay_errors", "port_rcv_switch_relay_errors"),
    ("port_rcv_constraint_errors", "port_rcv_constraint_errors"),
    ("port_xmit_discards", "port_xmit_discards"),
    ("port_xmit_constraint_errors", "port_xmit_constraint_errors"),
    ("local_link_integrity_errors", "local_link_integrity_errors"),
    ("excessive_buffer_overrun_errors", "excessive_buffer_overrun_errors"),
    ("VL15_dropped", "vl15_dropped"),
)
_RATE_RE: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")
_U64: Final = (1 << 64) - 1


def parse_state(text: str | None) -> str | None:
    """``ACTIVE`` from ``4: ACTIVE`` (and ``LinkUp`` from ``5: LinkUp``); ``None`` if empty."""
    if text is None:
        return None
    value = text.strip()
    _, sep, name = value.partition(":")
    value = name.strip() if sep else value
    return value or None


def parse_rate(text: str | None) -> float | None:
    """Gb/s from ``400 Gb/sec (4X NDR)`` (``2.5 Gb/sec (1X SDR)`` -> 2.5); ``None`` if unreadable."""
    m = _RATE_RE.match(text or "")
    return float(m.group(1)) if m else None


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(256).decode("ascii", errors="replace")
    except OSError:
        return None


def _counter(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if 0 <= value <= _U64 else None


class IbReader:
    """Reads every IB port's state, rate and error counters (blocking; cheap file reads)."""

    def __init__(self, sys_root: str = "/sys", *, rescan_every: int = 60) -> None:
        self.root = os.path.join(sys_root, "class", "infiniband")
        self.rescan_every = max(1, rescan_every)
        self._ports: list[tuple[str, int, str]] | None = None
        self._reads = 0

    def _scan(self) -> list[tuple[str, int, str]]:
        found: list[tuple[str, int, str]] = []
        try:
            devices = sorted(os.listdir(self.root))
        except OSError:
            return found
        for device in devices:
            ports_dir = os.path.join(self.root, device, "ports")
            try:
                ports = os.listdir(ports_dir)
            except OSError:
                continue
            numbered = sorted((int(p), p) for p in ports if p.isdigit())
            found.extend((device, n, os.path.join(ports_dir, p)) for n, p in numbered)
        return found

    def read(self) -> tuple[IbPort, ...] | None:
        """Every port now, or ``None`` when the node has no InfiniBand / RoCE device."""
        if self._ports is None or self._reads % self.rescan_every == 0:
            self._ports = self._scan()
        self._reads += 1
        out: list[IbPort] = []
        vanished = False
        for device, port, path in self._ports:
            state = _read(os.path.join(path, "state"))
            if state is None:  # the device went away (driver unloaded, hot unplug): rescan next time
                vanished = True
                continue
            counters_dir = os.path.join(path, "counters")
            counters = {field: _counter(os.path.join(counters_dir, name)) for name, field in COUNTERS}
            base = IbPort(
                device=device,
                port=min(port, 255),
                state=parse_state(state),
                phys_state=parse_state(_read(os.path.join(path, "phys_state"))),
                rate_gbps=parse_rate(_read(os.path.join(path, "rate"))),
                link_layer=(_read(os.path.join(path, "link_layer")) or "").strip() or None,
            )
            out.append(dataclasses.replace(base, **counters))  # type: ignore[arg-type]
        if vanished:
            self._ports = None
        if not out and not self._ports:
            return None
        return tuple(out)
