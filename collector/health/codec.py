"""The health state as JSON-compatible data, and back.

An effects layer may persist it (so rates, XID windows and throttle durations survive a
collector restart) or rebuild it by replaying recent frames; either way the engine only
ever sees plain dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from collector.health.history import BoardHistory, FatalXid, FleetHistory
from collector.health.model import HEALTHY, CheckStatus, GpuState, HealthState, HostState, RateMark, XidRecord
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
            "rate_marks": [_mark(m) for m in d.get("rate_marks", [])],
        }
    )


def _mark(m: Sequence[Any]) -> RateMark:
    ts, sbe, replay, crc, rep, rec, crc_l, rep_l, rec_l = m
    return (float(ts), sbe, replay, crc, rep, rec, tuple(crc_l), tuple(rep_l), tuple(rec_l))


def state_from_dict(d: Mapping[str, Any]) -> HealthState:
    """Rebuild a :class:`HealthState` saved with :func:`health_snapshot` (a field it leaves
    out takes its default)."""
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
    h.dirty = dict.fromkeys(d.get("dirty", {}))
    h.deleted = {str(k): float(v or 0.0) for k, v in d.get("deleted", {}).items()}
    return h


def _lean_checks(checks: dict[str, CheckStatus], healthy_for: int) -> dict[str, Any]:
    """Only checks that are not healthy and quiet (the rest are recreated by the next sample)."""
    out = {}
    for name, c in checks.items():
        if c.status != HEALTHY or c.quiet < healthy_for:
            out[name] = {f: getattr(c, f) for f in CheckStatus.__slots__}
            out[name]["labels"] = dict(c.labels)
    return out


def _xid(x: XidRecord) -> dict[str, Any]:
    return {"code": x.code, "count": x.count, "first_at": x.first_at, "last_at": x.last_at}


def health_snapshot(state: HealthState, healthy_for: int) -> dict[str, Any]:
    """The health state as plain data, lean (what the collector persists): the fields of its
    dataclasses by name, but no last readings (rates start again after a restart: a rate
    over its limit from the second sample, a healthy one once seen for the rate window)
    and no healthy, quiet checks. At 500 hosts x 8 GPUs the whole state as data is ~30 MB
    and 1.5 s of CPU; this is a few hundred kB."""
    hosts = {}
    for name, hs in state.hosts.items():
        gpus = {}
        for i, gs in hs.gpus.items():
            gpus[str(i)] = {
                "index": gs.index, "uuid": gs.uuid, "labels": dict(gs.labels), "lost": gs.lost,
                "stale": gs.stale, "quiet": False, "throttle_since": gs.throttle_since,
                "event_reasons": gs.event_reasons,
                "xids": {str(c): _xid(x) for c, x in gs.xids.items()},
                "fatal_xids": list(gs.fatal_xids), "checks": _lean_checks(gs.checks, healthy_for),
                "rma_until": gs.rma_until, "rma_summary": gs.rma_summary, "rma_evidence": gs.rma_evidence,
            }  # fmt: skip
        hosts[name] = {
            "host": hs.host, "provider": hs.provider, "labels": dict(hs.labels), "boot_id": hs.boot_id,
            "last_sample_seq": hs.last_sample_seq, "recent_events": list(hs.recent_events),
            "boot_events": {b: list(e) for b, e in hs.boot_events.items()},
            "boot_sample_seq": dict(hs.boot_sample_seq),
            "last_frame_at": hs.last_frame_at, "interval_s": hs.interval_s,
            "first_expected_at": hs.first_expected_at, "expected_gpus": hs.expected_gpus,
            "inventory_gpus": hs.inventory_gpus, "stale": hs.stale, "gpus": gpus,
            "nats_failed_since": hs.nats_failed_since, "nvml_error": hs.nvml_error,
            "checks": _lean_checks(hs.checks, healthy_for),
        }  # fmt: skip
    return {"hosts": hosts}
