"""Fault injection for simulated hosts: the fault-spec grammar and a schedule of faults.

Grammar (also in README.md and docs/configuration.md, ``[simulate] faults``)::

    [HOST[/gpuN]:]KIND[=VALUE]@AFTER[+DURATION]

``HOST`` is a host name or ``*`` (every host); without it the fault applies to "this host"
(the form used in ``agent.toml``: ``gpu2:xid=79@10s``, ``host_down@30s``). A selector that is
exactly ``gpuN`` means GPU N of this host; to name a host that is itself called ``gpu2``,
write ``gpu2/gpu0:...``. ``AFTER`` and ``DURATION`` are durations (``500ms``, ``10s``, ``2m``)
counted from the start of the agent; without ``+DURATION`` the fault lasts forever. A GPU
fault without ``/gpuN`` applies to every GPU of the host.

Kinds and values (:data:`KIND_SPECS` is the table):

===================  =====  ===========================================================
kind                 scope  value
===================  =====  ===========================================================
xid                  gpu    XID code (integer, required): an XID event at the start
temp                 gpu    degrees Celsius (required): forces the GPU temperature
ecc_dbe              gpu    none: one double-bit ECC error (event + XID 48)
ecc_sbe              gpu    single-bit errors per minute (required)
throttle             gpu    hw_slowdown, hw_thermal, sw_thermal, power_brake or sw_power
lost                 gpu    none: the GPU falls off the bus
power                gpu    watts (required): forces the power draw
pcie_replay          gpu    PCIe replays per minute (required)
nvlink_err           gpu    NVLink CRC errors per second (optional, default 250)
nvlink_down          gpu    number of NVLink links down (optional, default 1)
row_remap_fail       gpu    none: row remapping failed (XID 64)
remap_pending        gpu    none: a row remap is pending a GPU reset (XID 63)
retired_pages        gpu    number of retired pages (required)
recovery_action      gpu    NVML recovery action code 0-7 (required)
mem_full             gpu    none: GPU memory ~99% used
persistence_off      gpu    none: persistence mode off
pcie_width           gpu    PCIe link width in lanes (required): the link trained narrower
hbm_temp             gpu    degrees Celsius (required): forces the HBM (memory) temperature
fabric               gpu    not_started, in_progress, failed or degraded: NVSwitch fabric state
host_down            host   none: the agent publishes nothing
cpu                  host   CPU percent 0-100 (required)
disk_full            host   none: the root file system ~99% full
nvml_init_fail       host   none: NVML cannot initialise (Driver Not Loaded) while active:
                            an agent starting in the window runs without GPUs and
                            retries; the first retry after the window succeeds
ib_down              host   InfiniBand port index, 0 = first (optional, default 0): port DOWN
ib_rate              host   Gb/s (required): the first IB port links at this rate
ib_errors            host   symbol errors per minute (required) on the first IB port
ib_flap              host   none: the first IB port's link_downed counter increases once
sxid                 host   SXid code (required): an NVSwitch SXid line in the kernel log
kmsg                 host   kernel-log class (required, :data:`KMSG_CLASSES`): a burst of lines
module_missing       host   kernel module name (required): not loaded
service_down         host   systemd service name (required): failed
clock_skew           host   seconds (required): the kernel clock's offset
fs_readonly          host   none: /raid is mounted read-only
dstate               host   number of processes stuck in D state (required)
===================  =====  ===========================================================

The host kinds after ``nvml_init_fail`` act on the node part of the simulated sample (a DGX-like
host with 8 InfiniBand ports at 400 Gb/s, NVSwitches, nvidia-persistenced and
nvidia-fabricmanager running); ``docs/health.md`` says which check each one trips.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from shared.config import parse_duration
from shared.errors import ConfigError, FaultSpecError

THROTTLE_REASONS: Final = frozenset({"hw_slowdown", "hw_thermal", "sw_thermal", "power_brake", "sw_power"})
FABRIC_STATES: Final = frozenset({"not_started", "in_progress", "failed", "degraded"})

# Kernel-log classes (agent.kmsg.CLASSES, without "sxid" which has its own kind).
KMSG_CLASSES: Final = frozenset(
    {
        "nvme_timeout",
        "nvme_reset",
        "fs_error",
        "fs_readonly",
        "oom_kill",
        "hung_task",
        "soft_lockup",
        "mce",
        "aer_corrected",
        "aer_uncorrected",
        "mlx5_error",
        "peermem",
    }
)
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

ValueType = Literal["none", "int", "float", "choice", "name"]


@dataclass(frozen=True, slots=True)
class KindSpec:
    """What a fault kind accepts: its scope, its value's type, range and default."""

    scope: Literal["gpu", "host"]
    value: ValueType
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    default: float | None = None
    choices: frozenset[str] = frozenset()
    unit: str = ""


