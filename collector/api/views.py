"""JSON views of the in-memory fleet: providers, hosts, GPUs (latest readings and health),
and of the alert engine: alerts (folded under their root), incidents and silences.

Pure functions over :class:`collector.state.FleetState`, the health rollup and the alert
state; the routes in :mod:`collector.api.app` and the live stream call them. Unavailable
readings are ``null`` (never a sentinel).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from collector.alerts.config import FOREVER, Silence
from collector.alerts.model import Alert, Incident, plain
from collector.health import drivers
from collector.health.model import STATUSES, UNKNOWN
from collector.health.rollup import FleetHealth, GpuHealth, HostHealth, Problem, ProviderHealth
from collector.state import FleetHost, FleetState
from shared.frames import GpuInfo, GpuSample, SampleFrame, to_wire

GPU_READINGS: Final = (
    "util_gpu_pct",
    "util_mem_pct",
    "mem_total_bytes",
    "mem_used_bytes",
    "temp_c",
    "mem_temp_c",
    "power_w",
    "power_limit_w",
    "fan_pct",
    "clock_sm_mhz",
    "pstate",
    "ecc_sbe_volatile",
    "ecc_dbe_volatile",
    "ecc_sbe_aggregate",
    "ecc_dbe_aggregate",
    "retired_pages_sbe",
    "retired_pages_dbe",
    "remapped_rows_uncorrectable",
    "remap_pending",
    "remap_failure",
    "pcie_replay_count",
    "nvlink_crc_errors",
    "clock_event_reasons",
)


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(STATUSES, 0)


def driver_view(name: str, state: FleetState) -> dict[str, Any]:
    """The provider's NVIDIA driver versions (hosts per version), its majority and the hosts off it."""
    versions = []
    for host in state.providers.get(name, ()):
        h = state.hosts.get(host)
        inv = h.inventory if h is not None else None
        versions.append((host, inv.driver_version if inv is not None else None))
    counts, top, off = drivers.drift(versions)
    return {
        "driver_versions": counts,
        "driver_majority": top,
        "driver_drift": [{"host": h, "driver_version": v} for h, v in off],
    }


def provider_view(name: str, ph: ProviderHealth | None, state: FleetState) -> dict[str, Any]:
    return _provider_view(name, ph, state) | driver_view(name, state)


def _provider_view(name: str, ph: ProviderHealth | None, state: FleetState) -> dict[str, Any]:
    known = len(state.providers.get(name, ()))
    if ph is None:
        return {
            "name": name,
            "status": UNKNOWN,
            "hosts": known,
            "hosts_by_status": {**empty_counts(), UNKNOWN: known},
            "gpus": 0,
            "gpus_by_status": empty_counts(),
            "gpus_usable": 0,
            "usable_pct": 100.0,
            "critical_pct": 0.0,
        }
    return {
        "name": name,
        "status": ph.status,
        "hosts": ph.hosts,
        "hosts_by_status": dict(ph.hosts_by_status),
        "gpus": ph.gpus,
        "gpus_by_status": dict(ph.gpus_by_status),
        "gpus_usable": ph.gpus_usable,
        "usable_pct": round(ph.usable_pct, 3),
        "critical_pct": round(ph.critical_pct, 3),
    }


def provider_names(fleet: FleetHealth, state: FleetState) -> list[str]:
    return sorted(set(fleet.providers) | set(state.providers))


def host_names(fleet: FleetHealth, state: FleetState, provider: str | None) -> list[str]:
    if provider is None:
        return sorted(set(fleet.hosts) | set(state.hosts))
    names = {h for h, hh in fleet.hosts.items() if hh.provider == provider}
    names.update(state.providers.get(provider, ()))
    return sorted(names)


def host_summary(name: str, hh: HostHealth | None, hs: FleetHost | None) -> dict[str, Any]:
    """One row of the host list (kept small: the page draws 10,000 of them)."""
    provider = hh.provider if hh is not None else hs.provider if hs is not None else ""
    # another member's summary (a collector group) may know of a newer frame than this fleet state
    seen = max(hs.last_seen if hs is not None else 0.0, (hh.last_seen or 0.0) if hh is not None else 0.0)
    return {
        "name": name,
        "provider": provider,
        "status": hh.status if hh is not None else UNKNOWN,
        "stale": hh.stale if hh is not None else True,
        "last_seen": seen or None,
        "gpus": sum(hh.gpus_by_status.values())
        if hh is not None
        else (hs.gpu_count if hs is not None else 0),
        "gpus_by_status": dict(hh.gpus_by_status) if hh is not None else empty_counts(),
        "gpus_usable": hh.gpus_usable if hh is not None else 0,
    }


def problem_view(p: Problem) -> dict[str, Any]:
    return {
        "check": p.check,
        "status": p.status,
        "summary": p.summary,
        "advice": p.advice,
        "labels": dict(p.labels),
        "since": p.since,
    }


