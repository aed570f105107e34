"""Host checks (CPU, memory, swap, disks, load, file descriptors, interfaces) and the
agent's network checks (reachability and latency of configured targets)."""

from __future__ import annotations

from collections.abc import Mapping

from collector.health.config import HostThresholds, NetworkThresholds, NodeThresholds
from collector.health.model import (
    CRITICAL,
    HEALTHY,
    WARNING,
    Emitter,
    Extra,
    HostState,
    HostVerdicts,
    SystemMemo,
    Verdicts,
)
from collector.health.node import NodeChecks
from shared.frames import CheckResult, NicCounters, SystemSample


class HostChecks:
    """System and network checks with their thresholds."""

    fast = True  # the system sample's quiet fast path (a test turns it off to compare the verdicts)

    def __init__(
        self, cfg: HostThresholds, net: NetworkThresholds, node: NodeThresholds | None = None
    ) -> None:
        self.cfg = cfg
        self.net = net
        self.node = NodeChecks(node or NodeThresholds())
        # the checks of a level against two limits: check -> (warning, critical or None, what to do)
        self.levels: dict[str, tuple[float, float | None, str]] = {
            "host.cpu": (cfg.cpu_warning_pct, None, "find the runaway process"),
            "host.memory": (
                cfg.mem_warning_pct,
                cfg.mem_critical_pct,
                "free memory before the OOM killer does",
            ),
            "host.swap": (cfg.swap_warning_pct, cfg.swap_critical_pct, "reduce memory pressure"),
            "host.disk": (cfg.disk_warning_pct, cfg.disk_critical_pct, "clean up or grow the filesystem"),
            "host.load": (cfg.load_warning_per_core, cfg.load_critical_per_core, "look for stuck I/O"),
            "host.fds": (cfg.fds_warning_pct, cfg.fds_critical_pct, "find the leaking process"),
            "net.target": (net.latency_warning_ms, net.latency_critical_ms, "check the network path"),
        }
        # the value each level check is healthy below (the fast path's one comparison)
        self.below = {k: w if c is None else min(w, c) for k, (w, c, _) in self.levels.items()}

    def _level(self, v: Verdicts, host: str, check: str, value: float, what: str, extra: Extra = ()) -> None:
        warning, critical, todo = self.levels[check]
        if critical is not None and value >= critical:
            status, limit = CRITICAL, critical
        elif value >= warning:
            status, limit = WARNING, warning
        else:
            v.ok(check, value, extra)
            return
        v.bad(check, status, value, f"{host}: {what} (limit {limit:g}): {todo}", extra=extra)

    def system(self, em: Emitter, hs: HostState, base: Mapping[str, str], s: SystemSample, ts: float) -> None:
        """Evaluate one system sample; ``hs.system`` holds the previous one."""
        q = hs.system_quiet
        if q is not None:
            hs.system_quiet = None
            if self._quiet(em, hs, s, ts, q):
                hs.system_quiet = (s, q[1], q[2])
                hs.system, hs.system_ts = s, ts
                return
        v, host = HostVerdicts(em, hs, base, s, ts), hs.host
        if self.fast and em.event is None and em.sample is None:
            v.judged = []
        if s.cpu_pct is not None:
            self._level(v, host, "host.cpu", s.cpu_pct, f"CPU {s.cpu_pct:.0f}% busy")
        if s.mem_total_bytes and s.mem_available_bytes is not None:
            pct = (s.mem_total_bytes - s.mem_available_bytes) * 100.0 / s.mem_total_bytes
            self._level(v, host, "host.memory", pct, f"memory {pct:.0f}% used")
        if s.swap_total_bytes and s.swap_used_bytes is not None:
            pct = s.swap_used_bytes * 100.0 / s.swap_total_bytes
            self._level(v, host, "host.swap", pct, f"swap {pct:.0f}% used")
        for d in s.disks:
            if not d.total_bytes:
                continue
            pct = d.used_bytes * 100.0 / d.total_bytes
            self._level(v, host, "host.disk", pct, f"{d.mount} {pct:.0f}% full", (("mount", d.mount),))
        if s.load_5 is not None and s.cpu_count:
            per_core = s.load_5 / s.cpu_count
            self._level(v, host, "host.load", per_core, f"load {per_core:.1f} per core")
        if s.fds_open is not None and s.fds_max:
            pct = s.fds_open * 100.0 / s.fds_max
            self._level(v, host, "host.fds", pct, f"{s.fds_open} of {s.fds_max} file descriptors open")
        prev = v.prev
        before = {n.name: n for n in prev.nics} if prev is not None and v.dt > 0 else {}
        for nic in s.nics:
            old = before.get(nic.name)
            if old is None:
                v.judged = None  # no rate now, one next time: not the same checks
            self._nic(v, nic, old)
        self.node.evaluate(v)
        hs.system, hs.system_ts = s, ts
        if v.judged is not None:
            self._memo(v)

    def _memo(self, v: HostVerdicts) -> None:
        """After a full evaluation: remember the checks it judged if every one ended healthy
        and quiet (the next sample may then take :meth:`_quiet`)."""
        hs, s, prev = v.hs, v.s, v.prev
        if prev is None or not v.dt > 0 or v.judged is None:
            return
        if len({n.name for n in s.nics}) != len(s.nics):  # named twice: "before" kept one of them
            return
        if len({(p.device, p.port) for p in s.ib_ports}) != len(s.ib_ports):
            return
        checks, hf = hs.checks, v.em.healthy_for
        memo = []
        for local in dict.fromkeys(v.judged):
            cs = checks.get(local)
            if cs is None or cs.status != HEALTHY or cs.quiet < hf:
                return
            memo.append((local, cs))
        hs.system_quiet = (s, hs.gpu_model, memo)

    def _quiet(self, em: Emitter, hs: HostState, s: SystemSample, ts: float, q: SystemMemo) -> bool:
        """The system sample's fast path: ``True`` (each check dated ``ts``) when the full path
        would emit nothing. It holds when every check that judged the last sample ended healthy
        and quiet (:meth:`_memo`) and this sample has the same shape (the same values present,
        the same mounts and interfaces in the same order, so the full path would judge the same
        checks) and keeps each of them healthy: the levels below their limits, the interfaces'
        error and drop rates within theirs, and the node part as :meth:`NodeChecks.quiet` says.
        A test runs a fault schedule with and without it and compares every observation and
        every check's final state."""
        prev, last = hs.system, hs.system_ts
        if (
            not self.fast
            or q[0] is not prev
            or prev is None
            or last is None
            or not ts - last > 0
            or q[1] != hs.gpu_model
            or em.event is not None
            or em.sample is not None
        ):
            return False
        below, dt = self.below, ts - last
        x = s.cpu_pct
        if (x is None) != (prev.cpu_pct is None) or (x is not None and not x < below["host.cpu"]):
            return False
        total, avail = s.mem_total_bytes, s.mem_available_bytes
        has = bool(total and avail is not None)
        if has != bool(prev.mem_total_bytes and prev.mem_available_bytes is not None):
            return False
        if has and not (total - avail) * 100.0 / total < below["host.memory"]:  # type: ignore[operator]
            return False
        total, used = s.swap_total_bytes, s.swap_used_bytes
        has = bool(total and used is not None)
        if has != bool(prev.swap_total_bytes and prev.swap_used_bytes is not None):
            return False
        if has and not used * 100.0 / total < below["host.swap"]:  # type: ignore[operator]
            return False
        if len(s.disks) != len(prev.disks):
            return False
        limit = below["host.disk"]
        for d, p in zip(s.disks, prev.disks, strict=True):
            if d.mount != p.mount or (not d.total_bytes) != (not p.total_bytes):
                return False
            if d.total_bytes and not d.used_bytes * 100.0 / d.total_bytes < limit:
                return False
        has = bool(s.load_5 is not None and s.cpu_count)
        if has != bool(prev.load_5 is not None and prev.cpu_count):
            return False
        if has and not s.load_5 / s.cpu_count < below["host.load"]:  # type: ignore[operator]
            return False
        has = bool(s.fds_open is not None and s.fds_max)
        if has != bool(prev.fds_open is not None and prev.fds_max):
            return False
        if has and not s.fds_open * 100.0 / s.fds_max < below["host.fds"]:  # type: ignore[operator]
            return False
        nics, olds = s.nics, prev.nics
        if len(nics) != len(olds):
            return False
        cfg = self.cfg
        down_warns, max_errors, max_drops = cfg.nic_down_warns, cfg.nic_errors_per_min, cfg.nic_drops_per_min
        if nics and (max_errors < 0 or max_drops < 0):  # (a rate of 0 would warn)
            return False
        for n, o in zip(nics, olds, strict=True):
            if n.name != o.name or (n.up is False and down_warns):
                return False
            # counters equal to the last sample's: a rate of 0, within the limits checked above
            if (n.rx_errors != o.rx_errors or n.tx_errors != o.tx_errors) and _delta(
                n.rx_errors + n.tx_errors, o.rx_errors + o.tx_errors
            ) * 60.0 / dt > max_errors:
                return False
            if (n.rx_drops != o.rx_drops or n.tx_drops != o.tx_drops) and _delta(
                n.rx_drops + n.tx_drops, o.rx_drops + o.tx_drops
            ) * 60.0 / dt > max_drops:
                return False
        if not self.node.quiet(hs, s, prev):
            return False
        checks, hf = hs.checks, em.healthy_for
        for local, cs in q[2]:  # (a check the full path would judge: dated alike if it runs)
            if checks.get(local) is not cs or cs.status != HEALTHY or cs.quiet < hf:
                return False
            cs.at = ts
        iq = hs.ib_quiet  # the InfiniBand memo follows the ports it holds (dated above)
        if iq is not None and iq[2] is prev.ib_ports:
            hs.ib_quiet = (iq[0], iq[1], s.ib_ports, iq[3])
        return True

    def _nic(self, v: HostVerdicts, n: NicCounters, old: NicCounters | None) -> None:
        cfg, extra, host = self.cfg, (("nic", n.name),), v.hs.host
        if n.up is False and cfg.nic_down_warns:
            summary = f"{host}: interface {n.name} is down: check the cable and switch port"
            v.bad("host.nic", WARNING, 0.0, summary, extra=extra)
            return
        if old is None:
            if n.up is not None:
                v.ok("host.nic", 0.0, extra)
            return
        errors = _delta(n.rx_errors + n.tx_errors, old.rx_errors + old.tx_errors) * 60.0 / v.dt
        drops = _delta(n.rx_drops + n.tx_drops, old.rx_drops + old.tx_drops) * 60.0 / v.dt
        if errors > cfg.nic_errors_per_min or drops > cfg.nic_drops_per_min:
            what = f"{n.name} {errors:.0f} errors/min, {drops:.0f} drops/min"
            summary = f"{host}: {what}: check cable, optics and switch port"
            v.bad("host.nic", WARNING, errors + drops, summary, extra=extra)
        else:
            v.ok("host.nic", errors + drops, extra)

    def network(self, em: Emitter, hs: HostState, base: Mapping[str, str], c: CheckResult, ts: float) -> None:
        """Evaluate one network check result (TCP connect, NATS round trip)."""
        v, net, extra = Verdicts(em, hs.checks, base, ts), self.net, (("target", c.id),)
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
            v.bad("net.target", net.unreachable_status, None, summary, extra=extra)
            return
        if nats:
            hs.nats_failed_since = None
        if c.latency_ms is None:
            v.ok("net.target", None, extra)
            return
        what = f"{c.target or c.id} answers in {c.latency_ms:.0f} ms"
        self._level(v, hs.host, "net.target", c.latency_ms, what, extra)


def _delta(new: int, old: int) -> int:
    return new - old if new >= old else new