KIND_SPECS: Final[dict[str, KindSpec]] = {
    "xid": KindSpec("gpu", "int", True, 1, 65535, unit="XID code"),
    "temp": KindSpec("gpu", "float", True, -40, 250, unit="degrees Celsius"),
    "ecc_dbe": KindSpec("gpu", "none"),
    "ecc_sbe": KindSpec("gpu", "float", True, 0, 1e9, unit="errors per minute"),
    "throttle": KindSpec("gpu", "choice", True, choices=THROTTLE_REASONS),
    "lost": KindSpec("gpu", "none"),
    "power": KindSpec("gpu", "float", True, 0, 10_000, unit="watts"),
    "pcie_replay": KindSpec("gpu", "float", True, 0, 1e9, unit="replays per minute"),
    "nvlink_err": KindSpec("gpu", "float", False, 0, 1e9, 250.0, unit="CRC errors per second"),
    "nvlink_down": KindSpec("gpu", "int", False, 1, 64, 1, unit="links"),
    "row_remap_fail": KindSpec("gpu", "none"),
    "remap_pending": KindSpec("gpu", "none"),
    "retired_pages": KindSpec("gpu", "int", True, 0, 1_000_000, unit="pages"),
    "recovery_action": KindSpec("gpu", "int", True, 0, 7, unit="NVML recovery action"),
    "mem_full": KindSpec("gpu", "none"),
    "persistence_off": KindSpec("gpu", "none"),
    "pcie_width": KindSpec("gpu", "int", True, 1, 64, unit="lanes"),
    "hbm_temp": KindSpec("gpu", "float", True, -40, 250, unit="degrees Celsius"),
    "fabric": KindSpec("gpu", "choice", True, choices=FABRIC_STATES),
    "host_down": KindSpec("host", "none"),
    "cpu": KindSpec("host", "float", True, 0, 100, unit="percent"),
    "disk_full": KindSpec("host", "none"),
    "nvml_init_fail": KindSpec("host", "none"),
    "ib_down": KindSpec("host", "int", False, 0, 63, 0, unit="InfiniBand port index"),
    "ib_rate": KindSpec("host", "float", True, 0, 100_000, unit="Gb/s"),
    "ib_errors": KindSpec("host", "float", True, 0, 1e9, unit="symbol errors per minute"),
    "ib_flap": KindSpec("host", "none"),
    "sxid": KindSpec("host", "int", True, 1, (1 << 20) - 1, unit="SXid code"),
    "kmsg": KindSpec("host", "choice", True, choices=KMSG_CLASSES),
    "module_missing": KindSpec("host", "name", True, unit="kernel module name"),
    "service_down": KindSpec("host", "name", True, unit="systemd service name"),
    "clock_skew": KindSpec("host", "float", True, -1e6, 1e6, unit="seconds"),
    "fs_readonly": KindSpec("host", "none"),
    "dstate": KindSpec("host", "int", True, 0, 1_000_000, unit="processes"),
}
FAULT_KINDS: Final = frozenset(KIND_SPECS)
GPU_KINDS: Final = frozenset(k for k, s in KIND_SPECS.items() if s.scope == "gpu")
HOST_KINDS: Final = frozenset(k for k, s in KIND_SPECS.items() if s.scope == "host")

_SELECTOR = re.compile(r"^(?:gpu(?P<bare>\d+)|(?P<host>[^/:\s]+)(?:/gpu(?P<gpu>\d+))?)$")
_KIND_VALUE = re.compile(r"^(?P<kind>[A-Za-z_][A-Za-z0-9_]*)(?:=(?P<value>[^@]*))?$")
_MAX_GPU: Final = 1023