def _gpu_view(g: GpuSample | None, gh: GpuHealth | None, hs: FleetHost, index: int) -> dict[str, Any]:
    info = hs.gpu_info(index)
    out: dict[str, Any] = {
        "index": index,
        "uuid": (g.uuid if g is not None else None) or (gh.uuid if gh is not None else "") or "",
        "name": info.name if info is not None else None,
        "status": gh.status if gh is not None else UNKNOWN,
        "usable": gh.usable if gh is not None else False,
        "lost": bool(g.lost) if g is not None else (gh.lost if gh is not None else False),
        "stale": gh.stale if gh is not None else True,
        "readings": {k: (getattr(g, k) if g is not None else None) for k in GPU_READINGS},
        "xids": {},
        "processes": [
            {
                "pid": p.pid,
                "name": p.name,
                "used_mem_bytes": p.used_mem_bytes,
                "container": p.container,
                "gpu_instance_id": p.gpu_instance_id,
                "compute_instance_id": p.compute_instance_id,
            }
            for p in (g.processes if g is not None else ())
        ],  # fmt: skip
        "mig": _mig_view(g, info),
        "problems": [problem_view(p) for p in gh.problems] if gh is not None else [],
    }
    return out


def _mig_view(g: GpuSample | None, info: GpuInfo | None) -> list[dict[str, Any]]:
    """The GPU's MIG devices: profile and ids from the inventory, memory and utilisation from
    the latest sample, and the processes running in each."""
    now = {(m.gpu_instance_id, m.compute_instance_id): m for m in (g.mig if g is not None else ())}
    known = {(m.gpu_instance_id, m.compute_instance_id): m for m in (info.mig_instances if info else ())}
    out = []
    for key in sorted(set(known) | set(now)):
        inst, cur = known.get(key), now.get(key)
        out.append(
            {
                "gpu_instance_id": key[0],
                "compute_instance_id": key[1],
                "profile": inst.profile if inst is not None else None,
                "uuid": inst.uuid if inst is not None else None,
                "mem_total_bytes": (cur.mem_total_bytes if cur is not None else None)
                or (inst.mem_total_bytes if inst is not None else None),
                "mem_used_bytes": cur.mem_used_bytes if cur is not None else None,
                "util_gpu_pct": cur.util_gpu_pct if cur is not None else None,
                "pids": [
                    p.pid
                    for p in (g.processes if g is not None else ())
                    if (p.gpu_instance_id, p.compute_instance_id) == key
                ],
            }
        )
    return out


def _system_view(sample: SampleFrame | None) -> dict[str, Any] | None:
    if sample is None or sample.system is None:
        return None
    s = sample.system
    d = to_wire(s)
    return {k: v for k, v in d.items() if not isinstance(v, list | tuple)} | {
        "disks": d["disks"],
        "nics": d["nics"],
    }


def host_detail(
    name: str, hh: HostHealth | None, hs: FleetHost | None, xids: dict[int, dict[int, int]]
) -> dict[str, Any]:
    """The host page: its GPUs with readings and health, system sample, checks, recent events."""
    out = host_summary(name, hh, hs)
    samples = {g.index: g for g in (hs.gpus if hs is not None else ())}
    healths = {g.index: g for g in (hh.gpus if hh is not None else ())}
    gpus = []
    for index in sorted(set(samples) | set(healths)):
        assert hs is not None or index in healths
        view = _gpu_view(
            samples.get(index), healths.get(index), hs or FleetHost(name, out["provider"]), index
        )
        view["xids"] = {str(code): n for code, n in sorted(xids.get(index, {}).items())}
        gpus.append(view)
    sample = hs.sample if hs is not None else None
    out["sample_ts"] = sample.ts if sample is not None else None
    out["gpu_list"] = gpus
    out["system"] = _system_view(sample)
    out["checks"] = (
        [
            {"id": c.id, "kind": c.kind, "target": c.target, "ok": c.ok, "latency_ms": c.latency_ms,
             "error": c.error}
            for c in sample.checks
        ]
        if sample is not None
        else []
    )  # fmt: skip
    out["problems"] = [problem_view(p) for p in hh.problems] if hh is not None else []
    out["events"] = [
        {"ts": e.ts, "type": e.type, "gpu": e.gpu_index, "xid": e.xid, "count": e.count}
        for e in (hs.events if hs is not None else ())
    ]
    inv = hs.inventory if hs is not None else None
    out["driver_version"] = inv.driver_version if inv is not None else None
    outage = hs.outage if hs is not None else None
    out["publish_outage"] = (
        {"since": outage.since, "until": outage.until, "seconds": max(0.0, outage.until - outage.since),
         "buffered_frames": outage.buffered_frames, "dropped_frames": outage.dropped_frames}
        if outage is not None
        else None
    )  # fmt: skip
    return out


# ------------------------------------------------------------------ alerts, incidents, silences


