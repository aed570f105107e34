"""Host metrics: the real host through psutil, or a deterministic simulated host.

Both implement :class:`SystemSource`. Calls are blocking (psutil reads ``/proc``); the
service runs them in its sampler thread. A reading the host cannot give is ``None``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import psutil

from agent.faults import FaultSchedule
from agent.node import NodeSource
from shared.frames import (
    ClockSync,
    DiskUsage,
    HostFacts,
    IbPort,
    KernelLogCount,
    ModuleState,
    NicCounters,
    ServiceState,
    SystemSample,
    replace,
)
from shared.sxid import lookup as sxid_lookup

log = logging.getLogger(__name__)

# File systems that hold no user data (the root mount is always kept, whatever its type).
PSEUDO_FS: Final = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fuse.gvfsd-fuse",
        "fuse.lxcfs",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nsfs",
        "overlay",
        "proc",
        "pstore",
        "ramfs",
        "rpc_pipefs",
        "securityfs",
        "squashfs",
        "sysfs",
        "tmpfs",
        "tracefs",
    }
)
PSEUDO_MOUNT_PREFIXES: Final = (
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/snap",
    "/var/lib/docker",
    "/var/lib/kubelet",
)
STATVFS_TIMEOUT_S: Final = 0.5  # a configured mount whose statvfs takes longer is reported without usage
SIM_IB_PORTS: Final = 8  # a DGX H100: eight 400 Gb/s NDR ports, one per GPU
KMSG_BURST: Final = 100  # lines a simulated kmsg=CLASS fault logs when it starts
NODE_FAULT_KINDS: Final = frozenset(
    {
        "ib_down",
        "ib_rate",
        "ib_errors",
        "ib_flap",
        "sxid",
        "kmsg",
        "module_missing",
        "service_down",
        "clock_skew",
        "fs_readonly",
        "dstate",
    }
)
# Per-container and bridge interfaces: many, short-lived, and not the host's links.
NIC_EXCLUDE_PREFIXES: Final = (
    "lo",
    "veth",
    "docker",
    "br-",
    "cali",
    "cni",
    "flannel",
    "virbr",
    "tap",
    "tun",
    "ifb",
)


@functools.cache  # read once: 5 ms each (it parses the package's metadata), and the running code's
def agent_version() -> str | None:  # version is the one it started with even if an upgrade lands
    try:
        return metadata.version("gpuwarden")
    except metadata.PackageNotFoundError:
        return None


@runtime_checkable
class SystemSource(Protocol):
    """A source of host metrics (blocking calls)."""

    def sample(self) -> SystemSample:
        """CPU, load, memory, swap, disks, file descriptors, NIC counters and uptime now."""
        ...

    def host_facts(self) -> HostFacts:
        """Static facts: hostname, OS, kernel, CPU model, memory, boot time and boot id."""
        ...

    def open(self) -> None:
        """Called once at agent start, before the first sample."""
        ...


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def os_pretty_name(text: str | None) -> str | None:
    """``PRETTY_NAME`` from the text of ``/etc/os-release``."""
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "PRETTY_NAME":
            return value.strip().strip("\"'") or None
    return None


def cpu_model(text: str | None) -> str | None:
    """The first ``model name`` (x86) or ``Model``/``CPU part`` (Arm) of ``/proc/cpuinfo``."""
    found: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in ("model name", "Model", "Hardware") and key not in found and value.strip():
            found[key] = value.strip()
    return found.get("model name") or found.get("Model") or found.get("Hardware")


def parse_file_nr(text: str | None) -> tuple[int | None, int | None]:
    """(open, max) file handles from ``/proc/sys/fs/file-nr`` (allocated, free, max)."""
    parts = (text or "").split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None, None
    allocated, free, maximum = (int(p) for p in parts)
    return max(allocated - free, 0), maximum


def keep_mount(mountpoint: str, fstype: str) -> bool:
    if mountpoint == "/":
        return True
    if fstype in PSEUDO_FS:
        return False
    return not any(mountpoint == p or mountpoint.startswith(p + "/") for p in PSEUDO_MOUNT_PREFIXES)


class _StatJob:
    """One ``statvfs`` in its own thread: ``done`` is set when it returned (``result`` None on error)."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: os.statvfs_result | None = None

    def run(self, statvfs: Callable[[str], os.statvfs_result], mount: str) -> None:
        try:
            self.result = statvfs(mount)
        except OSError:
            self.result = None
        finally:
            self.done.set()


