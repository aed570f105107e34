"""Node checks: InfiniBand ports, kernel-log classes, NVSwitch SXids, kernel modules, systemd
services, clock synchronisation, read-only mounts and inodes, D-state processes.

They judge the node part of a system sample (``SystemSample.ib_ports`` … ``dstate_procs``).
A source the sample does not carry (an old agent, or a node without IB, NVSwitch, systemd or
a readable kernel log: the sample's ``absent``) gives no observation, never a failure.
Counters and kernel-log counts are judged by their increase since the host's previous sample.
"""

from __future__ import annotations

from collections.abc import Mapping

from collector.health.config import NodeThresholds, expected_ib
from collector.health.model import CRITICAL, HEALTHY, WARNING, Emitter, HostState
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

_ADVICE = {
    "host.ib_port": "An InfiniBand port is down or links below its expected rate: its rail is lost or "
    "slowed, collective operations stall or slow down; check the cable, transceiver and switch port "
    "(ibstat, mlxlink), reseat or replace the cable.",
    "host.ib_ports": "Fewer InfiniBand ports than this host class has: an HCA is missing (driver not "
    "loaded, firmware, PCIe): check lspci, mst status and dmesg.",
    "host.ib_errors": "The InfiniBand port counts link errors (symbol, receive, recovery, integrity): a "
    "marginal cable or transceiver; check with mlxlink, clean or replace the cable.",
    "host.ib_flap": "The InfiniBand link went down and came back (link_downed increased): jobs using it "
    "may have failed; check the cable, transceiver and switch port for flapping.",
    "host.sxid": "An NVSwitch reported an SXid error (see the SXid tables of NVIDIA's Fabric Manager "
    "User Guide).",
    "host.module": "An expected kernel module is not loaded: GPUs, UVM or GPUDirect RDMA do not work; "
    "load it (modprobe) or reinstall the driver matching the kernel.",
    "host.service": "An expected systemd service is not running: restart it (systemctl restart) and read "
    "its journal (journalctl -u); nvidia-fabricmanager down leaves NVSwitch GPUs unusable.",
    "host.clock": "The clock is off or not synchronised: logs, tokens and distributed jobs disagree on "
    "time; check chrony/ntpd/timesyncd and its servers (chronyc tracking).",
    "host.fs_readonly": "A file system is mounted read-only: jobs cannot write checkpoints or logs; find "
    "why (dmesg: errors forced a remount), fsck and remount it read-write.",
    "host.inodes": "The file system is running out of inodes: file creation fails although space is "
    "left; remove small files (caches, logs) or grow it.",
    "host.dstate": "Processes are stuck in uninterruptible sleep (D state), usually on a hung NFS or "
    "Lustre mount, a failing disk or a stuck driver call; find what they wait on (/proc/<pid>/stack).",
}

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

    def evaluate(
        self,
        em: Emitter,
        hs: HostState,
        base: Mapping[str, str],
        s: SystemSample,
        prev: SystemSample | None,
        dt: float,
        ts: float,
    ) -> None:
        """Judge the node part of ``s``; ``prev`` is the host's previous sample, ``dt`` seconds before."""
        if s.ib_ports:
            self._ib(em, hs, base, s, prev if dt > 0 else None, dt, ts)
        self._log(em, hs, base, s, prev, ts)
        self._modules_services(em, hs, base, s, ts)
        self._clock(em, hs, base, s, ts)
        self._mounts(em, hs, base, s, ts)
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
                em.emit(hs.checks, "host.dstate", base, HEALTHY, ts, value=float(n))
            else:
                names = ", ".join(s.dstate_names) or "?"
                em.emit(
                    hs.checks,
                    "host.dstate",
                    base,
                    status,
                    ts,
                    value=float(n),
                    summary=f"{hs.host}: {n} processes stuck in D state ({names}): find the hung mount or "
                    "device",
                    advice=_ADVICE["host.dstate"],
                )

    # ------------------------------------------------------------------ InfiniBand

    def _ib(
        self,
        em: Emitter,
        hs: HostState,
        base: Mapping[str, str],
        s: SystemSample,
        prev: SystemSample | None,
        dt: float,
        ts: float,
    ) -> None:
        cfg = self.cfg
        want_ports, want_rate = expected_ib(cfg, hs.gpu_model)
        if self._ib_quiet(em, hs, s, prev, want_ports, want_rate, ts):
            return
        before = {(p.device, p.port): p for p in prev.ib_ports} if prev is not None else {}
        ib = [p for p in s.ib_ports if p.link_layer == "InfiniBand"]
        if want_ports:
            if len(ib) < want_ports:
                em.emit(
                    hs.checks,
                    "host.ib_ports",
                    base,
                    WARNING,
                    ts,
                    value=float(len(ib)),
                    summary=f"{hs.host}: {len(ib)} InfiniBand ports, this host class has {want_ports}: find "
                    "the missing HCA (lspci, mst status)",
                    advice=_ADVICE["host.ib_ports"],
                )
            else:
                em.emit(hs.checks, "host.ib_ports", base, HEALTHY, ts, value=float(len(ib)))
        for p in s.ib_ports:
            name = f"{p.device}/{p.port}"
            extra = (("port", name),)
            down = p.state not in (None, "ACTIVE") or p.phys_state not in (None, "LinkUp")
            if down:
                em.emit(
                    hs.checks,
                    "host.ib_port",
                    base,
                    cfg.ib_down_status,
                    ts,
                    value=0.0,
                    summary=f"{hs.host}: InfiniBand port {name} is {p.state} ({p.phys_state}): check the "
                    "cable, transceiver and switch port",
                    advice=_ADVICE["host.ib_port"],
                    extra=extra,
                )
            elif (
                p.link_layer == "InfiniBand"
                and want_rate
                and p.rate_gbps is not None
                and p.rate_gbps < want_rate
            ):
                em.emit(
                    hs.checks,
                    "host.ib_port",
                    base,
                    WARNING,
                    ts,
                    value=p.rate_gbps,
                    summary=f"{hs.host}: InfiniBand port {name} links at {p.rate_gbps:g} Gb/s, expected "
                    f"{want_rate:g}: reseat or replace the cable",
                    advice=_ADVICE["host.ib_port"],
                    extra=extra,
                )
            else:
                em.emit(
                    hs.checks,
                    "host.ib_port",
                    base,
                    HEALTHY,
                    ts,
                    value=p.rate_gbps,
                    extra=extra,
                )
            old = before.get((p.device, p.port))
            if old is not None:
                rate = _delta(_ib_errors(p), _ib_errors(old)) * 60.0 / dt
                if rate > cfg.ib_errors_per_min:
                    em.emit(
                        hs.checks,
                        "host.ib_errors",
                        base,
                        WARNING,
                        ts,
                        value=rate,
                        summary=f"{hs.host}: InfiniBand port {name} counts {rate:.0f} link errors/min: "
                        "check or replace the cable",
                        advice=_ADVICE["host.ib_errors"],
                        extra=extra,
                    )
                else:
                    em.emit(
                        hs.checks,
                        "host.ib_errors",
                        base,
                        HEALTHY,
                        ts,
                        value=rate,
                        extra=extra,
                    )
                if not down and _delta(p.link_downed, old.link_downed) > 0:
                    hs.ib_flaps[name] = ts
            self._flap(em, hs, base, name, extra, ts)
        self._ib_memo(em, hs, s, prev, want_ports, want_rate, len(before))

    def _ib_quiet(
        self,
        em: Emitter,
        hs: HostState,
        s: SystemSample,
        prev: SystemSample | None,
        want_ports: int | None,
        want_rate: float | None,
        ts: float,
    ) -> bool:
        """The InfiniBand fast path: ``True`` (each check dated ``ts``) when the full path would
        emit nothing. It holds when the last sample's IB checks all ended healthy and quiet
        (:meth:`_ib_memo`) and this sample's ports equal that sample's, field by field, under
        the same expected count and rate: every counter's delta is 0 (rate 0, no new
        ``link_downed``), every state and rate is the one judged healthy, no flap is pending;
        so the full path would only set ``cs.at`` of the same checks (a test compares both)."""
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
            cs.at = ts
        hs.ib_quiet = (want_ports, want_rate, s.ib_ports, q[3])
        return True

    def _ib_memo(
        self,
        em: Emitter,
        hs: HostState,
        s: SystemSample,
        prev: SystemSample | None,
        want_ports: int | None,
        want_rate: float | None,
        distinct_before: int,
    ) -> None:
        """After a full evaluation: remember the IB checks if every one ended healthy and quiet
        (the next sample may then take :meth:`_ib_quiet`)."""
        if (
            not self.fast
            or prev is None
            or hs.ib_flaps
            or self.cfg.ib_errors_per_min < 0
            or distinct_before != len(prev.ib_ports)  # ports named twice: "before" kept one of them
            or len({(p.device, p.port) for p in s.ib_ports}) != len(s.ib_ports)
        ):
            return
        checks, hf = hs.checks, em.healthy_for
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

    def _flap(
        self,
        em: Emitter,
        hs: HostState,
        base: Mapping[str, str],
        name: str,
        extra: tuple[tuple[str, str], ...],
        ts: float,
    ) -> None:
        at = hs.ib_flaps.get(name)
        if at is not None and ts - at < self.cfg.ib_flap_window:
            em.emit(
                hs.checks,
                "host.ib_flap",
                base,
                WARNING,
                ts,
                value=ts - at,
                summary=f"{hs.host}: InfiniBand port {name} went down and came back {ts - at:.0f} s ago: "
                "check the cable and switch port for flapping",
                advice=_ADVICE["host.ib_flap"],
                extra=extra,
            )
            return
        hs.ib_flaps.pop(name, None)
        em.emit(
            hs.checks,
            "host.ib_flap",
            base,
            HEALTHY,
            ts,
            value=None,
            extra=extra,
        )

    # ------------------------------------------------------------------ kernel log and SXids

    def _log(
        self,
        em: Emitter,
        hs: HostState,
        base: Mapping[str, str],
        s: SystemSample,
        prev: SystemSample | None,
        ts: float,
    ) -> None:
        if not s.kernel_log and not hs.log_hits:
            return
        cfg = self.cfg
        before = {_log_key(k): k.count for k in prev.kernel_log} if prev is not None else None
        judged: set[str] = set()
        for k in s.kernel_log:
            key = _log_key(k)
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
                self._sxid(em, hs, base, k, ts)
            elif k.name in KMSG_CLASSES:
                self._kmsg(em, hs, base, k, ts)
        # A class that is failing but no longer in the sample (the agent restarted: its counts
        # start again from nothing) is still judged, so it clears when its lines age out.
        for local, cs in list(hs.checks.items()):
            if cs.status == HEALTHY:
                continue
            if local.startswith("host.kmsg:") and f"kmsg:{local[10:]}" not in judged:
                self._kmsg(em, hs, base, KernelLogCount(local[10:], None, 0, None, None), ts)
            elif (
                local.startswith("host.sxid:") and f"sxid:{local[10:]}" not in judged and local[10:].isdigit()
            ):
                said = cs.status == CRITICAL  # as it was judged while its line was in the samples
                self._sxid(em, hs, base, KernelLogCount("sxid", int(local[10:]), 0, said, None), ts)
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

    def _kmsg(
        self, em: Emitter, hs: HostState, base: Mapping[str, str], k: KernelLogCount, ts: float
    ) -> None:
        threshold = int(getattr(self.cfg, f"kmsg_{k.name}", 0))
        if not threshold:
            return
        status, what, advice = KMSG_CLASSES[k.name]
        n = self._recent(hs, f"kmsg:{k.name}", self.cfg.kmsg_window, ts)
        extra = (("class", k.name),)
        if n >= threshold:
            last = f": {k.last_message}" if k.last_message else ""
            em.emit(
                hs.checks,
                "host.kmsg",
                base,
                status,
                ts,
                value=n,
                summary=f"{hs.host}: {n:.0f} lines of {what} within {self.cfg.kmsg_window:g} s{last}"[:400],
                advice=advice,
                extra=extra,
            )
        else:
            em.emit(hs.checks, "host.kmsg", base, HEALTHY, ts, value=n, extra=extra)

    def _sxid(
        self, em: Emitter, hs: HostState, base: Mapping[str, str], k: KernelLogCount, ts: float
    ) -> None:
        code = k.code or 0
        n = self._recent(hs, f"sxid:{code}", self.cfg.sxid_window, ts)
        extra = (("sxid", str(code)),)
        if n <= 0:
            em.emit(hs.checks, "host.sxid", base, HEALTHY, ts, value=0.0, extra=extra)
            return
        info = lookup(code, self.sxids)
        fatal = is_fatal(code, k.fatal, self.sxids)
        kind = "fatal" if fatal else "non-fatal"
        em.emit(
            hs.checks,
            "host.sxid",
            base,
            CRITICAL if fatal else WARNING,
            ts,
            value=n,
            summary=f"{hs.host}: NVSwitch SXid {code} ({info.name}, {kind}) x{n:.0f}: {info.summary}",
            advice=_ADVICE["host.sxid"] + " " + info.summary + ".",
            extra=extra,
        )

    # ------------------------------------------------------------------ modules and services

    def _modules_services(
        self, em: Emitter, hs: HostState, base: Mapping[str, str], s: SystemSample, ts: float
    ) -> None:
        cfg = self.cfg
        for m in s.modules:
            extra = (("module", m.name),)
            if m.loaded:
                em.emit(hs.checks, "host.module", base, HEALTHY, ts, value=1.0, extra=extra)
            else:
                em.emit(
                    hs.checks,
                    "host.module",
                    base,
                    cfg.module_missing_status,
                    ts,
                    value=0.0,
                    summary=f"{hs.host}: kernel module {m.name} is not loaded: modprobe it or reinstall the "
                    "driver",
                    advice=_ADVICE["host.module"],
                    extra=extra,
                )
        for sv in s.services:
            if sv.load_state in (None, "not-found", "masked"):
                continue  # not installed, or masked on purpose by the operator: not a failure
            extra = (("service", sv.name),)
            down = sv.active_state in _DOWN_STATES or sv.sub_state == "auto-restart"
            if not down:
                em.emit(hs.checks, "host.service", base, HEALTHY, ts, value=1.0, extra=extra)
                continue
            status = CRITICAL if sv.name in cfg.critical_services else cfg.service_down_status
            em.emit(
                hs.checks,
                "host.service",
                base,
                status,
                ts,
                value=0.0,
                summary=f"{hs.host}: service {sv.name} is {sv.active_state} ({sv.sub_state}): restart it "
                f"and read journalctl -u {sv.name}",
                advice=_ADVICE["host.service"],
                extra=extra,
            )

    # ------------------------------------------------------------------ clock and mounts

    def _clock(self, em: Emitter, hs: HostState, base: Mapping[str, str], s: SystemSample, ts: float) -> None:
        c, cfg = s.clock, self.cfg
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
            em.emit(hs.checks, "host.clock", base, HEALTHY, ts, value=skew)
        else:
            em.emit(
                hs.checks,
                "host.clock",
                base,
                status,
                ts,
                value=skew,
                summary=f"{hs.host}: {what}: check chrony/ntpd/timesyncd (chronyc tracking)",
                advice=_ADVICE["host.clock"],
            )

    def _mounts(
        self, em: Emitter, hs: HostState, base: Mapping[str, str], s: SystemSample, ts: float
    ) -> None:
        cfg = self.cfg
        for d in s.disks:
            extra = (("mount", d.mount),)
            if d.readonly is not None and d.mount not in cfg.readonly_ignore:
                if d.readonly:
                    em.emit(
                        hs.checks,
                        "host.fs_readonly",
                        base,
                        CRITICAL,
                        ts,
                        value=1.0,
                        summary=f"{hs.host}: {d.mount} is mounted read-only: fsck and remount it read-write",
                        advice=_ADVICE["host.fs_readonly"],
                        extra=extra,
                    )
                else:
                    em.emit(hs.checks, "host.fs_readonly", base, HEALTHY, ts, value=0.0, extra=extra)
            if d.inodes_total and d.inodes_used is not None:
                pct = d.inodes_used * 100.0 / d.inodes_total
                if pct >= cfg.inodes_warning_pct:
                    status = CRITICAL if pct >= cfg.inodes_critical_pct else WARNING
                    em.emit(
                        hs.checks,
                        "host.inodes",
                        base,
                        status,
                        ts,
                        value=pct,
                        summary=f"{hs.host}: {d.mount} {pct:.0f}% of inodes used: remove small files or "
                        "grow it",
                        advice=_ADVICE["host.inodes"],
                        extra=extra,
                    )
                else:
                    em.emit(hs.checks, "host.inodes", base, HEALTHY, ts, value=pct, extra=extra)
