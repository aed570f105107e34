"""Host checks (CPU, memory, swap, disks, load, file descriptors, interfaces) and the
agent's network checks (reachability and latency of configured targets)."""

from __future__ import annotations

from collections.abc import Mapping

from collector.health.config import HostThresholds, NetworkThresholds, NodeThresholds
from collector.health.model import CRITICAL, HEALTHY, WARNING, Emitter, HostState
from collector.health.node import NodeChecks
from shared.frames import CheckResult, NicCounters, SystemSample

_ADVICE = {
    "host.cpu": "CPU saturated: data loaders and the GPU driver starve; look for runaway processes.",
    "host.memory": "Host memory nearly exhausted: the OOM killer may take jobs or the agent; "
    "look at the largest processes.",
    "host.swap": "The host is swapping: jobs slow down badly; reduce memory use or add memory.",
    "host.disk": "The filesystem is nearly full: checkpoints, logs and containers will fail "
    "to write; clean up or grow it.",
    "host.load": "Load average per core is high: processes wait for CPU or I/O (look at "
    "iowait and stuck NFS mounts).",
    "host.fds": "Open file descriptors near the system limit: new connections and files will fail.",
    "host.nic": "The interface reports errors, drops or is down: check cables, optics, switch "
    "port and driver; collective operations will stall.",
    "net.target": "A configured network target is unreachable or slow from this host: check "
    "routing, firewalls and the target itself.",
}