def alert_view(a: Alert) -> dict[str, Any]:
    """An alert as the API and the live stream show it (``docs/api.md``)."""
    return {
        "id": a.fingerprint,
        "rule": a.rule,
        "labels": dict(a.labels),
        "severity": a.severity,
        "state": a.state,
        "flags": {
            "acknowledged": a.ack_by is not None,
            "silenced": bool(a.silenced_by),
            "inhibited": a.inhibited_by is not None,
            "flapping": a.flapping,
        },
        "silenced_by": list(a.silenced_by),
        "inhibited_by": a.inhibited_by,
        "summary": a.summary,
        "advice": a.advice,
        "value": a.value,
        "action": a.action,
        "started_at": a.started_at,
        "fired_at": a.fired_at,
        "resolved_at": a.resolved_at,
        "escalation": {"policy": a.policy, "level": a.level, "channels": list(a.told)},
        "incident": a.incident,
        "reason": a.reason or None,  # a resolution's reason: replaced, moved, forgotten, evicted
        "ack": (
            {
                "by": a.ack_by,
                "at": a.ack_at,
                "until": a.ack_until,
                "comment": a.ack_comment,
                "incident": a.ack_incident,
            }
            if a.ack_by is not None
            else None
        ),  # fmt: skip
    }


def _what(a: Alert) -> str:
    host = a.labels.get("host", "")
    if a.rule == "host.unreachable":
        return f"{host} unreachable"
    if a.rule == "gpu.lost":
        return f"{host} GPU {a.labels.get('gpu', '?')} lost"
    gpu = f" GPU {a.labels['gpu']}" if "gpu" in a.labels else ""
    return f"{host}{gpu} {a.rule}"


def group_text(root: Alert, folded: Sequence[Alert]) -> str:
    """``host-0012 unreachable · 8 GPUs stale``: the root and what it folds, counted by rule."""
    counts: dict[str, int] = {}
    for a in folded:
        counts[a.rule] = counts.get(a.rule, 0) + 1
    parts = [_what(root)]
    for rule, n in sorted(counts.items()):
        if rule == "gpu.stale":
            parts.append(f"{n} GPU{'s' if n > 1 else ''} stale")
        else:
            parts.append(f"{n} {rule}")
    return " · ".join(parts)


def folded_view(a: Alert, folded: Sequence[Alert]) -> dict[str, Any]:
    """An alert with the alerts it inhibits folded under it, as one item (one
    Acknowledge/Silence): ``group`` reads "host-0012 unreachable · 8 GPUs stale"."""
    v = alert_view(a)
    v["folded"] = [alert_view(x) for x in folded]
    v["group"] = group_text(a, folded)
    return v


def folded_views(alerts: Sequence[Alert], roots: Mapping[str, Sequence[Alert]]) -> list[dict[str, Any]]:
    """One item per root: alerts inhibited by an alert of ``alerts`` are folded under it
    (``roots``: root fingerprint -> the alerts it inhibits)."""
    present = {a.fingerprint for a in alerts}
    return [
        folded_view(a, roots.get(a.fingerprint, ()))
        for a in alerts
        if a.inhibited_by is None or a.inhibited_by not in present
    ]


def incident_view(inc: Incident, by_fp: Mapping[str, Alert]) -> dict[str, Any]:
    """The incident with its members: which are acknowledged (and through the incident)."""
    v = {**plain(inc), "open": inc.closed_at is None}
    members = []
    for fp in inc.alerts:
        a = by_fp.get(fp)
        if a is None:
            continue
        members.append(
            {"id": a.fingerprint, "rule": a.rule, "host": a.labels.get("host"),
             "gpu": a.labels.get("gpu"), "severity": a.severity, "state": a.state,
             "acknowledged": a.ack_by is not None, "ack_by": a.ack_by, "ack_incident": a.ack_incident,
             "inhibited_by": a.inhibited_by, "silenced": bool(a.silenced_by),
             "told_by_incident": fp in inc.covered}
        )  # fmt: skip
    live = [m for m in members if m["state"] != "resolved"]
    v["members"] = members
    v["acknowledged"] = bool(live) and all(m["acknowledged"] for m in live)
    v["unacknowledged"] = sum(1 for m in live if not m["acknowledged"])
    v["ack"] = {"by": inc.ack_by, "at": inc.ack_at} if inc.ack_by is not None else None
    return v


def silence_view(s: Silence, source: str, now: float) -> dict[str, Any]:
    """A silence; ``source`` is ``config`` or ``api``; ``ends_at`` is null for "forever"."""
    v = {**s.to_dict(), "source": source, "active": s.active(now)}
    if v["ends_at"] >= FOREVER:
        v["ends_at"] = None
    return v


def silence_views(config: Iterable[Silence], api: Iterable[Silence], now: float) -> list[dict[str, Any]]:
    return [silence_view(s, "config", now) for s in config] + [silence_view(s, "api", now) for s in api]
