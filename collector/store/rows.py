"""Frames to table rows: the column lists of the sample tables and fast row builders.

Pure: no I/O. Column names follow the fields of :mod:`shared.frames` so that a stored row can
be turned back into a frame (``state.py`` does at start).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from shared.frames import (
    STATIC_GPU_FIELDS,
    AgentStats,
    CheckResult,
    DiskUsage,
    EventFrame,
    GpuProcess,
    GpuSample,
    IbPort,
    InventoryFrame,
    NicCounters,
    SampleFrame,
    SystemSample,
    fields,
    to_wire,
)

I64_MAX: Final = (1 << 63) - 1

# One column per scalar reading; the arrays (processes, per-link NVLink counters, MIG devices) are not
# columns (processes go in ``detail``).
GPU_FIELDS: Final = tuple(
    f.name for f in fields(GpuSample) if f.name not in ("index", "uuid") and not isinstance(f.default, tuple)
)
# What rarely changes (docs/storage.md, "Size"): the static facts of the GPU and its error and
# fabric counters go in ``gpu_facts``, one row per distinct set of values of a GPU and day, which
# each ``gpu_samples`` row names by id (migration 0010); the view ``gpu_readings`` joins them back.
FACT_FIELDS: Final = (
    *STATIC_GPU_FIELDS, "mem_reserved_bytes", "ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate",
    "ecc_dbe_aggregate", "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending",
    "remapped_rows_correctable", "remapped_rows_uncorrectable", "remap_pending", "remap_failure",
    "pcie_replay_count", "nvlink_links_up", "nvlink_crc_errors", "nvlink_replay_errors",
    "nvlink_recovery_errors", "recovery_action", "fabric_state", "fabric_status", "fabric_clique_id",
    "fabric_health_mask",
)  # fmt: skip
FACT_COLUMNS: Final = ("day", "host_id", "gpu_index", "key", *FACT_FIELDS)
SAMPLE_FIELDS: Final = tuple(name for name in GPU_FIELDS if name not in FACT_FIELDS)
GPU_COLUMNS: Final = ("ts", "host_id", "facts_id", "gpu_index", *SAMPLE_FIELDS)
# The node part of the system sample (docs/health.md, "Node checks") goes in ``detail["node"]``
# in wire form (only what the frame carries), not in columns.
NODE_FIELDS: Final = (
    "ib_ports",
    "kernel_log",
    "modules",
    "services",
    "clock",
    "dstate_procs",
    "dstate_names",
    "absent",
)
SYSTEM_FIELDS: Final = tuple(
    f.name for f in fields(SystemSample) if f.name not in ("disks", "nics", *NODE_FIELDS)
)
HOST_COLUMNS: Final = ("ts", "host_id", "boot_id", "seq", "interval_s", *SYSTEM_FIELDS, "detail")
HOST_STAGE_COLUMNS: Final = ("n", *HOST_COLUMNS)
# Metrics with one-minute rollups (min, max, sum, count each), for history at steps >= 60 s.
ROLLUP_METRICS: Final = (
    "temp_c",
    "util_gpu_pct",
    "util_mem_pct",
    "mem_used_bytes",
    "power_w",
    "clock_sm_mhz",
    "mem_temp_c",
    "fan_pct",
)
EVENT_FIELDS: Final = ("type", "source", "gpu_index", "gpu_uuid", "xid", "count", "value", "message")

# ``detail`` stores these records as JSON arrays in field order (compact and fast to write)
DISK_FIELDS: Final = tuple(f.name for f in fields(DiskUsage))
NIC_FIELDS: Final = tuple(f.name for f in fields(NicCounters))
CHECK_FIELDS: Final = tuple(f.name for f in fields(CheckResult))
AGENT_FIELDS: Final = tuple(f.name for f in fields(AgentStats))
PROC_FIELDS: Final = tuple(f.name for f in fields(GpuProcess))
# detail.node.ib_ports as arrays too (rows written before them hold maps, read back as they are):
# 8 ports of a host made 3.4 of its ~5 KB of detail as maps, 1.0 as arrays
IB_FIELDS: Final = tuple(f.name for f in fields(IbPort))
_disk = operator.attrgetter(*DISK_FIELDS)
_nic = operator.attrgetter(*NIC_FIELDS)
_check = operator.attrgetter(*CHECK_FIELDS)
_agent = operator.attrgetter(*AGENT_FIELDS)
_proc = operator.attrgetter(*PROC_FIELDS)
_ib = operator.attrgetter(*IB_FIELDS)
_gpu_row_values = operator.attrgetter("index", *SAMPLE_FIELDS)
fact_values: Final = operator.attrgetter(*FACT_FIELDS)
_system_values = operator.attrgetter(*SYSTEM_FIELDS)
_NO_SYSTEM: Final = (None,) * len(SYSTEM_FIELDS)

FrameKey = tuple[int, str, int]  # (host_id, boot_id, seq)

try:
    from msgspec.json import encode as _json_encode
except ImportError:  # the collector extra installs it; the standard library does the same, slower
    _json_encode = None  # type: ignore[assignment]


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def dumps(value: Any) -> str:
    """Compact JSON text (msgspec's encoder when installed: 3-5x faster than json.dumps)."""
    if _json_encode is not None:
        return _json_encode(value).decode()
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def gpu_rows(frame: SampleFrame, host_id: int, ts: datetime, facts: list[int]) -> list[tuple[Any, ...]]:
    """Rows of ``gpu_samples``, in GPU_COLUMNS order (``facts``: the ``gpu_facts`` id of each GPU)."""
    return [(ts, host_id, fid, *_gpu_row_values(g)) for g, fid in zip(frame.gpus, facts, strict=True)]


def host_row(frame: SampleFrame, host_id: int, ts: datetime, n: int) -> tuple[Any, ...]:
    """The ``host_samples`` row of a frame: system columns and the compact ``detail`` JSON."""
    system = frame.system
    detail: dict[str, Any] = {}
    if system is None:
        values: tuple[Any, ...] = _NO_SYSTEM
        detail["system"] = False
    else:
        values = _system_values(system)
        if system.disks:
            detail["disks"] = [_disk(d) for d in system.disks]
        if system.nics:
            detail["nics"] = [_nic(x) for x in system.nics]
        node = {k: v for k in NODE_FIELDS if (v := getattr(system, k)) is not None and v != ()}
        if node:  # msgspec encodes the records as their wire maps itself (3x faster than to_wire)
            if _json_encode is None:
                node = {k: to_wire(v) for k, v in node.items()}
            if system.ib_ports:
                node["ib_ports"] = [_ib(p) for p in system.ib_ports]
            detail["node"] = node
    if frame.checks:
        detail["checks"] = [_check(c) for c in frame.checks]
    if frame.agent is not None:
        detail["agent"] = _agent(frame.agent)
    if frame.outage is not None:
        detail["outage"] = to_wire(frame.outage)
    procs = [[g.index, [_proc(p) for p in g.processes]] for g in frame.gpus if g.processes]
    if procs:
        detail["procs"] = procs
    return (
        n,
        ts,
        host_id,
        frame.boot_id,
        frame.seq,
        frame.interval_s,
        *values,
        dumps(detail) if detail else None,
    )


def detail_to_wire(detail: dict[str, Any]) -> dict[str, Any]:
    """The ``detail`` JSON back in wire form: ``disks``, ``nics``, ``checks``, ``agent``, ``procs``,
    ``node`` (the node fields of the system sample, by name), ``outage`` (the agent's report)."""
    out: dict[str, Any] = {
        "disks": [dict(zip(DISK_FIELDS, d, strict=False)) for d in detail.get("disks", ())],
        "nics": [dict(zip(NIC_FIELDS, x, strict=False)) for x in detail.get("nics", ())],
        "checks": [dict(zip(CHECK_FIELDS, c, strict=False)) for c in detail.get("checks", ())],
        "agent": dict(zip(AGENT_FIELDS, detail["agent"], strict=False)) if "agent" in detail else None,
        "procs": {
            idx: [dict(zip(PROC_FIELDS, p, strict=False)) for p in procs]
            for idx, procs in detail.get("procs", ())
        },
        "system": detail.get("system", True),
        "node": _node_to_wire(detail.get("node", {})),
        "outage": detail.get("outage"),
    }
    return out


def _node_to_wire(node: dict[str, Any]) -> dict[str, Any]:
    ports = node.get("ib_ports")
    if ports and type(ports[0]) is list:  # arrays in field order; maps as written before them
        return {**node, "ib_ports": [dict(zip(IB_FIELDS, p, strict=False)) for p in ports]}
    return node


def event_row(frame: EventFrame, host_id: int) -> tuple[Any, ...]:
    return (
        utc(frame.ts),
        host_id,
        frame.boot_id,
        frame.seq,
        frame.type,
        frame.source,
        frame.gpu_index,
        frame.gpu_uuid,
        frame.xid,
        frame.count,
        frame.value,
        frame.message,
    )


@dataclass(frozen=True, slots=True)
class StorageProblem:
    field: str
    message: str


def storage_problem(frame: SampleFrame | EventFrame | InventoryFrame) -> StorageProblem | None:
    """Why ``frame`` cannot be stored although it decoded (an integer beyond signed 64 bits,
    a NUL character, which PostgreSQL text and jsonb refuse), or ``None``."""
    return _scan(to_wire(frame), "")


def _scan(value: Any, path: str) -> StorageProblem | None:
    t = type(value)
    if t is int and value > I64_MAX:
        return StorageProblem(path, f"{value} exceeds the signed 64-bit storage range")
    if t is str and "\x00" in value:
        return StorageProblem(path, "NUL character in string")
    if t is dict:
        return _first(_scan(v, f"{path}.{k}" if path else k) for k, v in value.items())
    if t is list:
        return _first(_scan(v, f"{path}[{i}]") for i, v in enumerate(value))
    return None


def _first(items: Iterable[StorageProblem | None]) -> StorageProblem | None:
    for item in items:
        if item is not None:
            return item
    return None