class HostChecks:
    """System and network checks with their thresholds."""

    def __init__(
        self, cfg: HostThresholds, net: NetworkThresholds, node: NodeThresholds | None = None
    ) -> None:
        self.cfg = cfg
        self.net = net
        self.node = NodeChecks(node or NodeThresholds())

    def _level(
        self,
        em: Emitter,
        hs: HostState,
        base: Mapping[str, str],
        check: str,
        value: float,
        ts: float,
        *,
        warning: float,
        critical: float | None,
        what: str,
        todo: str,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if critical is not None and value >= critical:
            status, limit = CRITICAL, critical
        elif value >= warning:
            status, limit = WARNING, warning
        else:
            em.emit(hs.checks, check, base, HEALTHY, ts, value=value, extra=extra)
            return
        summary = f"{hs.host}: {what} (limit {limit:g}): {todo}"
        em.emit(
            hs.checks,
            check,
            base,
            status,
            ts,
            value=value,
            summary=summary,
            advice=_ADVICE[check],
            extra=extra,
        )

    def system(self, em: Emitter, hs: HostState, base: Mapping[str, str], s: SystemSample, ts: float) -> None:
        """Evaluate one system sample; ``hs.system`` holds the previous one."""
        cfg = self.cfg
        if s.cpu_pct is not None:
            self._level(
                em,
                hs,
                base,
                "host.cpu",
                s.cpu_pct,
                ts,
                warning=cfg.cpu_warning_pct,
                critical=None,
                what=f"CPU {s.cpu_pct:.0f}% busy",
                todo="find the runaway process",
            )
        if s.mem_total_bytes and s.mem_available_bytes is not None:
            pct = (s.mem_total_bytes - s.mem_available_bytes) * 100.0 / s.mem_total_bytes
            self._level(
                em,
                hs,
                base,
                "host.memory",
                pct,
                ts,
                warning=cfg.mem_warning_pct,
                critical=cfg.mem_critical_pct,
                what=f"memory {pct:.0f}% used",
                todo="free memory before the OOM killer does",
            )
        if s.swap_total_bytes and s.swap_used_bytes is not None:
            pct = s.swap_used_bytes * 100.0 / s.swap_total_bytes
            self._level(
                em,
                hs,
                base,
                "host.swap",
                pct,
                ts,
                warning=cfg.swap_warning_pct,
                critical=cfg.swap_critical_pct,
                what=f"swap {pct:.0f}% used",
                todo="reduce memory pressure",
            )
        for d in s.disks:
            if not d.total_bytes:
                continue
            pct = d.used_bytes * 100.0 / d.total_bytes
            self._level(
                em,
                hs,
                base,
                "host.disk",
                pct,
                ts,
                warning=cfg.disk_warning_pct,
                critical=cfg.disk_critical_pct,
                what=f"{d.mount} {pct:.0f}% full",
                todo="clean up or grow the filesystem",
                extra=(("mount", d.mount),),
            )
        if s.load_5 is not None and s.cpu_count:
            per_core = s.load_5 / s.cpu_count
            self._level(
                em,
                hs,
                base,
                "host.load",
                per_core,
                ts,
                warning=cfg.load_warning_per_core,
                critical=cfg.load_critical_per_core,
                what=f"load {per_core:.1f} per core",
                todo="look for stuck I/O",
            )
        if s.fds_open is not None and s.fds_max:
            pct = s.fds_open * 100.0 / s.fds_max
            self._level(
                em,
                hs,
                base,
                "host.fds",
                pct,
                ts,
                warning=cfg.fds_warning_pct,
                critical=cfg.fds_critical_pct,
                what=f"{s.fds_open} of {s.fds_max} file descriptors open",
                todo="find the leaking process",
            )
        prev = hs.system
        dt = ts - hs.system_ts if hs.system_ts is not None else 0.0
        before = {n.name: n for n in prev.nics} if prev is not None and dt > 0 else {}
        for nic in s.nics:
            self._nic(em, hs, base, nic, before.get(nic.name), dt, ts)
        self.node.evaluate(em, hs, base, s, prev, dt, ts)
        hs.system, hs.system_ts = s, ts

    def _nic(
        self,
        em: Emitter,
        hs: HostState,
        base: Mapping[str, str],
        n: NicCounters,
        old: NicCounters | None,
        dt: float,
        ts: float,
    ) -> None:
        cfg, extra = self.cfg, (("nic", n.name),)
        if n.up is False and cfg.nic_down_warns:
            em.emit(
                hs.checks,
                "host.nic",
                base,
                WARNING,
                ts,
                value=0.0,
                summary=f"{hs.host}: interface {n.name} is down: check the cable and switch port",
                advice=_ADVICE["host.nic"],
                extra=extra,
            )
            return
        if old is None:
            if n.up is not None:
                em.emit(hs.checks, "host.nic", base, HEALTHY, ts, value=0.0, extra=extra)
            return
        errors = _delta(n.rx_errors + n.tx_errors, old.rx_errors + old.tx_errors) * 60.0 / dt
        drops = _delta(n.rx_drops + n.tx_drops, old.rx_drops + old.tx_drops) * 60.0 / dt
        if errors > cfg.nic_errors_per_min or drops > cfg.nic_drops_per_min:
            em.emit(
                hs.checks,
                "host.nic",
                base,
                WARNING,
                ts,
                value=errors + drops,
                summary=f"{hs.host}: {n.name} {errors:.0f} errors/min, {drops:.0f} drops/min: check cable, "
                "optics and switch port",
                advice=_ADVICE["host.nic"],
                extra=extra,
            )
        else:
            em.emit(hs.checks, "host.nic", base, HEALTHY, ts, value=errors + drops, extra=extra)

    def network(self, em: Emitter, hs: HostState, base: Mapping[str, str], c: CheckResult, ts: float) -> None:
        """Evaluate one network check result (TCP connect, NATS round trip)."""
        net, extra = self.net, (("target", c.id),)
        nats = c.kind == "nats_rtt"
        if not c.ok:
            if nats:
                # The frame carrying this result came over NATS, so the path works now: a failed
                # round trip alone is judged only when it has failed for nats_sustained in a row.
                since = hs.nats_failed_since
                if since is None or ts < since:
                    hs.nats_failed_since = since = ts
                if ts - since < net.nats_sustained:
                    return
                summary = (
                    f"{hs.host}: NATS round trip failing for {ts - since:.0f} s ({c.error or 'failed'}): "
                    "check the network path to NATS"
                )
            else:
                what = f"{c.target or c.id} ({c.error or 'failed'})"
                summary = f"{hs.host} cannot reach {what}: check the network path"
            em.emit(
                hs.checks,
                "net.target",
                base,
                net.unreachable_status,
                ts,
                value=None,
                summary=summary,
                advice=_ADVICE["net.target"],
                extra=extra,
            )
            return
        if nats:
            hs.nats_failed_since = None
        if c.latency_ms is None:
            em.emit(hs.checks, "net.target", base, HEALTHY, ts, value=None, extra=extra)
            return
        self._level(
            em,
            hs,
            base,
            "net.target",
            c.latency_ms,
            ts,
            warning=net.latency_warning_ms,
            critical=net.latency_critical_ms,
            what=f"{c.target or c.id} answers in {c.latency_ms:.0f} ms",
            todo="check the network path",
            extra=extra,
        )


def _delta(new: int, old: int) -> int:
    return new - old if new >= old else new
