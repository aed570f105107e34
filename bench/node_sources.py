"""The node sources' cost on a real-shaped node (issue 14): what the agent adds to each tick.

``NodeSource.read`` on an H100-shaped sysfs tree (8 InfiniBand ports and a RoCE bond, written
to a temporary directory by ``tests/support/sysfs_ib.py``), this machine's ``/proc/modules`` and
``adjtimex``: CPU per read. The ``/proc`` D-state scan (every ``[node] dstate_every``, 30 s by
default) per scan. The kernel-log reader's per-line cost for lines of no class (the pre-filter)
and for class lines (regular expressions, counting), from the real lines of
``tests/data/kmsg-node.log``. The simulated node (``SimulatedSystem``) is what
``bench/agent_cost.py`` and ``bench/node_exporter.py`` tick; these rows show what a real node
adds on top.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.kmsg import KmsgReader
from agent.node import DStateScanner, NodeSource
from shared.config import NodeConfig
from tests.support.sysfs_ib import write_tree

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 500


def _cpu_per_call_ms(call: Callable[[], object], rounds: int) -> float:
    call()  # warm: caches, the port list, libc's adjtimex
    t0 = time.process_time()
    for _ in range(rounds):
        call()
    return (time.process_time() - t0) / rounds * 1000


def run() -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as sys_root:
        cfg = NodeConfig(sys_root=str(write_tree(Path(sys_root))), services_every=0, dstate_every=0)
        node = NodeSource(cfg)
        read_ms = _cpu_per_call_ms(node.read, ROUNDS)
    scanner = DStateScanner()
    scan_ms = _cpu_per_call_ms(scanner.scan, 20)
    reader = KmsgReader("/nonexistent")
    quiet = [b"6,2041,1234567,-;systemd[1]: Started Session 42 of user root."] * 10_000
    t0 = time.process_time()
    for raw in quiet:
        reader._parse(raw)
    quiet_us = (time.process_time() - t0) / len(quiet) * 1e6
    lines = [line.encode() for line in (ROOT / "tests/data/kmsg-node.log").read_text().splitlines()]
    lines = [line for line in lines if b"NVRM" not in line] * 100
    t0 = time.process_time()
    for raw in lines:
        reader._parse(raw)
    class_us = (time.process_time() - t0) / len(lines) * 1e6
    return [
        ("node: sources per tick (9 IB ports, modules, adjtimex)", f"{read_ms:.2f} ms", "< 1 ms"),
        ("node: /proc D-state scan (every 30 s)", f"{scan_ms:.2f} ms", "< 20 ms"),
        ("node: kernel-log line of no class", f"{quiet_us:.1f} us", "< 5 us"),
        ("node: kernel-log line of a class (counted)", f"{class_us:.1f} us", "< 50 us"),
    ]
