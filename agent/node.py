"""The node beyond its GPUs: InfiniBand ports, kernel modules, systemd services, clock
synchronisation, D-state processes, and the kernel-log class counts.

:class:`NodeSource` reads them for one sample; it is called from the system source's
``sample`` (the sampler thread), so every read is a cheap file read except ``systemctl show``
(one process for all services, every ``services_every``) and the ``/proc`` scan for D-state
processes (every ``dstate_every``), whose results are kept between their runs. Sources the
node does not have are named in the sample's ``absent`` (``ib``, ``nvswitch``, ``kmsg``,
``systemd``) and never reported as failures.

The parsers (:func:`parse_modules`, :func:`parse_systemctl_show`, :func:`clock_from_timex`,
:func:`parse_stat`) are pure and tested on real text.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from agent.ib import IbReader
from shared.config import NodeConfig
from shared.frames import ClockSync, IbPort, KernelLogCount, ModuleState, ServiceState

log = logging.getLogger(__name__)

MAX_DSTATE_NAMES: Final = 8
_SYSTEMCTL_TIMEOUT_S: Final = 5.0
NVSWITCH_PCI_CLASS: Final = "0x068000"  # "bridge, other": how an NVSwitch enumerates
NVIDIA_VENDOR: Final = "0x10de"


# ----------------------------------------------------------------------------- modules


def parse_modules(text: str) -> frozenset[str]:
    """Names of the loaded modules in the text of ``/proc/modules`` (first column)."""
    return frozenset(line.split(" ", 1)[0] for line in text.splitlines() if line.strip())


def module_states(loaded: frozenset[str], expected: Sequence[str]) -> tuple[ModuleState, ...]:
    """One entry per expected module (``-`` and ``_`` are the same to the kernel)."""
    return tuple(ModuleState(name, name.replace("-", "_") in loaded) for name in expected)


# ----------------------------------------------------------------------------- services


def parse_systemctl_show(text: str) -> dict[str, ServiceState]:
    """``systemctl show -p Id,LoadState,ActiveState,SubState UNIT…`` output, by unit name
    (without ``.service``). Units are separated by a blank line."""
    out: dict[str, ServiceState] = {}
    for block in text.split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        unit = props.get("Id", "")
        if not unit:
            continue
        name = unit.removesuffix(".service")
        out[name] = ServiceState(
            name=name,
            load_state=props.get("LoadState") or None,
            active_state=props.get("ActiveState") or None,
            sub_state=props.get("SubState") or None,
        )
    return out


class SystemdUnavailableError(OSError):
    """``systemctl`` ran but could not reach systemd (a container, systemd not PID 1)."""


def query_services(names: Sequence[str], systemctl: str) -> tuple[ServiceState, ...]:
    """Ask systemd about ``names`` in one ``systemctl show``; a unit it does not know is
    ``load_state="not-found"``. Raises :class:`SystemdUnavailableError` when systemd cannot be
    reached, :class:`OSError` or :class:`subprocess.SubprocessError` when systemctl fails."""
    units = [n if "." in n else f"{n}.service" for n in names]
    proc = subprocess.run(  # noqa: S603 (fixed argv, unit names from the agent's own config)
        [systemctl, "show", "--no-pager", "-p", "Id,LoadState,ActiveState,SubState", *units],
        capture_output=True,
        text=True,
        timeout=_SYSTEMCTL_TIMEOUT_S,
        check=False,
    )
    found = parse_systemctl_show(proc.stdout)
    if proc.returncode != 0 and not found:
        raise SystemdUnavailableError(
            proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no answer"
        )
    return tuple(found.get(n.removesuffix(".service"), ServiceState(n, "not-found")) for n in names)


# ----------------------------------------------------------------------------- clock

TIME_ERROR: Final = 5  # adjtimex return value: the clock is not synchronised
STA_UNSYNC: Final = 0x0040
STA_NANO: Final = 0x2000


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """``struct timex`` of ``<sys/timex.h>`` (Linux, LP64 and ILP32 alike: longs and ints)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


