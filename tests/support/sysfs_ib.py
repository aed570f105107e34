"""A ``/sys/class/infiniband`` tree written by the tests themselves, in a temporary directory.

The file layout and formats follow the kernel's documented sysfs ABI for InfiniBand
(``Documentation/ABI/stable/sysfs-class-infiniband``; the values are printed by
``drivers/infiniband/core/sysfs.c``): one directory per device, ``ports/<n>/`` per port with

- ``state``: ``<number>: <name>`` (``4: ACTIVE``, ``1: DOWN``),
- ``phys_state``: ``<number>: <name>`` (``5: LinkUp``, ``3: Disabled``),
- ``rate``: active width times speed (``400 Gb/sec (4X NDR)``),
- ``link_layer``: ``InfiniBand`` or ``Ethernet`` (RoCE),
- ``counters/<name>``: one integer per file (the IBTA PortCounters).

:func:`h100_ports` is the shape of an HGX/DGX H100 host: eight ConnectX-7 InfiniBand ports at
400 Gb/s NDR (``mlx5_0``, ``mlx5_1``, ``mlx5_4`` … ``mlx5_9``: the numbering skips the two
functions bonded into the RoCE device) and one RoCE bond, ``mlx5_bond_0``, at 200 Gb/s. The
counter values are ours: small non-zero error counts that a test can see read back, traffic
counters of a busy port, and ``mlx5_1``'s ``link_downed`` at 255, where the 8-bit
LinkDownedCounter of the PortCounters attribute stops (it saturates, it does not wrap).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

H100_IB_DEVICES = ("mlx5_0", "mlx5_1", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7", "mlx5_8", "mlx5_9")
H100_ROCE_DEVICE = "mlx5_bond_0"

# Error counters (the twelve the agent reads) and the traffic counters beside them.
ERROR_COUNTERS: Mapping[str, int] = {
    "symbol_error": 0,
    "link_downed": 0,
    "link_error_recovery": 0,
    "port_rcv_errors": 14,
    "port_rcv_remote_physical_errors": 0,
    "port_rcv_switch_relay_errors": 1,
    "port_rcv_constraint_errors": 0,
    "port_xmit_discards": 0,
    "port_xmit_constraint_errors": 0,
    "local_link_integrity_errors": 0,
    "excessive_buffer_overrun_errors": 15,
    "VL15_dropped": 0,
}
TRAFFIC_COUNTERS: Mapping[str, int] = {
    "port_rcv_data": 98_765_432_109_876,  # in 4-byte words, as the IBTA counts them
    "port_xmit_data": 97_531_864_208_642,
    "port_rcv_packets": 123_456_789_012,
    "port_xmit_packets": 121_212_121_212,
    "unicast_rcv_packets": 123_456_789_012,
    "unicast_xmit_packets": 121_212_121_212,
    "multicast_rcv_packets": 0,
    "multicast_xmit_packets": 0,
    "port_xmit_wait": 1_000_000_007,
}


@dataclass(frozen=True)
class PortSpec:
    """One port's files; ``state`` and ``phys_state`` are written as the kernel prints them."""

    device: str
    port: int = 1
    state: str = "4: ACTIVE"
    phys_state: str = "5: LinkUp"
    rate: str = "400 Gb/sec (4X NDR)"
    link_layer: str = "InfiniBand"
    counters: Mapping[str, int] = field(default_factory=lambda: {**ERROR_COUNTERS, **TRAFFIC_COUNTERS})


def h100_ports() -> list[PortSpec]:
    """The eight NDR InfiniBand ports and the RoCE bond of an H100 host (see the module doc)."""
    ports = [PortSpec(device) for device in H100_IB_DEVICES]
    ports[1] = replace(ports[1], counters={**ports[1].counters, "link_downed": 255})
    ports.append(PortSpec(H100_ROCE_DEVICE, rate="200 Gb/sec (2X NDR)", link_layer="Ethernet"))
    return ports


def h100_port(device: str) -> PortSpec:
    return next(p for p in h100_ports() if p.device == device)


def write_port(sys_root: Path, spec: PortSpec) -> Path:
    """Write one port under ``sys_root/class/infiniband``; returns the port directory."""
    port = sys_root / "class" / "infiniband" / spec.device / "ports" / str(spec.port)
    (port / "counters").mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("state", spec.state),
        ("phys_state", spec.phys_state),
        ("rate", spec.rate),
        ("link_layer", spec.link_layer),
    ):
        (port / name).write_text(text + "\n")
    for name, value in spec.counters.items():
        (port / "counters" / name).write_text(f"{value}\n")
    return port


def write_tree(sys_root: Path, ports: Iterable[PortSpec] | None = None) -> Path:
    """Write a ``class/infiniband`` tree under ``sys_root`` (the H100 shape by default);
    returns ``sys_root``, to be given to the agent as ``[node] sys_root``."""
    for spec in h100_ports() if ports is None else ports:
        write_port(sys_root, spec)
    return sys_root
