"""Node checks: InfiniBand ports, kernel-log classes, NVSwitch SXids, kernel modules, systemd
services, clock synchronisation, read-only mounts and inodes, D-state processes.

They judge the node part of a system sample (``SystemSample.ib_ports`` … ``dstate_procs``).
A source the sample does not carry (an old agent, or a node without IB, NVSwitch, systemd or
a readable kernel log: the sample's ``absent``) gives no observation, never a failure.
Counters and kernel-log counts are judged by their increase since the host's previous sample.
"""

from __future__ import annotations

from collections.abc import Mapping

from collector.health.advice import ADVICE
from collector.health.config import NodeThresholds, expected_ib
from collector.health.model import CRITICAL, HEALTHY, WARNING, Extra, HostState, HostVerdicts
from shared.frames import IbPort, KernelLogCount, SystemSample
from shared.sxid import SxidInfo, catalog, is_fatal, lookup

# class -> (status when over its threshold, what it is, advice)
KMSG_CLASSES: dict[str, tuple[str, str, str]] = {
    "nvme_timeout": (
        WARNING, "NVMe I/O timeouts",
        "The NVMe drive does not answer in time: check its SMART log (nvme smart-log), firmware and "
        "seating; replace it if the timeouts repeat.",
    ),
    "nvme_reset": (
        CRITICAL, "NVMe controller resets failing",
        "An NVMe controller could not be reset or was removed: the data on it is unreachable; drain "
        "the node, reseat or replace the drive.",
    ),
    "fs_error": (
        CRITICAL, "file-system errors",
        "ext4/XFS found corruption or I/O errors: drain, unmount and run fsck / xfs_repair, and check "
        "the disk underneath.",
    ),
    "fs_readonly": (
        CRITICAL, "a file system was remounted read-only",
        "The kernel remounted a file system read-only after errors: jobs cannot write checkpoints; "
        "drain, fsck and remount it.",
    ),
    "oom_kill": (
        WARNING, "OOM kills",
        "The kernel killed processes for lack of memory: jobs died; check the memory limits of the "
        "jobs and their containers.",
    ),
    "hung_task": (
        WARNING, "hung tasks",
        "Tasks were blocked for more than 120 s, usually on stuck I/O (NFS, a failing disk, a driver "
        "call): find what they wait on (dmesg, /proc/<pid>/stack).",
    ),
    "soft_lockup": (
        CRITICAL, "CPU soft or hard lockups",
        "A CPU stayed in the kernel for tens of seconds (a driver bug or a hardware fault): the node "
        "is unreliable; drain and reboot, check firmware and drivers.",
    ),
    "mce": (
        CRITICAL, "machine-check / CPER hardware errors",
        "The CPU, memory or a platform device reported hardware errors: decode them with rasdaemon "
        "or mcelog to find the DIMM or CPU; replace it if they repeat.",
    ),
    "aer_corrected": (
        WARNING, "PCIe corrected errors (AER)",
        "PCIe links report many corrected errors: a degrading link (riser, cable, slot); find the "
        "device in dmesg and reseat it before it fails.",
    ),
    "aer_uncorrected": (
        CRITICAL, "PCIe uncorrected errors (AER)",
        "A PCIe device reported an uncorrectable error and may have stopped working (GPU, NIC, "
        "NVMe): drain, reseat, check firmware.",
    ),
    "mlx5_error": (
        WARNING, "ConnectX (mlx5) adapter errors",
        "The ConnectX adapter reported command, cable-module or slot-power errors: check the "
        "transceiver, the cable and the slot power; update its firmware.",
    ),
    "peermem": (
        WARNING, "nvidia-peermem errors",
        "GPUDirect RDMA (nvidia-peermem) failed: NCCL over InfiniBand slows down or fails; check "
        "that nvidia_peermem matches the driver and reload it.",
    ),
}  # fmt: skip


_IB_ERRORS = (
    "symbol_error",
    "link_error_recovery",
    "port_rcv_errors",
    "port_rcv_remote_physical_errors",
    "local_link_integrity_errors",
    "excessive_buffer_overrun_errors",
)
_DOWN_STATES = frozenset({"failed", "inactive", "deactivating"})


def _delta(new: int | None, old: int | None) -> int:
    if new is None or old is None:
        return 0
    return new - old if new >= old else new  # reset (driver reload, agent restart): new is the delta