@dataclass(frozen=True, slots=True)
class Fault:
    """One parsed fault.

    ``host``: ``None`` means this host (a spec without ``HOST``), ``"*"`` every host, else a
    host name. ``gpu``: ``None`` means every GPU of the host (or the host itself for the
    host-level kinds). ``after_s``/``duration_s`` are seconds since the agent started;
    ``duration_s`` ``None`` means forever.
    """

    spec: str
    host: str | None
    gpu: int | None
    kind: str
    value: float | str | None
    after_s: float
    duration_s: float | None

    @property
    def end_s(self) -> float | None:
        """When the fault ends (seconds since start), ``None`` if never."""
        return None if self.duration_s is None else self.after_s + self.duration_s

    def active(self, t: float) -> bool:
        """Whether the fault holds at ``t`` seconds since the agent started (start inclusive)."""
        if t < self.after_s:
            return False
        return self.duration_s is None or t < self.after_s + self.duration_s

    def matches_host(self, host: str) -> bool:
        return self.host is None or self.host == "*" or self.host == host

    def applies_to_gpu(self, gpu: int) -> bool:
        return self.gpu is None or self.gpu == gpu

    def overlap(self, t: float) -> float:
        """Seconds of ``[0, t]`` during which the fault was active."""
        end = self.end_s
        stop = t if end is None or end > t else end
        return stop - self.after_s if stop > self.after_s else 0.0


def _fail(spec: str, message: str) -> FaultSpecError:
    return FaultSpecError(spec, message)


def _parse_time(spec: str, text: str, what: str) -> float:
    if not text.strip():
        raise _fail(spec, f"empty {what} (expected a duration like '10s', '2m' or '500ms')")
    try:
        return parse_duration(text, what)
    except ConfigError as e:
        raise _fail(spec, f"bad {what} {text!r}: expected a duration like '10s', '2m' or '500ms'") from e


def _parse_value(spec: str, kind: str, ks: KindSpec, raw: str | None) -> float | str | None:
    if ks.value == "none":
        if raw is not None:
            raise _fail(spec, f"fault kind '{kind}' takes no value (got '={raw}')")
        return None
    if raw is None:
        if ks.required:
            what = "one of " + ", ".join(sorted(ks.choices)) if ks.choices else ks.unit
            raise _fail(spec, f"fault kind '{kind}' needs a value: {kind}=VALUE ({what})")
        return ks.default
    raw = raw.strip()
    if ks.value == "name":
        if not _NAME_RE.match(raw):
            raise _fail(
                spec, f"bad {kind} value {raw!r}: expected a {ks.unit} (letters, digits, '_', '.', '-')"
            )
        return raw
    if ks.value == "choice":
        if raw not in ks.choices:
            raise _fail(spec, f"bad {kind} value {raw!r} (expected one of {', '.join(sorted(ks.choices))})")
        return raw
    value: float
    try:
        value = int(raw, 10) if ks.value == "int" else float(raw)
    except ValueError:
        expected = "an integer" if ks.value == "int" else "a number"
        raise _fail(spec, f"bad {kind} value {raw!r}: expected {expected} ({ks.unit})") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise _fail(spec, f"bad {kind} value {raw!r}: expected a finite number ({ks.unit})")
    if (ks.lo is not None and value < ks.lo) or (ks.hi is not None and value > ks.hi):
        lo = int(ks.lo) if ks.lo is not None and ks.lo == int(ks.lo) else ks.lo
        hi = int(ks.hi) if ks.hi is not None and ks.hi == int(ks.hi) else ks.hi
        raise _fail(spec, f"{kind} value {raw} out of range [{lo}, {hi}] ({ks.unit})")
    return float(value) if ks.value == "float" else value


def _parse_selector(spec: str, selector: str) -> tuple[str | None, int | None]:
    if not selector:
        raise _fail(spec, "empty HOST before ':' (expected HOST, HOST/gpuN, gpuN or '*')")
    m = _SELECTOR.match(selector)
    if m is None:
        raise _fail(spec, f"bad target {selector!r} (expected HOST, HOST/gpuN, gpuN or '*')")
    if m.group("bare") is not None:
        host, gpu_text = None, m.group("bare")
    else:
        host, gpu_text = m.group("host"), m.group("gpu")
        if host != "*" and "*" in host:
            raise _fail(spec, f"bad host {host!r}: '*' must stand alone (every host)")
    gpu = int(gpu_text) if gpu_text is not None else None
    if gpu is not None and gpu > _MAX_GPU:
        raise _fail(spec, f"GPU index {gpu} out of range [0, {_MAX_GPU}]")
    return host, gpu


