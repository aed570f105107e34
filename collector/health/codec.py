"""The health state as JSON-compatible data, and back.

An effects layer may persist it (so rates, XID windows and throttle durations survive a
collector restart) or rebuild it by replaying recent frames; either way the engine only
ever sees plain dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from collector.health.history import BoardHistory, FatalXid, FleetHistory
from collector.health.model import CheckStatus, GpuState, HealthState, HostState, XidRecord
from shared.frames import (
    ClockSync,
    DiskUsage,
    GpuProcess,
    GpuSample,
    IbPort,
    KernelLogCount,
    MigSample,
    ModuleState,
    NicCounters,
    ServiceState,
    SystemSample,
)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def state_to_dict(state: HealthState) -> dict[str, Any]:
    """``state`` as dicts, lists and scalars (keys are strings, so it survives JSON)."""
    out: dict[str, Any] = _plain(state)
    return out


def _gpu_sample(d: Mapping[str, Any] | None) -> GpuSample | None:
    if d is None:
        return None
    arrays = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}  # per-link counters
    return GpuSample(
        **{
            **d,
            **arrays,
            "processes": tuple(GpuProcess(**p) for p in d.get("processes", ())),
            "mig": tuple(MigSample(**m) for m in d.get("mig", ())),
        }
    )


def _system(d: Mapping[str, Any] | None) -> SystemSample | None:
    if d is None:
        return None
    clock = d.get("clock")
    return SystemSample(
        **{
            **d,
            "disks": tuple(DiskUsage(**x) for x in d.get("disks", ())),
            "nics": tuple(NicCounters(**x) for x in d.get("nics", ())),
            "ib_ports": tuple(IbPort(**x) for x in d.get("ib_ports", ())),
            "kernel_log": tuple(KernelLogCount(**x) for x in d.get("kernel_log", ())),
            "modules": tuple(ModuleState(**x) for x in d.get("modules", ())),
            "services": tuple(ServiceState(**x) for x in d.get("services", ())),
            "clock": ClockSync(**clock) if clock is not None else None,
            "dstate_names": tuple(d.get("dstate_names", ())),
            "absent": tuple(d.get("absent", ())),
        }
    )


def _checks(d: Mapping[str, Any]) -> dict[str, CheckStatus]:
    return {k: CheckStatus(**{**c, "labels": dict(c["labels"])}) for k, c in d.items()}


def _gpu(d: Mapping[str, Any]) -> GpuState:
    return GpuState(
        **{
            **d,
            "labels": dict(d["labels"]),
            "last": _gpu_sample(d.get("last")),
            "xids": {int(k): XidRecord(**x) for k, x in d.get("xids", {}).items()},
            "fatal_xids": list(d.get("fatal_xids", [])),
            "checks": _checks(d.get("checks", {})),
        }
    )


def state_from_dict(d: Mapping[str, Any]) -> HealthState:
    """Rebuild a :class:`HealthState` saved with :func:`state_to_dict`."""
    hosts = {}
    for name, h in d.get("hosts", {}).items():
        hosts[name] = HostState(
            **{
                **h,
                "labels": dict(h["labels"]),
                "gpus": {int(k): _gpu(g) for k, g in h.get("gpus", {}).items()},
                "system": _system(h.get("system")),
                "checks": _checks(h.get("checks", {})),
                "ib_flaps": dict(h.get("ib_flaps", {})),
                "log_hits": {k: [list(x) for x in v] for k, v in h.get("log_hits", {}).items()},
            }
        )
    return HealthState(hosts=hosts, history=_history(d.get("history")))


def _history(d: Mapping[str, Any] | None) -> FleetHistory:
    if not d:
        return FleetHistory()
    h = FleetHistory.of(
        BoardHistory(
            **{
                **b,
                "boots": [(str(x), float(at)) for x, at in b.get("boots", [])],
                "fatal": [FatalXid(**e) for e in b.get("fatal", [])],
            }
        )
        for b in d.get("boards", {}).values()
    )
    h.slots = {k: (str(v[0]), str(v[1])) for k, v in d.get("slots", {}).items()}
    h.host_boots = {k: {str(a): str(b) for a, b in v.items()} for k, v in d.get("host_boots", {}).items()}
    h.dirty, h.deleted = dict.fromkeys(d.get("dirty", {})), dict.fromkeys(d.get("deleted", {}))
    return h