def _ib_errors(p: IbPort) -> int:
    # the counters of _IB_ERRORS, spelled out: this runs for every port of every sample
    return (
        (p.symbol_error or 0)
        + (p.link_error_recovery or 0)
        + (p.port_rcv_errors or 0)
        + (p.port_rcv_remote_physical_errors or 0)
        + (p.local_link_integrity_errors or 0)
        + (p.excessive_buffer_overrun_errors or 0)
    )


def _log_key(k: KernelLogCount) -> str:
    return f"sxid:{k.code}" if k.name == "sxid" else f"kmsg:{k.name}"


class NodeChecks:
    """The node checks with their thresholds (``[health.node]``)."""

    fast = True  # the InfiniBand quiet fast path (a test turns it off to compare the verdicts)

    def __init__(self, cfg: NodeThresholds, sxids: Mapping[int, SxidInfo] | None = None) -> None:
        self.cfg = cfg
        self.sxids = dict(sxids) if sxids is not None else catalog()

    def evaluate(self, v: HostVerdicts) -> None:
        """Judge the node part of ``v.s`` (``v.prev``: the host's previous sample, ``v.dt`` s before)."""
        s = v.s
        if s.ib_ports:
            self._ib(v, v.prev if v.dt > 0 else None)
        self._log(v)
        self._modules_services(v)
        self._clock(v)
        self._mounts(v)
        if s.dstate_procs is not None and self.cfg.dstate_warning:
            n = s.dstate_procs
            status = (
                CRITICAL
                if self.cfg.dstate_critical and n >= self.cfg.dstate_critical
                else WARNING
                if n >= self.cfg.dstate_warning
                else HEALTHY
            )
            if status == HEALTHY:
                v.ok("host.dstate", float(n))
            else:
                names = ", ".join(s.dstate_names) or "?"
                summary = (
                    f"{v.hs.host}: {n} processes stuck in D state ({names}): find the hung mount or device"
                )
                v.bad("host.dstate", status, float(n), summary)

    def quiet(self, hs: HostState, s: SystemSample, prev: SystemSample) -> bool:
        """The node part of the system sample's quiet fast path (:meth:`HostChecks.system`):
        ``True`` when judging ``s`` after ``prev`` (a sample of the same shape, whose checks all
        ended healthy and quiet) would judge the same checks, all healthy again. The InfiniBand
        ports, kernel-log counts, modules and services must equal ``prev``'s (so every delta is
        0 and every state is the one judged healthy), with no flap pending and no kernel-log
        hit still counted; the clock, mounts and D-state processes are held to the thresholds
        of the checks below. Any doubt returns ``False`` and the full checks run."""
        cfg = self.cfg
        if s.ib_ports != prev.ib_ports or (s.ib_ports and (hs.ib_flaps or cfg.ib_errors_per_min < 0.0)):
            return False
        if hs.log_hits or s.kernel_log != prev.kernel_log:
            return False
        if s.modules != prev.modules or s.services != prev.services:
            return False
        c = s.clock
        if (c is None) != (prev.clock is None):
            return False
        if c is not None:
            skew = abs(c.offset_s) if c.offset_s is not None else None
            if skew is not None and (
                skew >= cfg.clock_offset_critical_s or skew >= cfg.clock_offset_warning_s
            ):
                return False
            if c.synced is False and cfg.clock_unsynced_warns:
                return False
        disks, before = s.disks, prev.disks
        if len(disks) != len(before):
            return False
        for d, p in zip(disks, before, strict=True):
            if d.mount != p.mount or (d.readonly is None) != (p.readonly is None):
                return False
            if d.readonly and d.mount not in cfg.readonly_ignore:
                return False
            has = bool(d.inodes_total and d.inodes_used is not None)
            if has != bool(p.inodes_total and p.inodes_used is not None):
                return False
            if has and d.inodes_used * 100.0 / d.inodes_total >= cfg.inodes_warning_pct:  # type: ignore[operator]
                return False
        n = s.dstate_procs
        if (n is not None) != (prev.dstate_procs is not None):
            return False
        return not (
            n is not None
            and cfg.dstate_warning
            and ((cfg.dstate_critical and n >= cfg.dstate_critical) or n >= cfg.dstate_warning)
        )

    # ------------------------------------------------------------------ InfiniBand

    def _ib(self, v: HostVerdicts, prev: SystemSample | None) -> None:
        cfg, hs, s, host = self.cfg, v.hs, v.s, v.hs.host
        want_ports, want_rate = expected_ib(cfg, hs.gpu_model)
        if self._ib_quiet(v, prev, want_ports, want_rate):
            if v.judged is not None and hs.ib_quiet is not None:
                v.judged += (local for local, _ in hs.ib_quiet[3])
            return
        before = {(p.device, p.port): p for p in prev.ib_ports} if prev is not None else {}
        ib = [p for p in s.ib_ports if p.link_layer == "InfiniBand"]
        if want_ports:
            if len(ib) < want_ports:
                summary = (
                    f"{host}: {len(ib)} InfiniBand ports, this host class has {want_ports}: find "
                    "the missing HCA (lspci, mst status)"
                )
                v.bad("host.ib_ports", WARNING, float(len(ib)), summary)
            else:
                v.ok("host.ib_ports", float(len(ib)))
        for p in s.ib_ports:
            name = f"{p.device}/{p.port}"
            extra = (("port", name),)
            down = p.state not in (None, "ACTIVE") or p.phys_state not in (None, "LinkUp")
            if down:
                summary = (
                    f"{host}: InfiniBand port {name} is {p.state} ({p.phys_state}): check the "
                    "cable, transceiver and switch port"
                )
                v.bad("host.ib_port", cfg.ib_down_status, 0.0, summary, extra=extra)
            elif (
                p.link_layer == "InfiniBand"
                and want_rate
                and p.rate_gbps is not None
                and p.rate_gbps < want_rate
            ):
                summary = (
                    f"{host}: InfiniBand port {name} links at {p.rate_gbps:g} Gb/s, expected "
                    f"{want_rate:g}: reseat or replace the cable"
                )
                v.bad("host.ib_port", WARNING, p.rate_gbps, summary, extra=extra)
            else:
                v.ok("host.ib_port", p.rate_gbps, extra)
            old = before.get((p.device, p.port))
            if old is None:
                v.judged = None  # no error rate now, one next time: not the same checks
            else:
                rate = _delta(_ib_errors(p), _ib_errors(old)) * 60.0 / v.dt
                if rate > cfg.ib_errors_per_min:
                    summary = (
                        f"{host}: InfiniBand port {name} counts {rate:.0f} link errors/min: "
                        "check or replace the cable"
                    )
                    v.bad("host.ib_errors", WARNING, rate, summary, extra=extra)
                else:
                    v.ok("host.ib_errors", rate, extra)
                if not down and _delta(p.link_downed, old.link_downed) > 0:
                    hs.ib_flaps[name] = v.at
            self._flap(v, name, extra)
        self._ib_memo(v, prev, want_ports, want_rate, len(before))

    def _ib_quiet(
        self, v: HostVerdicts, prev: SystemSample | None, want_ports: int | None, want_rate: float | None
    ) -> bool:
        """The InfiniBand fast path: ``True`` (each check dated ``v.at``) when the full path would
        emit nothing. It holds when the last sample's IB checks all ended healthy and quiet
        (:meth:`_ib_memo`) and this sample's ports equal that sample's, field by field, under
        the same expected count and rate: every counter's delta is 0 (rate 0, no new
        ``link_downed``), every state and rate is the one judged healthy, no flap is pending;
        so the full path would only set ``cs.at`` of the same checks (a test compares both)."""
        hs, em, s = v.hs, v.em, v.s
        q = hs.ib_quiet
        hs.ib_quiet = None
        if (
            q is None
            or not self.fast
            or prev is None
            or q[2] is not prev.ib_ports
            or q[0] != want_ports
            or q[1] != want_rate
            or hs.ib_flaps
            or em.event is not None
            or em.sample is not None
            or s.ib_ports != q[2]
        ):
            return False
        checks, hf = hs.checks, em.healthy_for
        for local, cs in q[3]:
            if checks.get(local) is not cs or cs.status != HEALTHY or cs.quiet < hf:
                return False
        for _, cs in q[3]:
            cs.at = v.at
        hs.ib_quiet = (want_ports, want_rate, s.ib_ports, q[3])
        return True

    def _ib_memo(
        self,
        v: HostVerdicts,
        prev: SystemSample | None,
        want_ports: int | None,
        want_rate: float | None,
        distinct_before: int,
    ) -> None:
        """After a full evaluation: remember the IB checks if every one ended healthy and quiet
        (the next sample may then take :meth:`_ib_quiet`)."""
        hs, s = v.hs, v.s
        if (
            not self.fast
            or prev is None
            or hs.ib_flaps
            or self.cfg.ib_errors_per_min < 0
            or distinct_before != len(prev.ib_ports)  # ports named twice: "before" kept one of them
            or len({(p.device, p.port) for p in s.ib_ports}) != len(s.ib_ports)
        ):
            return
        checks, hf = hs.checks, v.em.healthy_for
        keys = ["host.ib_ports"] if want_ports else []
        for p in s.ib_ports:
            name = f"{p.device}/{p.port}"
            keys += ("host.ib_port:" + name, "host.ib_errors:" + name, "host.ib_flap:" + name)
        memo = []
        for local in keys:
            cs = checks.get(local)
            if cs is None or cs.status != HEALTHY or cs.quiet < hf:
                return
            memo.append((local, cs))
        hs.ib_quiet = (want_ports, want_rate, s.ib_ports, memo)

    def _flap(self, v: HostVerdicts, name: str, extra: Extra) -> None:
        hs, ts = v.hs, v.at
        at = hs.ib_flaps.get(name)
        if at is not None and ts - at < self.cfg.ib_flap_window:
            summary = (
                f"{hs.host}: InfiniBand port {name} went down and came back {ts - at:.0f} s ago: "
                "check the cable and switch port for flapping"
            )
            v.bad("host.ib_flap", WARNING, ts - at, summary, extra=extra)
            return
        hs.ib_flaps.pop(name, None)
        v.ok("host.ib_flap", None, extra)

    # ------------------------------------------------------------------ kernel log and SXids

    def _log(self, v: HostVerdicts) -> None:
        hs, s, prev, ts = v.hs, v.s, v.prev, v.at
        if not s.kernel_log and not hs.log_hits:
            return
        cfg = self.cfg
        before = {_log_key(k): k.count for k in prev.kernel_log} if prev is not None else None
        judged: set[str] = set()
        for k in s.kernel_log:
            key = _log_key(k)
            if key in judged:
                v.judged = None  # a class named twice: its deltas are not all 0 next time
            judged.add(key)
            if before is not None:
                n = _delta(k.count, before.get(key, 0))
                if n > 0:
                    hits = hs.log_hits.setdefault(key, [])
                    hits.append([ts, float(n)])
                    if len(hits) > 512:  # bounded: merge the oldest
                        hits[1][1] += hits[0][1]
                        del hits[0]
            if k.name == "sxid":
                self._sxid(v, k)
            elif k.name in KMSG_CLASSES:
                self._kmsg(v, k)
        # A class that is failing but no longer in the sample (the agent restarted: its counts
        # start again from nothing) is still judged, so it clears when its lines age out.
        for local, cs in list(hs.checks.items()):
            if cs.status == HEALTHY:
                continue
            if local.startswith("host.kmsg:") and f"kmsg:{local[10:]}" not in judged:
                v.judged = None  # judged now, not once healthy: not the same checks next time
                self._kmsg(v, KernelLogCount(local[10:], None, 0, None, None))
            elif (
                local.startswith("host.sxid:") and f"sxid:{local[10:]}" not in judged and local[10:].isdigit()
            ):
                v.judged = None
                said = cs.status == CRITICAL  # as it was judged while its line was in the samples
                self._sxid(v, KernelLogCount("sxid", int(local[10:]), 0, said, None))
        window = max(cfg.kmsg_window, cfg.sxid_window)
        for key in [k for k, hits in hs.log_hits.items() if not hits or ts - hits[-1][0] >= window]:
            del hs.log_hits[key]

    def _recent(self, hs: HostState, key: str, window: float, ts: float) -> float:
        hits = hs.log_hits.get(key)
        if not hits:
            return 0.0
        while hits and ts - hits[0][0] >= window:
            del hits[0]
        return sum(h[1] for h in hits)

    def _kmsg(self, v: HostVerdicts, k: KernelLogCount) -> None:
        threshold = int(getattr(self.cfg, f"kmsg_{k.name}", 0))
        if not threshold:
            return
        status, what, advice = KMSG_CLASSES[k.name]
        n = self._recent(v.hs, f"kmsg:{k.name}", self.cfg.kmsg_window, v.at)
        extra = (("class", k.name),)
        if n >= threshold:
            last = f": {k.last_message}" if k.last_message else ""
            summary = f"{v.hs.host}: {n:.0f} lines of {what} within {self.cfg.kmsg_window:g} s{last}"[:400]
            v.bad("host.kmsg", status, n, summary, advice, extra=extra)
        else:
            v.ok("host.kmsg", n, extra)

    def _sxid(self, v: HostVerdicts, k: KernelLogCount) -> None:
        code = k.code or 0
        n = self._recent(v.hs, f"sxid:{code}", self.cfg.sxid_window, v.at)
        extra = (("sxid", str(code)),)
        if n <= 0:
            v.ok("host.sxid", 0.0, extra)
            return
        info = lookup(code, self.sxids)
        fatal = is_fatal(code, k.fatal, self.sxids)
        kind = "fatal" if fatal else "non-fatal"
        summary = f"{v.hs.host}: NVSwitch SXid {code} ({info.name}, {kind}) x{n:.0f}: {info.summary}"
        advice = ADVICE["host.sxid"] + " " + info.summary + "."
        v.bad("host.sxid", CRITICAL if fatal else WARNING, n, summary, advice, extra=extra)

    # ------------------------------------------------------------------ modules and services

    def _modules_services(self, v: HostVerdicts) -> None:
        cfg, host = self.cfg, v.hs.host
        for m in v.s.modules:
            extra = (("module", m.name),)
            if m.loaded:
                v.ok("host.module", 1.0, extra)
            else:
                summary = f"{host}: kernel module {m.name} is not loaded: modprobe it or reinstall the driver"
                v.bad("host.module", cfg.module_missing_status, 0.0, summary, extra=extra)
        for sv in v.s.services:
            if sv.load_state in (None, "not-found", "masked"):
                continue  # not installed, or masked on purpose by the operator: not a failure
            extra = (("service", sv.name),)
            down = sv.active_state in _DOWN_STATES or sv.sub_state == "auto-restart"
            if not down:
                v.ok("host.service", 1.0, extra)
                continue
            status = CRITICAL if sv.name in cfg.critical_services else cfg.service_down_status
            summary = (
                f"{host}: service {sv.name} is {sv.active_state} ({sv.sub_state}): restart it "
                f"and read journalctl -u {sv.name}"
            )
            v.bad("host.service", status, 0.0, summary, extra=extra)

    # ------------------------------------------------------------------ clock and mounts

    def _clock(self, v: HostVerdicts) -> None:
        c, cfg = v.s.clock, self.cfg
        if c is None:
            return
        skew = abs(c.offset_s) if c.offset_s is not None else None
        status, what = HEALTHY, ""
        if skew is not None and skew >= cfg.clock_offset_critical_s:
            status, what = CRITICAL, f"clock off by {skew:.3g} s"
        elif skew is not None and skew >= cfg.clock_offset_warning_s:
            status, what = WARNING, f"clock off by {skew:.3g} s"
        elif c.synced is False and cfg.clock_unsynced_warns:
            status, what = WARNING, "clock not synchronised"
        if status == HEALTHY:
            v.ok("host.clock", skew)
        else:
            v.bad(
                "host.clock",
                status,
                skew,
                f"{v.hs.host}: {what}: check chrony/ntpd/timesyncd (chronyc tracking)",
            )

    def _mounts(self, v: HostVerdicts) -> None:
        cfg, host = self.cfg, v.hs.host
        for d in v.s.disks:
            extra = (("mount", d.mount),)
            if d.readonly is not None and d.mount not in cfg.readonly_ignore:
                if d.readonly:
                    summary = f"{host}: {d.mount} is mounted read-only: fsck and remount it read-write"
                    v.bad("host.fs_readonly", CRITICAL, 1.0, summary, extra=extra)
                else:
                    v.ok("host.fs_readonly", 0.0, extra)
            if d.inodes_total and d.inodes_used is not None:
                pct = d.inodes_used * 100.0 / d.inodes_total
                if pct >= cfg.inodes_warning_pct:
                    status = CRITICAL if pct >= cfg.inodes_critical_pct else WARNING
                    summary = f"{host}: {d.mount} {pct:.0f}% of inodes used: remove small files or grow it"
                    v.bad("host.inodes", status, pct, summary, extra=extra)
                else:
                    v.ok("host.inodes", pct, extra)