def clock_from_timex(ret: int, status: int, offset: int, maxerror_us: int) -> ClockSync:
    """What ``adjtimex`` (``modes = 0``: read only) says: synchronised, PLL offset, max error."""
    scale = 1e-9 if status & STA_NANO else 1e-6
    return ClockSync(
        synced=not (ret == TIME_ERROR or status & STA_UNSYNC),
        offset_s=offset * scale,
        max_error_s=max(maxerror_us, 0) * 1e-6,
        source="adjtimex",
    )


@functools.cache
def _adjtimex() -> Callable[[Any], int] | None:
    """libc's ``adjtimex``, looked up once (``find_library`` runs ldconfig)."""
    try:
        fn: Callable[[Any], int] = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    return fn


def read_clock() -> ClockSync | None:
    """The kernel clock's state through ``adjtimex`` (read only, needs no privilege)."""
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    tx = _Timex()
    ret = adjtimex(ctypes.byref(tx))
    if ret < 0:
        return None
    return clock_from_timex(ret, tx.status, tx.offset, tx.maxerror)


# ----------------------------------------------------------------------------- D state


def parse_stat(text: str) -> tuple[str, str, int] | None:
    """``(comm, state, starttime)`` from ``/proc/<pid>/stat`` (``comm`` may hold spaces and ')')."""
    left, right = text.find("("), text.rfind(")")
    if left < 0 or right < left:
        return None
    rest = text[right + 2 :].split()
    if len(rest) < 20 or not rest[19].isdigit():
        return None
    return text[left + 1 : right], rest[0], int(rest[19])