def _mount_of(path: str, mounts: Mapping[str, object]) -> str | None:
    """The mount point holding ``path`` (the longest mount point that is a prefix of it)."""
    best = None
    for m in mounts:
        if (path == m or path.startswith(m.rstrip("/") + "/")) and (best is None or len(m) > len(best)):
            best = m
    return best


def disk_usage(mount: str, st: os.statvfs_result, readonly: bool) -> DiskUsage:
    """Usage of one file system from its ``statvfs`` (the same figures as ``df`` and psutil)."""
    total = st.f_blocks * st.f_frsize
    inodes = st.f_files or None  # 0: the file system has no fixed inode table (btrfs, some FUSE)
    return DiskUsage(
        mount,
        total,
        max(st.f_blocks - st.f_bfree, 0) * st.f_frsize,
        st.f_bavail * st.f_frsize,
        readonly=readonly,
        inodes_total=inodes,
        inodes_used=max(st.f_files - st.f_ffree, 0) if inodes else None,
    )


def with_node(sample: SystemSample, node: NodeSource | None) -> SystemSample:
    """``sample`` with the node's readings (InfiniBand, kernel log, modules, ...) added."""
    if node is None:
        return sample
    r = node.read()
    return replace(
        sample,
        ib_ports=r.ib_ports,
        kernel_log=r.kernel_log,
        modules=r.modules,
        services=r.services,
        clock=r.clock,
        dstate_procs=r.dstate_procs,
        dstate_names=r.dstate_names,
        absent=r.absent,
    )


