"""Prometheus metrics of the collector, built at scrape time from the in-memory state.

:class:`FleetCollector` is a prometheus-client custom collector: register it in a
:class:`prometheus_client.CollectorRegistry` you own (the API makes one per application;
never the global registry). Labels are bounded: ``provider``, ``host``, ``gpu`` (index) and
``uuid`` for per-GPU series; ``xid`` (a catalogue code) for XID counters; ``status``,
``state``, ``severity``, ``reason`` and ``channel`` come from small fixed sets.

Per GPU (``provider``, ``host``, ``gpu``, ``uuid``): temperature, utilisation, memory used
and total, power, ECC single/double-bit counters, health status, and XID counters by code:
eight series per GPU plus one per XID code seen. Health status gauges carry a rank:
0 healthy, 1 info, 2 unknown, 3 warning, 4 critical.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collector.health.model import RANK, STATUSES
from collector.health.rollup import FleetHealth
from collector.ingest import IngestStats
from shared.frames import GpuSample

if TYPE_CHECKING:
    from collector.service import CollectorService

GPU_LABELS: Final = ["provider", "host", "gpu", "uuid"]
# (metric name, help, GpuSample field, scale)
GPU_GAUGES: Final = (
    ("gpuwarden_gpu_temperature_celsius", "GPU core temperature.", "temp_c", 1.0),
    ("gpuwarden_gpu_utilization_ratio", "GPU utilisation (0-1).", "util_gpu_pct", 0.01),
    ("gpuwarden_gpu_memory_used_bytes", "GPU memory in use.", "mem_used_bytes", 1.0),
    ("gpuwarden_gpu_memory_total_bytes", "GPU memory size.", "mem_total_bytes", 1.0),
    ("gpuwarden_gpu_power_watts", "GPU power draw.", "power_w", 1.0),
)
GPU_COUNTERS: Final = (
    (
        "gpuwarden_gpu_ecc_sbe_errors",
        "Single-bit ECC errors since the driver loaded (volatile).",
        "ecc_sbe_volatile",
    ),
    (
        "gpuwarden_gpu_ecc_dbe_errors",
        "Double-bit ECC errors since the driver loaded (volatile).",
        "ecc_dbe_volatile",
    ),
)
RANK_HELP: Final = " (0 healthy, 1 info, 2 unknown, 3 warning, 4 critical)."


def _num(v: float) -> str:
    if math.isfinite(v):
        return repr(v)
    return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render_per_gpu(snap: Snapshot) -> bytes:
    """Text exposition of the per-GPU gauges, counters and health status of ``snap``."""
    labels: list[tuple[str, GpuSample]] = []
    for provider, host, gpus in snap.samples:
        p, h = _esc(provider), _esc(host)
        labels += [
            (f'{{provider="{p}",host="{h}",gpu="{g.index}",uuid="{_esc(g.uuid)}"}} ', g)
            for g in gpus
            if not g.lost
        ]
    out: list[str] = []
    for name, help_, f, scale in GPU_GAUGES:
        out.append(f"# HELP {name} {help_}\n# TYPE {name} gauge\n")
        out += [
            f"{name}{lbl}{_num(float(v) * scale)}\n" for lbl, g in labels if (v := getattr(g, f)) is not None
        ]
    for name, help_, f in GPU_COUNTERS:
        out.append(f"# HELP {name}_total {help_}\n# TYPE {name}_total counter\n")
        out += [
            f"{name}_total{lbl}{_num(float(v))}\n" for lbl, g in labels if (v := getattr(g, f)) is not None
        ]
    name = "gpuwarden_gpu_health_status"
    rank = {k: f"{v}.0" for k, v in RANK.items()}
    out.append(f"# HELP {name} GPU health{RANK_HELP}\n# TYPE {name} gauge\n")
    for host, hh in snap.fleet.hosts.items():
        p, h = _esc(hh.provider), _esc(host)
        out += [
            f'{name}{{provider="{p}",host="{h}",gpu="{gh.index}",uuid="{_esc(gh.uuid)}"}} {rank[gh.status]}\n'
            for gh in hh.gpus
        ]
    return "".join(out).encode()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape reads, taken on the event loop (cheap: references and small copies),
    so that rendering can run in a thread while the collector keeps changing its state."""

    samples: list[tuple[str, str, tuple[GpuSample, ...]]]  # provider, host, GPUs
    fleet: FleetHealth
    xids: dict[tuple[str, int], list[tuple[int, int]]]  # (host, gpu) -> [(code, count)]
    stats: dict[str, Any]
    ingest: IngestStats
    hosts: int
    agent_drops: list[tuple[str, str, int]]  # provider, host, agent.dropped_frames of its newest sample