def parse_fault(spec: str) -> Fault:
    """Parse one fault spec. Raises :class:`~shared.errors.FaultSpecError` naming the problem."""
    if not isinstance(spec, str):
        raise FaultSpecError(repr(spec), "a fault spec must be a string")
    text = spec.strip()
    if not text:
        raise _fail(spec, "empty fault spec (expected [HOST[/gpuN]:]KIND[=VALUE]@AFTER[+DURATION])")
    if any(c.isspace() for c in text):
        raise _fail(spec, "whitespace inside a fault spec")
    if "@" not in text:
        raise _fail(spec, "missing '@AFTER' (when the fault starts, e.g. '@10s')")
    head, _, when = text.rpartition("@")
    if "@" in head:
        raise _fail(spec, "more than one '@'")
    selector, colon, kind_value = head.rpartition(":")
    host: str | None = None
    gpu: int | None = None
    if colon:
        host, gpu = _parse_selector(spec, selector)
    if not kind_value:
        raise _fail(spec, "missing KIND (e.g. 'xid=79@10s')")
    m = _KIND_VALUE.match(kind_value)
    if m is None:
        raise _fail(spec, f"bad fault kind {kind_value!r} (expected KIND or KIND=VALUE)")
    kind = m.group("kind")
    ks = KIND_SPECS.get(kind)
    if ks is None:
        raise _fail(spec, f"unknown fault kind '{kind}' (known: {', '.join(sorted(FAULT_KINDS))})")
    if ks.scope == "host" and gpu is not None:
        raise _fail(spec, f"fault kind '{kind}' applies to a host, not a GPU: drop '/gpu{gpu}'")
    value = _parse_value(spec, kind, ks, m.group("value"))
    after_text, plus, dur_text = when.partition("+")
    after_s = _parse_time(spec, after_text, "AFTER")
    duration_s: float | None = None
    if plus:
        duration_s = _parse_time(spec, dur_text, "DURATION")
        if duration_s <= 0:
            raise _fail(spec, "DURATION must be positive (leave out '+DURATION' for a fault that lasts)")
    return Fault(spec, host, gpu, kind, value, after_s, duration_s)


class FaultSchedule:
    """An immutable list of faults with queries by time, kind and GPU."""

    __slots__ = ("_by_kind", "_changes", "faults")

    def __init__(self, faults: Sequence[Fault] = ()) -> None:
        self.faults: tuple[Fault, ...] = tuple(faults)
        by_kind: dict[str, list[Fault]] = {}
        changes: set[float] = set()
        for f in self.faults:
            by_kind.setdefault(f.kind, []).append(f)
            changes.add(f.after_s)
            if f.end_s is not None:
                changes.add(f.end_s)
        self._by_kind = {k: tuple(v) for k, v in by_kind.items()}
        self._changes = tuple(sorted(changes))

    @classmethod
    def parse(cls, specs: Sequence[str]) -> FaultSchedule:
        """Parse every spec; the first bad one raises :class:`~shared.errors.FaultSpecError`."""
        if isinstance(specs, str):
            specs = [specs]
        return cls([parse_fault(s) for s in specs])

    def __len__(self) -> int:
        return len(self.faults)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def __repr__(self) -> str:
        return f"FaultSchedule({[f.spec for f in self.faults]!r})"

    def for_host(self, host: str) -> FaultSchedule:
        """Only the faults that apply to ``host``."""
        return FaultSchedule([f for f in self.faults if f.matches_host(host)])

    def for_gpu(self, gpu: int) -> tuple[Fault, ...]:
        """The GPU-level faults that apply to GPU ``gpu`` (host selection not applied)."""
        return tuple(f for f in self.faults if f.kind in GPU_KINDS and f.applies_to_gpu(gpu))

    def of_kind(self, kind: str) -> tuple[Fault, ...]:
        return self._by_kind.get(kind, ())

    def active(self, t: float, kind: str | None = None, gpu: int | None = None) -> list[Fault]:
        """Faults active at ``t``, optionally only of ``kind``.

        With ``gpu``, only the GPU-level faults that apply to that GPU (``/gpuN`` or every GPU).
        """
        pool = self.faults if kind is None else self._by_kind.get(kind, ())
        if gpu is None:
            return [f for f in pool if f.active(t)]
        return [f for f in pool if f.active(t) and f.kind in GPU_KINDS and f.applies_to_gpu(gpu)]

    def host_down(self, t: float) -> bool:
        """Whether a ``host_down`` fault is active: the agent publishes nothing."""
        return any(f.active(t) for f in self._by_kind.get("host_down", ()))

    def next_change_after(self, t: float) -> float | None:
        """The first fault start or end strictly after ``t``, or ``None``."""
        for c in self._changes:
            if c > t:
                return c
        return None


__all__ = [
    "FABRIC_STATES",
    "FAULT_KINDS",
    "GPU_KINDS",
    "HOST_KINDS",
    "KIND_SPECS",
    "KMSG_CLASSES",
    "THROTTLE_REASONS",
    "Fault",
    "FaultSchedule",
    "KindSpec",
    "parse_fault",
]