class PsutilSystem:
    """The real host, read with psutil and ``/proc``."""

    def __init__(
        self,
        hostname: str,
        *,
        proc_root: str = "/proc",
        os_release: str = "/etc/os-release",
        nic_exclude: Sequence[str] = NIC_EXCLUDE_PREFIXES,
        node: NodeSource | None = None,
    ) -> None:
        self.hostname = hostname
        self.node = node
        self.statvfs: Callable[[str], os.statvfs_result] = os.statvfs  # of [node] mounts (a seam for tests)
        self._stat_pending: dict[str, _StatJob] = {}
        self._proc = Path(proc_root)
        self._os_release = Path(os_release)
        self._nic_exclude = tuple(nic_exclude)
        self._facts: HostFacts | None = None
        psutil.cpu_percent(interval=None)  # prime: the next call measures since now

    def open(self) -> None:
        """Nothing to prepare (the simulated source starts its fault clock here)."""

    def sample(self) -> SystemSample:
        load: tuple[float | None, ...]
        try:
            load = tuple(max(x, 0.0) for x in os.getloadavg())
        except OSError:
            load = (None, None, None)
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        fds_open, fds_max = parse_file_nr(_read_text(self._proc / "sys/fs/file-nr"))
        sample = SystemSample(
            cpu_pct=min(max(psutil.cpu_percent(interval=None), 0.0), 100.0),
            cpu_count=psutil.cpu_count(),
            load_1=load[0],
            load_5=load[1],
            load_15=load[2],
            mem_total_bytes=vm.total,
            mem_available_bytes=vm.available,
            swap_total_bytes=sw.total,
            swap_used_bytes=sw.used,
            fds_open=fds_open,
            fds_max=fds_max,
            uptime_s=max(time.time() - psutil.boot_time(), 0.0),
            disks=self._disks(),
            nics=self._nics(),
        )
        return with_node(sample, self.node)

    def _disks(self) -> tuple[DiskUsage, ...]:
        out: list[DiskUsage] = []
        seen: set[str] = set()
        for part in psutil.disk_partitions(all=False):
            if not keep_mount(part.mountpoint, part.fstype) or part.device in seen:
                continue
            try:
                st = os.statvfs(part.mountpoint)
            except OSError as e:  # a stale NFS mount, a mount we may not stat
                log.debug("skipping mount %s: %s", part.mountpoint, e)
                continue
            seen.add(part.device)
            out.append(disk_usage(part.mountpoint, st, "ro" in part.opts.split(",")))
        if self.node is not None and self.node.cfg.mounts:
            reported = {d.mount for d in out}
            out.extend(d for d in self._watched(self.node.cfg.mounts) if d.mount not in reported)
        return tuple(out)

    def _watched(self, paths: Sequence[str]) -> list[DiskUsage]:
        """The mounts holding ``paths`` (``[node] mounts``), network file systems included: the
        read-only flag from the mount table (never touches the file system), usage and inodes
        from a ``statvfs`` that may not block the tick (a hung NFS server): it runs in a helper
        thread and a mount whose last ``statvfs`` has not returned is reported without them."""
        mounts = {p.mountpoint: p for p in psutil.disk_partitions(all=True)}
        out: list[DiskUsage] = []
        for path in paths:
            mount = _mount_of(path, mounts)
            if mount is None:
                continue
            ro = "ro" in mounts[mount].opts.split(",")
            st = self._statvfs(mount)
            out.append(disk_usage(mount, st, ro) if st is not None else DiskUsage(mount, readonly=ro))
        return out

    def _statvfs(self, mount: str) -> os.statvfs_result | None:
        pending = self._stat_pending.get(mount)
        if pending is not None and not pending.done.is_set():
            return None  # still hung from an earlier sample: do not start another
        job = _StatJob()
        # a daemon thread: one hung on a dead server must not hold up the agent's exit either
        threading.Thread(
            target=job.run, args=(self.statvfs, mount), name="agent-statvfs", daemon=True
        ).start()
        self._stat_pending[mount] = job
        return job.result if job.done.wait(STATVFS_TIMEOUT_S) else None

    def _nics(self) -> tuple[NicCounters, ...]:
        stats = psutil.net_if_stats()
        out = []
        for name, c in sorted(psutil.net_io_counters(pernic=True).items()):
            if name.startswith(self._nic_exclude):
                continue
            st = stats.get(name)
            out.append(
                NicCounters(
                    name=name,
                    up=st.isup if st else None,
                    speed_mbps=st.speed if st and st.speed > 0 else None,
                    rx_bytes=c.bytes_recv,
                    tx_bytes=c.bytes_sent,
                    rx_errors=c.errin,
                    tx_errors=c.errout,
                    rx_drops=c.dropin,
                    tx_drops=c.dropout,
                )
            )
        return tuple(out)

    def host_facts(self) -> HostFacts:
        if self._facts is None:
            boot_id = _read_text(self._proc / "sys/kernel/random/boot_id")
            self._facts = HostFacts(
                hostname=self.hostname,
                os=os_pretty_name(_read_text(self._os_release)),
                kernel=platform.release() or None,
                cpu_model=cpu_model(_read_text(self._proc / "cpuinfo")) or platform.processor() or None,
                cpu_count=psutil.cpu_count(),
                mem_total_bytes=psutil.virtual_memory().total,
                boot_time=psutil.boot_time(),
                kernel_boot_id=(boot_id.strip() or None) if boot_id else None,
                agent_version=agent_version(),
                python_version=platform.python_version(),
            )
        return self._facts


_GIB: Final = 1 << 30
_TB: Final = 10**12


