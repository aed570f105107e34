"""InfiniBand / RoCE ports from sysfs (``<sys_root>/class/infiniband/<device>/ports/<port>``).

Each port directory holds ``state`` (``4: ACTIVE``), ``phys_state`` (``5: LinkUp``), ``rate``
(``400 Gb/sec (4X NDR)``), ``link_layer`` (``InfiniBand`` or ``Ethernet``) and ``counters/``
(one cumulative counter per file; kernel ABI ``Documentation/ABI/stable/sysfs-class-infiniband``).
The port list, its file paths and each port's link layer are cached and rescanned every
``rescan_every`` reads (or when a port vanishes), so a tick reads only the files that change
(three state files and twelve counters per port, with ``os.read``). A node without
``class/infiniband`` (or with no port under it) has no IB: :meth:`IbReader.read` returns
``None`` ("absent"), never an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Final

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
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # cheaper than open(): no buffered file object
    except OSError:
        return None
    try:
        return os.read(fd, 256).decode("ascii", errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _counter(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if 0 <= value <= _U64 else None


@dataclasses.dataclass(frozen=True, slots=True)
class _Port:
    """A port's files, joined once at scan time."""

    device: str
    port: int
    state: str
    phys_state: str
    rate: str
    link_layer: str | None  # read once: it changes only with the HCA's configuration (rescanned)
    counters: tuple[tuple[str, str], ...]  # (IbPort field, file)


def _port(device: str, port: int, path: str) -> _Port:
    c = os.path.join(path, "counters")
    return _Port(
        device,
        min(port, 255),
        os.path.join(path, "state"),
        os.path.join(path, "phys_state"),
        os.path.join(path, "rate"),
        (_read(os.path.join(path, "link_layer")) or "").strip() or None,
        tuple((field, os.path.join(c, name)) for name, field in COUNTERS),
    )


class IbReader:
    """Reads every IB port's state, rate and error counters (blocking; cheap file reads)."""

    def __init__(self, sys_root: str = "/sys", *, rescan_every: int = 60) -> None:
        self.root = os.path.join(sys_root, "class", "infiniband")
        self.rescan_every = max(1, rescan_every)
        self._ports: list[_Port] | None = None
        self._reads = 0

    def _scan(self) -> list[_Port]:
        found: list[_Port] = []
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
            found.extend(_port(device, n, os.path.join(ports_dir, p)) for n, p in numbered)
        return found

    def read(self) -> tuple[IbPort, ...] | None:
        """Every port now, or ``None`` when the node has no InfiniBand / RoCE device."""
        if self._ports is None or self._reads % self.rescan_every == 0:
            self._ports = self._scan()
        self._reads += 1
        out: list[IbPort] = []
        vanished = False
        for p in self._ports:
            state = _read(p.state)
            if state is None:  # the device went away (driver unloaded, hot unplug): rescan next time
                vanished = True
                continue
            counters: dict[str, Any] = {field: _counter(path) for field, path in p.counters}
            out.append(
                IbPort(
                    device=p.device,
                    port=p.port,
                    state=parse_state(state),
                    phys_state=parse_state(_read(p.phys_state)),
                    rate_gbps=parse_rate(_read(p.rate)),
                    link_layer=p.link_layer,
                    **counters,
                )
            )
        if vanished:
            self._ports = None
        if not out and not self._ports:
            return None
        return tuple(out)