class DStateScanner:
    """Processes in D state in two consecutive scans of ``/proc`` (the same pid and start time)."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc = proc_root
        self._seen: dict[tuple[int, int], str] = {}

    def scan(self) -> tuple[int, tuple[str, ...]]:
        now: dict[tuple[int, int], str] = {}
        try:
            entries = os.scandir(self.proc)
        except OSError:
            return 0, ()
        with entries:
            for e in entries:
                if not e.name.isdigit():
                    continue
                try:
                    with open(os.path.join(e.path, "stat"), "rb") as f:
                        parsed = parse_stat(f.read(1024).decode("utf-8", errors="replace"))
                except OSError:  # the process ended meanwhile
                    continue
                if parsed is not None and parsed[1] == "D":
                    now[(int(e.name), parsed[2])] = parsed[0]
        stuck = sorted(name for key, name in now.items() if key in self._seen)
        self._seen = now
        return len(stuck), tuple(stuck[:MAX_DSTATE_NAMES])


# ----------------------------------------------------------------------------- NVSwitch


def nvswitch_present(proc_root: str = "/proc", sys_root: str = "/sys") -> bool:
    """Whether the node has NVSwitches: the nvswitch driver lists devices, or an NVIDIA PCI
    device of class 0x068000 exists (the switches before their driver is loaded)."""
    try:
        if os.listdir(os.path.join(proc_root, "driver", "nvidia-nvswitch", "devices")):
            return True
    except OSError:
        pass
    pci = os.path.join(sys_root, "bus", "pci", "devices")
    try:
        devices = os.listdir(pci)
    except OSError:
        return False
    for d in devices:
        try:
            with open(os.path.join(pci, d, "vendor")) as f:
                if f.read().strip() != NVIDIA_VENDOR:
                    continue
            with open(os.path.join(pci, d, "class")) as f:
                if f.read().strip() == NVSWITCH_PCI_CLASS:
                    return True
        except OSError:
            continue
    return False


# ----------------------------------------------------------------------------- the source


@dataclass(slots=True)
class NodeReading:
    """What :meth:`NodeSource.read` adds to a system sample."""

    ib_ports: tuple[IbPort, ...] = ()
    kernel_log: tuple[KernelLogCount, ...] = ()
    modules: tuple[ModuleState, ...] = ()
    services: tuple[ServiceState, ...] = ()
    clock: ClockSync | None = None
    dstate_procs: int | None = None
    dstate_names: tuple[str, ...] = ()
    absent: tuple[str, ...] = field(default_factory=tuple)


class NodeSource:
    """Reads the node (blocking; called once per sample from the sampler thread)."""

    def __init__(
        self,
        cfg: NodeConfig,
        *,
        proc_root: str = "/proc",
        clock: Callable[[], float] = time.monotonic,
        kmsg_counts: Callable[[], tuple[KernelLogCount, ...]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.proc = proc_root
        self.kmsg_counts = kmsg_counts  # set by the service when the kernel log is readable
        self._clock = clock
        self.ib = IbReader(cfg.sys_root) if cfg.ib else None
        self.dstate = DStateScanner(proc_root) if cfg.dstate_every > 0 else None
        self._systemctl = shutil.which("systemctl")
        self._nvswitch: bool | None = None
        self._services: tuple[ServiceState, ...] = ()
        self._services_at = -float("inf")
        self._dstate: tuple[int | None, tuple[str, ...]] = (None, ())
        self._dstate_at = -float("inf")
        self._logged: set[str] = set()
        self._no_systemd = False  # systemctl exists but cannot reach systemd (a container)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, *args)

    def read(self) -> NodeReading:
        cfg, now = self.cfg, self._clock()
        absent: list[str] = []
        ports: tuple[IbPort, ...] = ()
        if self.ib is not None:
            got = self.ib.read()
            if got is None:
                absent.append("ib")
            else:
                ports = got
        if self._nvswitch is None or now - self._services_at >= cfg.services_every > 0:
            self._nvswitch = nvswitch_present(self.proc, cfg.sys_root)
        if not self._nvswitch:
            absent.append("nvswitch")
        expected = list(cfg.modules)
        if cfg.peermem_with_ib and any(p.link_layer == "InfiniBand" for p in ports):
            expected.append("nvidia_peermem")
        modules: tuple[ModuleState, ...] = ()
        if expected:
            try:
                with open(os.path.join(self.proc, "modules")) as f:
                    modules = module_states(parse_modules(f.read()), list(dict.fromkeys(expected)))
            except OSError as e:
                self._warn_once("modules", "cannot read %s/modules (%s); modules not checked", self.proc, e)
        services = self._read_services(now)
        if self._systemctl is None or self._no_systemd:
            absent.append("systemd")
        kernel_log: tuple[KernelLogCount, ...] = ()
        if self.kmsg_counts is None:
            absent.append("kmsg")
        else:
            kernel_log = self.kmsg_counts()
        if self.dstate is not None and now - self._dstate_at >= cfg.dstate_every:
            self._dstate_at = now
            self._dstate = self.dstate.scan()
        return NodeReading(
            ib_ports=ports,
            kernel_log=kernel_log,
            modules=modules,
            services=services,
            clock=read_clock() if cfg.clock else None,
            dstate_procs=self._dstate[0],
            dstate_names=self._dstate[1],
            absent=tuple(absent),
        )

    def _read_services(self, now: float) -> tuple[ServiceState, ...]:
        cfg = self.cfg
        if self._systemctl is None or cfg.services_every <= 0:
            return ()
        if now - self._services_at < cfg.services_every:
            return self._services
        self._services_at = now
        names = list(cfg.services)
        if cfg.fabricmanager and self._nvswitch:
            names.append("nvidia-fabricmanager")
        if not names:
            return ()
        try:
            self._services = tuple(
                s for s in query_services(list(dict.fromkeys(names)), self._systemctl) if s.load_state
            )
            self._no_systemd = False
        except SystemdUnavailableError as e:
            self._warn_once("systemd", "systemd not reachable (%s); services are absent, not checked", e)
            self._services, self._no_systemd = (), True
        except (OSError, subprocess.SubprocessError) as e:
            self._warn_once("systemctl", "systemctl show failed (%s); services not checked", e)
            self._services = ()
        return self._services