class SimulatedSystem:
    """A DGX-like host, deterministic from ``(seed, host)``; applies ``cpu`` and ``disk_full`` faults.

    Fault times count from construction (or :meth:`open`), measured with ``clock``.
    """

    def __init__(
        self,
        *,
        host: str,
        seed: int = 0,
        faults: FaultSchedule | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.faults = (faults or FaultSchedule()).for_host(host)
        self._cpu_faults = self.faults.of_kind("cpu")
        self._disk_faults = self.faults.of_kind("disk_full")
        self._node_faults = tuple(f for f in self.faults.faults if f.kind in NODE_FAULT_KINDS)
        self._clock = clock
        self._t0 = clock()
        h = hashlib.blake2b(f"system|{seed}|{host}".encode(), digest_size=32).digest()
        r = [b / 255.0 for b in h]
        self._cpu_base = 4.0 + 20.0 * r[0]
        self._cpu_amp = 3.0 + 10.0 * r[1]
        self._cpu_w = (0.002 + 0.01 * r[2]) * 2 * math.pi
        self._phase = r[3] * 2 * math.pi
        self._cpu_count = 224
        self._mem_total = 2048 * _GIB
        self._mem_used_frac = 0.1 + 0.3 * r[4]
        self._uptime0 = 3600.0 * (2 + 24 * 60 * r[5])
        self._root_total = int(1.92 * _TB)
        self._root_used = int(self._root_total * (0.2 + 0.4 * r[6]))
        self._raid_total = int(30.72 * _TB)
        self._raid_used0 = int(self._raid_total * (0.1 + 0.5 * r[7]))
        self._fds = 10_000 + int(30_000 * r[8])
        self._nic_rate = [(1 + 50 * r[9 + i]) * 1e6 for i in range(9)]  # bytes/s per NIC
        self._nic_base = [int(1e12 * r[18 + i % 10]) for i in range(9)]
        self._boot_id = "{}-{}-{}-{}-{}".format(
            *(h[i:j].hex() for i, j in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 16)))
        )
        self._wall_boot = float(int(time.time() - self._uptime0))

        self._inodes_total = 1 << 28
        self._inodes_used = int(self._inodes_total * (0.01 + 0.05 * r[30]))
        self._ib = tuple(
            IbPort(
                device=f"mlx5_{i}",
                port=1,
                state="ACTIVE",
                phys_state="LinkUp",
                rate_gbps=400.0,
                link_layer="InfiniBand",
                symbol_error=0,
                link_downed=0,
                link_error_recovery=0,
                port_rcv_errors=0,
                port_rcv_remote_physical_errors=0,
                port_rcv_switch_relay_errors=0,
                port_rcv_constraint_errors=0,
                port_xmit_discards=0,
                port_xmit_constraint_errors=0,
                local_link_integrity_errors=0,
                excessive_buffer_overrun_errors=0,
                vl15_dropped=0,
            )
            for i in range(SIM_IB_PORTS)
        )
        self._modules = tuple(ModuleState(m, True) for m in ("nvidia", "nvidia_uvm", "nvidia_peermem"))
        self._services = tuple(
            ServiceState(n, "loaded", "active", "running")
            for n in ("nvidia-persistenced", "nvidia-fabricmanager")
        )
        self._clock_sync = ClockSync(
            synced=True, offset_s=(r[31] - 0.5) * 2e-3, max_error_s=0.01, source="adjtimex"
        )

    def open(self) -> None:
        """Restart the fault clock (optional: construction starts it too)."""
        self._t0 = self._clock()

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def _disk(self, mount: str, total: int, used: int, readonly: bool, inodes_used: int) -> DiskUsage:
        return DiskUsage(
            mount,
            total,
            used,
            total - used,
            readonly=readonly,
            inodes_total=self._inodes_total,
            inodes_used=inodes_used,
        )

    def sample(self) -> SystemSample:
        t = self.elapsed()
        cpu = self._cpu_base + self._cpu_amp * math.sin(self._cpu_w * t + self._phase)
        for f in self._cpu_faults:
            if f.active(t) and isinstance(f.value, int | float):
                cpu = float(f.value)
        cpu = min(max(cpu, 0.0), 100.0)
        load = cpu / 100.0 * self._cpu_count
        root_used = self._root_used
        if any(f.active(t) for f in self._disk_faults):
            root_used = int(self._root_total * 0.995)
        raid_used = min(self._raid_used0 + int(t * 2e6), self._raid_total)
        raid_ro = any(f.active(t) for f in self._node_faults if f.kind == "fs_readonly")
        disks = (
            self._disk("/", self._root_total, root_used, False, self._inodes_used),
            self._disk("/raid", self._raid_total, raid_used, raid_ro, self._inodes_used // 2),
        )
        nics = tuple(
            NicCounters(
                name="eth0" if i == 0 else f"ib{i - 1}",
                up=True,
                speed_mbps=25_000 if i == 0 else 400_000,
                rx_bytes=self._nic_base[i] + int(rate * t),
                tx_bytes=self._nic_base[i] // 2 + int(rate * 0.8 * t),
            )
            for i, rate in enumerate(self._nic_rate)
        )
        sample = SystemSample(
            cpu_pct=round(cpu, 1),
            cpu_count=self._cpu_count,
            load_1=round(load, 2),
            load_5=round(load * 0.95, 2),
            load_15=round(load * 0.9, 2),
            mem_total_bytes=self._mem_total,
            mem_available_bytes=int(self._mem_total * (1 - self._mem_used_frac)),
            swap_total_bytes=0,
            swap_used_bytes=0,
            fds_open=self._fds,
            fds_max=9_223_372_036_854_775_807,
            uptime_s=self._uptime0 + t,
            disks=disks,
            nics=nics,
            ib_ports=self._ib,
            modules=self._modules,
            services=self._services,
            clock=self._clock_sync,
            dstate_procs=0,
        )
        return self._node(sample, t) if self._node_faults else sample

    def _node(self, s: SystemSample, t: float) -> SystemSample:
        """Apply the node faults (InfiniBand, kernel log, modules, services, clock, D state)."""
        ib = list(s.ib_ports)
        kernel_log: list[KernelLogCount] = []
        modules, services, clock = list(s.modules), list(s.services), s.clock
        dstate, names = s.dstate_procs, s.dstate_names
        for f in self._node_faults:
            on, started = f.active(t), t >= f.after_s
            if f.kind == "ib_down" and on and isinstance(f.value, int) and f.value < len(ib):
                ib[f.value] = replace(ib[f.value], state="DOWN", phys_state="Disabled")
            elif f.kind == "ib_rate" and on and isinstance(f.value, float):
                ib[0] = replace(ib[0], rate_gbps=f.value)
            elif f.kind == "ib_errors" and isinstance(f.value, float):  # counters keep their value
                ib[0] = replace(
                    ib[0], symbol_error=(ib[0].symbol_error or 0) + int(f.value * f.overlap(t) / 60)
                )
            elif f.kind == "ib_flap" and started:
                ib[0] = replace(ib[0], link_downed=(ib[0].link_downed or 0) + 1)
            elif f.kind == "kmsg" and started and isinstance(f.value, str):
                msg = f"simulated {f.value} line"  # a burst of lines when the fault starts
                kernel_log.append(KernelLogCount(f.value, None, KMSG_BURST, None, msg))
            elif f.kind == "sxid" and started and isinstance(f.value, int):
                fatal = sxid_lookup(f.value).fatal
                word = "Fatal" if fatal else "Non-fatal"
                msg = f"nvidia-nvswitch0: SXid (PCI:0000:05:00.0): {f.value}, {word}, simulated"
                kernel_log.append(KernelLogCount("sxid", f.value, 1, fatal, msg))
            elif f.kind == "module_missing" and on and isinstance(f.value, str):
                modules = [m for m in modules if m.name != f.value] + [ModuleState(f.value, False)]
            elif f.kind == "service_down" and on and isinstance(f.value, str):
                down = ServiceState(f.value, "loaded", "failed", "failed")
                services = [x for x in services if x.name != f.value] + [down]
            elif f.kind == "clock_skew" and on and isinstance(f.value, float) and clock is not None:
                clock = replace(clock, offset_s=f.value)
            elif f.kind == "dstate" and on and isinstance(f.value, int):
                dstate, names = f.value, ("simulated-io",) * min(f.value, 8)
        return replace(
            s,
            ib_ports=tuple(ib),
            kernel_log=tuple(kernel_log),
            modules=tuple(modules),
            services=tuple(services),
            clock=clock,
            dstate_procs=dstate,
            dstate_names=names,
        )

    def host_facts(self) -> HostFacts:
        return HostFacts(
            hostname=self.host,
            os="Ubuntu 22.04.4 LTS",
            kernel="5.15.0-105-generic",
            cpu_model="Intel(R) Xeon(R) Platinum 8480CL",
            cpu_count=self._cpu_count,
            mem_total_bytes=self._mem_total,
            boot_time=self._wall_boot,
            kernel_boot_id=self._boot_id,
            agent_version=agent_version(),
            python_version=platform.python_version(),
        )
