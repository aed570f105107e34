"""Rollups: GPU -> host -> provider, with counts by status and usable GPU capacity.

A GPU's status is the worst of its checks (``critical`` when lost, ``unknown`` when its
host is stale or it stopped appearing in samples). A host's is the worst of its GPUs and its
own checks, or ``unknown`` when it is stale or never reported. A GPU is *usable* when it is
neither critical nor lost and its data is current (not ``unknown``). A provider's status
comes from the share of its GPUs that are critical (``[health.provider]`` thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collector.health.config import ProviderThresholds
from collector.health.model import (
    CRITICAL,
    HEALTHY,
    RANK,
    STATUSES,
    UNKNOWN,
    WARNING,
    CheckStatus,
    GpuState,
    HealthState,
    HostState,
)


@dataclass(frozen=True, slots=True)
class Problem:
    """One check that is not healthy."""

    check: str
    status: str
    summary: str
    advice: str
    labels: dict[str, str]
    since: float


@dataclass(frozen=True, slots=True)
class GpuHealth:
    index: int
    uuid: str
    status: str
    usable: bool
    lost: bool
    stale: bool  # the last values are not current
    problems: tuple[Problem, ...]


@dataclass(frozen=True, slots=True)
class HostHealth:
    host: str
    provider: str
    status: str
    stale: bool
    gpus: tuple[GpuHealth, ...]
    gpus_by_status: dict[str, int]
    gpus_usable: int
    problems: tuple[Problem, ...]  # host-level checks (system, network, unreachable, missing GPUs)
    # a collector group's fleet view (collector/group/fleet.py): another member's summary of
    # the host (no GPU detail), when it reported last, and which member judged it
    last_seen: float | None = None
    via: str = ""


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    provider: str
    status: str
    hosts: int
    hosts_by_status: dict[str, int]
    gpus: int
    gpus_by_status: dict[str, int]
    gpus_usable: int
    usable_pct: float  # 0..100 (100 when the provider has no GPUs)
    critical_pct: float  # share of GPUs that are critical, 0..100


@dataclass(frozen=True, slots=True)
class FleetHealth:
    providers: dict[str, ProviderHealth] = field(default_factory=dict)
    hosts: dict[str, HostHealth] = field(default_factory=dict)


def _problems(checks: dict[str, CheckStatus]) -> tuple[Problem, ...]:
    out = [
        Problem(cs.check, cs.status, cs.summary, cs.advice, cs.labels, cs.since)
        for cs in checks.values()
        if cs.status != HEALTHY
    ]
    out.sort(key=lambda p: (-RANK[p.status], p.check))
    return tuple(out)


def gpu_health(gs: GpuState, host_stale: bool) -> GpuHealth:
    problems = _problems(gs.checks)
    stale = host_stale or gs.stale or gs.lost
    if gs.lost:
        status = CRITICAL
    elif host_stale or gs.stale:
        status = UNKNOWN
    else:
        status = max((p.status for p in problems), key=RANK.__getitem__, default=HEALTHY)
        if status == UNKNOWN:  # a stale-data check left over: current data says otherwise
            status = HEALTHY
    usable = status not in (CRITICAL, UNKNOWN) and not gs.lost
    return GpuHealth(gs.index, gs.uuid, status, usable, gs.lost, stale, problems)


def host_health(hs: HostState) -> HostHealth:
    stale = hs.stale or hs.last_frame_at is None
    gpus = tuple(gpu_health(gs, stale) for _, gs in sorted(hs.gpus.items()))
    problems = _problems(hs.checks)
    by_status = dict.fromkeys(STATUSES, 0)
    for g in gpus:
        by_status[g.status] += 1
    if stale:
        status = UNKNOWN
    else:
        ranks = [RANK[g.status] for g in gpus] + [RANK[p.status] for p in problems]
        status = STATUSES[len(STATUSES) - 1 - max(ranks, default=0)]
    return HostHealth(
        hs.host, hs.provider, status, stale, gpus, by_status, sum(g.usable for g in gpus), problems
    )


def provider_status(critical_pct: float, gpus: int, hosts_unknown: int, cfg: ProviderThresholds) -> str:
    """Provider status from the share of critical GPUs; ``unknown`` when no GPU ever reported."""
    if gpus == 0:
        return UNKNOWN if hosts_unknown else HEALTHY
    if critical_pct > cfg.critical_gpu_pct:
        return CRITICAL
    if critical_pct > cfg.warning_gpu_pct:
        return WARNING
    return HEALTHY


def rollup(state: HealthState, cfg: ProviderThresholds) -> FleetHealth:
    """The health of every host and provider in ``state``."""
    hosts = {name: host_health(hs) for name, hs in sorted(state.hosts.items())}
    grouped: dict[str, list[HostHealth]] = {}
    for h in hosts.values():
        grouped.setdefault(h.provider, []).append(h)
    providers = {}
    for name, members in sorted(grouped.items()):
        hosts_by = dict.fromkeys(STATUSES, 0)
        gpus_by = dict.fromkeys(STATUSES, 0)
        for h in members:
            hosts_by[h.status] += 1
            for s, n in h.gpus_by_status.items():
                gpus_by[s] += n
        total = sum(gpus_by.values())
        usable = sum(h.gpus_usable for h in members)
        crit = gpus_by[CRITICAL] * 100.0 / total if total else 0.0
        status = provider_status(crit, total, hosts_by[UNKNOWN], cfg)
        providers[name] = ProviderHealth(
            name,
            status,
            len(members),
            hosts_by,
            total,
            gpus_by,
            usable,
            usable * 100.0 / total if total else 100.0,
            crit,
        )
    return FleetHealth(providers, hosts)
