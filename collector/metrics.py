"""Prometheus metrics of the collector, built at scrape time from the in-memory state.

:class:`FleetCollector` is a prometheus-client custom collector: register it in a
:class:`prometheus_client.CollectorRegistry` you own (the API makes one per application;
never the global registry). Labels are bounded: ``provider``, ``host``, ``gpu`` (index) and
``uuid`` for per-GPU series; ``xid`` (a catalogue code) for XID counters; ``status``,
``state``, ``severity``, ``reason`` and ``channel`` come from small fixed sets.

Health status gauges carry a rank: 0 healthy, 1 info, 2 unknown, 3 warning, 4 critical.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collector.health.model import RANK, STATUSES

if TYPE_CHECKING:
    from collector.service import CollectorService

GPU_LABELS: Final = ["provider", "host", "gpu", "uuid"]
# (metric name, help, GpuSample field, scale)
GPU_GAUGES: Final = (
    ("gpuwarden_gpu_temperature_celsius", "GPU core temperature.", "temp_c", 1.0),
    ("gpuwarden_gpu_memory_temperature_celsius", "GPU memory (HBM) temperature.", "mem_temp_c", 1.0),
    ("gpuwarden_gpu_utilization_ratio", "GPU utilisation (0-1).", "util_gpu_pct", 0.01),
    (
        "gpuwarden_gpu_memory_utilization_ratio",
        "GPU memory controller utilisation (0-1).",
        "util_mem_pct",
        0.01,
    ),
    ("gpuwarden_gpu_memory_used_bytes", "GPU memory in use.", "mem_used_bytes", 1.0),
    ("gpuwarden_gpu_memory_total_bytes", "GPU memory size.", "mem_total_bytes", 1.0),
    ("gpuwarden_gpu_power_watts", "GPU power draw.", "power_w", 1.0),
    ("gpuwarden_gpu_power_limit_watts", "GPU power limit.", "power_limit_w", 1.0),
    ("gpuwarden_gpu_sm_clock_hertz", "GPU SM clock.", "clock_sm_mhz", 1e6),
)
GPU_COUNTERS: Final = (
    ("gpuwarden_gpu_ecc_sbe_errors", "Single-bit ECC errors since the driver loaded (volatile).",
     "ecc_sbe_volatile"),
    ("gpuwarden_gpu_ecc_dbe_errors", "Double-bit ECC errors since the driver loaded (volatile).",
     "ecc_dbe_volatile"),
    ("gpuwarden_gpu_pcie_replays", "PCIe replay counter.", "pcie_replay_count"),
    ("gpuwarden_gpu_nvlink_crc_errors", "NVLink CRC errors, summed over links.", "nvlink_crc_errors"),
)  # fmt: skip
RANK_HELP: Final = " (0 healthy, 1 info, 2 unknown, 3 warning, 4 critical)."


class FleetCollector(Collector):
    """Yields the fleet's and the collector's metric families at scrape time."""

    def __init__(self, service: CollectorService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        yield from self._gpus()
        yield from self._rollup()
        yield from self._alerts()
        yield from self._collector()

    def _gpus(self) -> Iterator[Metric]:
        svc = self.service
        gauges = [GaugeMetricFamily(n, h, labels=GPU_LABELS) for n, h, _, _ in GPU_GAUGES]
        counters = [CounterMetricFamily(n, h, labels=GPU_LABELS) for n, h, _ in GPU_COUNTERS]
        lost = GaugeMetricFamily("gpuwarden_gpu_lost", "1 when the GPU fell off the bus.", labels=GPU_LABELS)
        fields = [(f, s) for _, _, f, s in GPU_GAUGES]
        cfields = [f for _, _, f in GPU_COUNTERS]
        for hs in svc.state.hosts.values():
            sample = hs.sample
            if sample is None:
                continue
            for g in sample.gpus:
                labels = [hs.provider, hs.host, str(g.index), g.uuid]
                lost.add_metric(labels, 1.0 if g.lost else 0.0)
                if g.lost:
                    continue  # its last values are not current
                for fam, (f, scale) in zip(gauges, fields, strict=True):
                    v = getattr(g, f)
                    if v is not None:
                        fam.add_metric(labels, float(v) * scale)
                for cfam, f in zip(counters, cfields, strict=True):
                    v = getattr(g, f)
                    if v is not None:
                        cfam.add_metric(labels, float(v))
        yield from gauges
        yield from counters
        yield lost
        xid = CounterMetricFamily(
            "gpuwarden_gpu_xid_errors", "XID errors seen, by code.", labels=[*GPU_LABELS, "xid"]
        )
        status = GaugeMetricFamily("gpuwarden_gpu_health_status", "GPU health" + RANK_HELP, labels=GPU_LABELS)
        usable = GaugeMetricFamily("gpuwarden_gpu_usable", "1 when the GPU can take work.", labels=GPU_LABELS)
        host_status = GaugeMetricFamily(
            "gpuwarden_host_health_status", "Host health" + RANK_HELP, labels=["provider", "host"]
        )
        fleet = svc.alerting.rollup()
        engine_hosts = svc.alerting.health.hosts
        for name, hh in fleet.hosts.items():
            host_status.add_metric([hh.provider, name], float(RANK[hh.status]))
            eh = engine_hosts.get(name)
            for gh in hh.gpus:
                labels = [hh.provider, name, str(gh.index), gh.uuid]
                status.add_metric(labels, float(RANK[gh.status]))
                usable.add_metric(labels, 1.0 if gh.usable else 0.0)
                gs = eh.gpus.get(gh.index) if eh is not None else None
                if gs is not None:
                    for code, rec in sorted(gs.xids.items()):
                        xid.add_metric([*labels, str(code)], float(rec.count))
        yield from (xid, status, usable, host_status)

    def _rollup(self) -> Iterator[Metric]:
        fleet = self.service.alerting.rollup()
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

    def _alerts(self) -> Iterator[Metric]:
        stats: dict[str, Any] = self.service.alerting.stats
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
            "gpuwarden_notification_backlog", "Notifications waiting in the outbox.",
            value=float(stats.get("outbox_backlog", 0)),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "gpuwarden_stream_subscribers", "Live stream (WebSocket) clients.",
            value=float(stats.get("stream_subscribers", 0)),
        )  # fmt: skip

    def _collector(self) -> Iterator[Metric]:
        st = self.service.ingest.stats
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
        yield CounterMetricFamily(c + "batches", "Batches committed.", value=float(st.batches))
        yield GaugeMetricFamily(
            c + "last_batch_size", "Frames in the last batch.", value=float(st.last_batch_size)
        )
        yield GaugeMetricFamily(
            c + "db_write_seconds", "Duration of the last batch write.", value=float(st.last_write_s)
        )
        yield GaugeMetricFamily(
            c + "commit_lag_seconds", "Stream time to commit of the last batch's oldest frame.",
            value=float(st.last_commit_lag_s),
        )  # fmt: skip
        yield GaugeMetricFamily(
            c + "consumer_pending_messages",
            "Messages waiting for this consumer.",
            value=float(st.consumer_pending),
        )
        yield CounterMetricFamily(c + "db_errors", "Failed PostgreSQL writes.", value=float(st.db_errors))
        yield GaugeMetricFamily(
            c + "db_up", "1 when the last write succeeded.", value=1.0 if st.db_up else 0.0
        )
        yield GaugeMetricFamily(
            c + "hosts", "Hosts in the in-memory state.", value=float(len(self.service.state))
        )