class FleetCollector(Collector):
    """Yields the fleet's and the collector's metric families at scrape time."""

    def __init__(self, service: CollectorService) -> None:
        self.service = service
        self._primed: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        svc = self.service
        samples = [(hs.provider, hs.host, hs.sample.gpus) for hs in svc.state.hosts.values() if hs.sample]
        xids = {
            (name, i): sorted((c, r.count) for c, r in gs.xids.items())
            for name, eh in svc.alerting.health.hosts.items()
            for i, gs in eh.gpus.items()
            if gs.xids
        }
        st = copy.copy(svc.ingest.stats)
        st.rejected = Counter(st.rejected)
        st.gpu_entries_rejected = Counter(st.gpu_entries_rejected)
        from collector.api.live import LiveRollup  # collector.api imports this module

        fleet = LiveRollup.of(svc).current()
        drops = [
            (hs.provider, hs.host, hs.sample.agent.dropped_frames)
            for hs in svc.state.hosts.values()
            if hs.sample is not None and hs.sample.agent is not None
        ]
        return Snapshot(samples, fleet, xids, svc.alerting.stats, st, len(svc.state), drops)

    def prime(self) -> None:
        """Take the next scrape's snapshot now (on the event loop); ``collect`` uses it once."""
        self._primed = self.snapshot()

    def collect(self) -> Iterator[Metric]:
        snap, self._primed = self._primed, None
        if snap is None:
            snap = self.snapshot()
        yield from self._gpus(snap)
        yield from self._rollup(snap)
        yield from self._alerts(snap)
        yield from self._collector(snap)

    def _gpus(self, snap: Snapshot) -> Iterator[Metric]:
        yield from self._per_gpu(snap)
        yield from self._gpu_events(snap)

    def _per_gpu(self, snap: Snapshot) -> Iterator[Metric]:
        """The eight per-GPU families (what :func:`render_per_gpu` writes directly)."""
        gauges = [GaugeMetricFamily(n, h, labels=GPU_LABELS) for n, h, _, _ in GPU_GAUGES]
        counters = [CounterMetricFamily(n, h, labels=GPU_LABELS) for n, h, _ in GPU_COUNTERS]
        for provider, host, gpus in snap.samples:
            for g in gpus:
                if g.lost:
                    continue  # its last values are not current
                labels = [provider, host, str(g.index), g.uuid]
                for fam, (_, _, f, scale) in zip(gauges, GPU_GAUGES, strict=True):
                    v = getattr(g, f)
                    if v is not None:
                        fam.add_metric(labels, float(v) * scale)
                for cfam, (_, _, f) in zip(counters, GPU_COUNTERS, strict=True):
                    v = getattr(g, f)
                    if v is not None:
                        cfam.add_metric(labels, float(v))
        status = GaugeMetricFamily("gpuwarden_gpu_health_status", "GPU health" + RANK_HELP, labels=GPU_LABELS)
        for name, hh in snap.fleet.hosts.items():
            for gh in hh.gpus:
                status.add_metric([hh.provider, name, str(gh.index), gh.uuid], float(RANK[gh.status]))
        yield from gauges
        yield from counters
        yield status

    def _gpu_events(self, snap: Snapshot) -> Iterator[Metric]:
        xid = CounterMetricFamily(
            "gpuwarden_gpu_xid_errors", "XID errors seen, by code.", labels=[*GPU_LABELS, "xid"]
        )
        host_status = GaugeMetricFamily(
            "gpuwarden_host_health_status", "Host health" + RANK_HELP, labels=["provider", "host"]
        )
        for name, hh in snap.fleet.hosts.items():
            host_status.add_metric([hh.provider, name], float(RANK[hh.status]))
            for gh in hh.gpus:
                for code, count in snap.xids.get((name, gh.index), ()):
                    xid.add_metric([hh.provider, name, str(gh.index), gh.uuid, str(code)], float(count))
        dropped = CounterMetricFamily(
            "gpuwarden_agent_dropped_frames",
            "Frames the host's agent dropped from its full buffer while NATS was unreachable, "
            "since the agent started (from its newest sample): a gap, not a dead host.",
            labels=["provider", "host"],
        )
        for provider, host, n in snap.agent_drops:
            dropped.add_metric([provider, host], float(n))
        yield from (xid, host_status, dropped)

    def render(self) -> bytes:
        """The exposition text of :meth:`collect`, with the per-GPU families written directly
        (five times faster at 80,000 GPUs); uses the primed snapshot like ``collect``."""
        snap, self._primed = self._primed, None
        if snap is None:
            snap = self.snapshot()
        rest = _Families(
            [*self._gpu_events(snap), *self._rollup(snap), *self._alerts(snap), *self._collector(snap)]
        )
        return render_per_gpu(snap) + generate_latest(rest)

    def _rollup(self, snap: Snapshot) -> Iterator[Metric]:
        fleet = snap.fleet
        hosts = GaugeMetricFamily(
            "gpuwarden_provider_hosts", "Hosts by status.", labels=["provider", "status"]
        )
        gpus = GaugeMetricFamily("gpuwarden_provider_gpus", "GPUs by status.", labels=["provider", "status"])
        usable = GaugeMetricFamily(
            "gpuwarden_provider_gpus_usable", "GPUs that can take work.", labels=["provider"]
        )
        status = GaugeMetricFamily(
            "gpuwarden_provider_health_status", "Provider health" + RANK_HELP, labels=["provider"]
        )
        for name, p in fleet.providers.items():
            for s in STATUSES:
                hosts.add_metric([name, s], float(p.hosts_by_status.get(s, 0)))
                gpus.add_metric([name, s], float(p.gpus_by_status.get(s, 0)))
            usable.add_metric([name], float(p.gpus_usable))
            status.add_metric([name], float(RANK[p.status]))
        yield from (hosts, gpus, usable, status)

    def _alerts(self, snap: Snapshot) -> Iterator[Metric]:
        stats = snap.stats
        alerts = GaugeMetricFamily(
            "gpuwarden_alerts", "Alerts by state and severity.", labels=["state", "severity"]
        )
        for key, n in sorted(stats.get("alerts", {}).items()):
            state, _, severity = key.partition("/")
            alerts.add_metric([state, severity], float(n))
        yield alerts
        sent = CounterMetricFamily(
            "gpuwarden_notifications_sent", "Notifications delivered.", labels=["channel"]
        )
        failed = CounterMetricFamily(
            "gpuwarden_notifications_failed", "Notifications given up (dead letter).", labels=["channel"]
        )
        errors = CounterMetricFamily(
            "gpuwarden_notification_errors", "Failed delivery attempts.", labels=["channel"]
        )
        latency = GaugeMetricFamily(
            "gpuwarden_notification_latency_max_seconds",
            "Longest time from decision to delivery.",
            labels=["channel"],
        )
        for ch, s in sorted(stats.get("channels", {}).items()):
            sent.add_metric([ch], float(s["sent"]))
            failed.add_metric([ch], float(s["failed"]))
            errors.add_metric([ch], float(s["errors"]))
            latency.add_metric([ch], float(s["latency_max_s"]))
        yield from (sent, failed, errors, latency)
        yield CounterMetricFamily(
            "gpuwarden_alert_evaluations",
            "Alert engine evaluations.",
            value=float(stats.get("evaluations", 0)),
        )
        yield CounterMetricFamily(
            "gpuwarden_alert_transitions",
            "Alert state transitions.",
            value=float(stats.get("transitions", 0)),
        )
        yield GaugeMetricFamily(
            "gpuwarden_notification_backlog",
            "Notifications waiting in the outbox.",
            value=float(stats.get("outbox_backlog", 0)),
        )
        yield GaugeMetricFamily(
            "gpuwarden_stream_subscribers",
            "Live stream (WebSocket) clients.",
            value=float(stats.get("stream_subscribers", 0)),
        )
        yield from _remediation(stats.get("remediation", {}))
        own = stats.get("self", {})
        impaired = own.get("impaired_since")
        yield GaugeMetricFamily(
            "gpuwarden_collector_pipeline_impaired",
            "1 while the collector's own pipeline (NATS connection, PostgreSQL, ingest lag) is impaired.",
            value=1.0 if impaired is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "gpuwarden_collector_pipeline_impaired_since_seconds",
            "Unix time the collector's own pipeline became impaired (0 when it is not).",
            value=float(impaired or 0.0),
        )
        problem = GaugeMetricFamily(
            "gpuwarden_collector_self_problem",
            "The collector's own problems (collector.pipeline, collector.notify): 1 while raised.",
            labels=["check", "cause"],
        )
        for p in own.get("problems", ()):
            problem.add_metric([p["check"], p["cause"]], 1.0)
        yield problem
        yield CounterMetricFamily(
            "gpuwarden_collector_heartbeats",
            "Dead man's switch beats delivered.",
            value=float(stats.get("heartbeats_sent", 0)),
        )
        yield CounterMetricFamily(
            "gpuwarden_collector_heartbeat_failures",
            "Dead man's switch beats that failed.",
            value=float(stats.get("heartbeat_failures", 0)),
        )

    def _collector(self, snap: Snapshot) -> Iterator[Metric]:
        st = snap.ingest
        c = "gpuwarden_collector_"
        yield CounterMetricFamily(
            c + "frames_received", "Frames fetched from NATS.", value=float(st.frames_in)
        )
        yield CounterMetricFamily(c + "frames_stored", "New frames committed.", value=float(st.frames_stored))
        yield CounterMetricFamily(
            c + "frames_duplicate", "Frames already stored.", value=float(st.duplicates)
        )
        rejected = CounterMetricFamily(c + "frames_rejected", "Frames refused, by reason.", labels=["reason"])
        for reason, n in sorted(st.rejected.items()):
            rejected.add_metric([reason], float(n))
        yield rejected
        dropped = CounterMetricFamily(
            c + "gpu_entries_rejected", "GPU entries dropped from samples, by reason.", labels=["reason"]
        )
        for reason, n in sorted(st.gpu_entries_rejected.items()):
            dropped.add_metric([reason], float(n))
        yield dropped
        yield CounterMetricFamily(
            c + "hook_errors", "Batches a hook (state, health) failed on.", value=float(st.hook_errors)
        )
        yield CounterMetricFamily(c + "batches", "Batches committed.", value=float(st.batches))
        yield GaugeMetricFamily(
            c + "last_batch_size", "Frames in the last batch.", value=float(st.last_batch_size)
        )
        yield GaugeMetricFamily(
            c + "db_write_seconds", "Duration of the last batch write.", value=float(st.last_write_s)
        )
        yield GaugeMetricFamily(
            c + "commit_lag_seconds",
            "Stream time to commit of the last batch's oldest frame.",
            value=float(st.last_commit_lag_s),
        )
        yield GaugeMetricFamily(
            c + "consumer_pending_messages",
            "Messages waiting for this consumer.",
            value=float(st.consumer_pending),
        )
        yield CounterMetricFamily(
            c + "stream_lost_messages",
            "Messages the stream dropped (full: discard old, or aged out) before this collector got them.",
            value=float(st.stream_lost),
        )
        yield GaugeMetricFamily(
            c + "stream_max_bytes",
            "Size limit of the GPUWARDEN stream after reconciling at start (-1: none).",
            value=float(st.stream_max_bytes),
        )
        yield CounterMetricFamily(c + "db_errors", "Failed PostgreSQL writes.", value=float(st.db_errors))
        yield GaugeMetricFamily(
            c + "db_up", "1 when the last write succeeded.", value=1.0 if st.db_up else 0.0
        )
        yield GaugeMetricFamily(c + "hosts", "Hosts in the in-memory state.", value=float(snap.hosts))


def _remediation(r: dict[str, Any]) -> Iterator[Metric]:
    """Remediation (docs/remediation.md): actions by state, open circuit breakers, steps run."""
    actions = GaugeMetricFamily(
        "gpuwarden_remediation_actions",
        "Remediation actions held by the collector (open ones and recent final ones), by state.",
        labels=["state"],
    )
    for state, n in sorted(r.get("actions", {}).items()):
        actions.add_metric([state], float(n))
    breaker = GaugeMetricFamily(
        "gpuwarden_remediation_breaker_open",
        "1 while a provider's remediation circuit breaker is open.",
        labels=["provider"],
    )
    for provider, is_open in sorted(r.get("breakers", {}).items()):
        breaker.add_metric([provider], 1.0 if is_open else 0.0)
    yield from (actions, breaker)
    yield CounterMetricFamily(
        "gpuwarden_remediation_steps", "Remediation steps run.", value=float(r.get("steps", 0))
    )
    yield CounterMetricFamily(
        "gpuwarden_remediation_failed_steps",
        "Remediation steps that failed.",
        value=float(r.get("failed_steps", 0)),
    )
