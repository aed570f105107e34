"""Typed wire frames (schema version 1) and their MessagePack encoding.

A frame is a MessagePack map with string keys. Every frame carries ``v`` (the schema's
major version, 1), ``kind`` (``sample``, ``event`` or ``inventory``), ``host``, ``provider``,
``boot_id`` (one run of the agent), ``seq`` (per ``boot_id``, strictly increasing across all
kinds) and ``ts`` (Unix time in seconds, UTC, float). Units live in field names; a value the
GPU or driver cannot provide is ``None`` (MessagePack ``nil``), never a sentinel number.

:func:`encode` and :func:`decode` are pure. :func:`decode` validates types and ranges and
raises :class:`~shared.errors.FrameDecodeError` naming the field; fields it does not know
are ignored (a newer minor revision may add some); another major ``v`` is rejected.
``docs/protocol.md`` documents every field.
"""

from __future__ import annotations

import math
import operator
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, ClassVar, Final, Literal, TypeVar, Union, get_args, get_origin

import msgpack

from shared import SCHEMA_VERSION
from shared.errors import FrameDecodeError, FrameEncodeError
from shared.subjects import MAX_TOKEN

MAX_FRAME_BYTES: Final = 1 << 20  # a frame larger than 1 MiB is rejected as oversized
MAX_STR: Final = 4096  # the longest string of any field (each field has its own limit, below)
MAX_LIST: Final = 4096
MAX_DEPTH: Final = 16  # nesting of maps and arrays, checked before decoding (the schema needs 5)
# String length limits (characters), per field: identities are short (they key indexes and
# alert fingerprints), free text longer. docs/protocol.md lists each field's limit.
LEN_TOKEN: Final = MAX_TOKEN  # host, provider: one subject token
LEN_BOOT_ID: Final = 64
LEN_UUID: Final = 128
LEN_WORD: Final = 32  # enumerations: kind of check, event type and source, backend
LEN_VERSION: Final = 128  # versions, serials, PCI bus ids, architectures
LEN_NAME: Final = 256  # names: process, GPU product, interface, OS, kernel, CPU model
LEN_LONG: Final = 1024  # container ids, check ids and targets, error texts
LEN_PATH: Final = 4096  # mount points
U64: Final = (1 << 64) - 1
I53: Final = 1 << 53

EVENT_TYPES: Final = frozenset(
    {
        "xid",  # an XID error (``xid`` set, ``count`` = running count for this GPU and code)
        "gpu_lost",  # the GPU fell off the bus (GPU_IS_LOST or missing from enumeration)
        "gpu_recovered",  # a lost GPU answers again
        "ecc_sbe",  # single-bit ECC error event
        "ecc_dbe",  # double-bit ECC error event
        "throttle_start",  # a HW clock-event reason started (``value`` = reason bits)
        "throttle_stop",  # it ended (``value`` = reason bits now)
        "recovery_action",  # the driver asks for a recovery action (``value`` = NVML code)
        "page_retirement",  # DRAM retirement recorded / failed (``value``: 0 event, 1 failure)
    }
)
EVENT_SOURCES: Final = frozenset({"nvml", "kmsg", "simulated", "agent"})


def _r(lo: float, hi: float, default: Any = None) -> Any:
    """A dataclass field with an inclusive numeric range checked by :func:`decode`."""
    return field(default=default, metadata={"range": (lo, hi)})


def _s(max_len: int, default: Any = None) -> Any:
    """A string field (or array of strings) whose strings are at most ``max_len`` characters."""
    if default is MISSING:
        return field(metadata={"max_len": max_len})
    return field(default=default, metadata={"max_len": max_len})


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process using a GPU."""

    pid: int = _r(0, 1 << 32, 0)
    name: str | None = _s(LEN_NAME)
    used_mem_bytes: int | None = _r(0, I53)
    container: str | None = _s(LEN_LONG)  # container or job id from /proc/<pid>/cgroup, when found
    gpu_instance_id: int | None = _r(0, 1 << 32)  # MIG: the GPU instance it runs in
    compute_instance_id: int | None = _r(0, 1 << 32)  # MIG: the compute instance it runs in


@dataclass(frozen=True, slots=True)
class MigSample:
    """One MIG device (a compute instance of a GPU instance) at one instant."""

    gpu_instance_id: int = _r(0, 1 << 32, 0)
    compute_instance_id: int = _r(0, 1 << 32, 0)
    mem_total_bytes: int | None = _r(0, I53)
    mem_used_bytes: int | None = _r(0, I53)
    util_gpu_pct: float | None = _r(0, 100)  # NVML gives none for MIG devices today: None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant. Counters are cumulative as NVML reports them."""

    index: int = _r(0, 1023, 0)
    uuid: str = _s(LEN_UUID, "")
    lost: bool = False  # fell off the bus: every reading below is None
    util_gpu_pct: float | None = _r(0, 100)
    util_mem_pct: float | None = _r(0, 100)
    mem_total_bytes: int | None = _r(0, I53)
    mem_used_bytes: int | None = _r(0, I53)
    mem_reserved_bytes: int | None = _r(0, I53)
    temp_c: float | None = _r(-100, 300)
    mem_temp_c: float | None = _r(-100, 300)
    temp_slowdown_c: float | None = _r(-100, 300)
    temp_shutdown_c: float | None = _r(-100, 300)
    temp_max_operating_c: float | None = _r(-100, 300)
    fan_pct: float | None = _r(0, 100)
    power_w: float | None = _r(0, 100_000)
    power_limit_w: float | None = _r(0, 100_000)
    energy_j: float | None = _r(0, 1e18)
    pstate: int | None = _r(0, 32)
    clock_sm_mhz: int | None = _r(0, 100_000)
    clock_mem_mhz: int | None = _r(0, 100_000)
    clock_event_reasons: int | None = _r(0, U64)  # NVML clocks-event (throttle) reason bits
    throttle_thermal_ns: int | None = _r(0, U64)  # cumulative violation time, thermal policy
    throttle_power_ns: int | None = _r(0, U64)  # cumulative violation time, power policy
    ecc_enabled: bool | None = None
    ecc_sbe_volatile: int | None = _r(0, U64)
    ecc_dbe_volatile: int | None = _r(0, U64)
    ecc_sbe_aggregate: int | None = _r(0, U64)
    ecc_dbe_aggregate: int | None = _r(0, U64)
    retired_pages_sbe: int | None = _r(0, U64)
    retired_pages_dbe: int | None = _r(0, U64)
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = _r(0, U64)
    remapped_rows_uncorrectable: int | None = _r(0, U64)
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    pcie_replay_count: int | None = _r(0, U64)
    pcie_link_gen: int | None = _r(0, 16)
    pcie_link_width: int | None = _r(0, 64)
    pcie_link_gen_max: int | None = _r(0, 16)
    pcie_link_width_max: int | None = _r(0, 64)
    nvlink_links_total: int | None = _r(0, 64)
    nvlink_links_up: int | None = _r(0, 64)
    nvlink_crc_errors: int | None = _r(0, U64)  # summed over links (flit CRC)
    nvlink_replay_errors: int | None = _r(0, U64)
    nvlink_recovery_errors: int | None = _r(0, U64)
    recovery_action: int | None = _r(0, 255)  # NVML_GPU_RECOVERY_ACTION_* (0 = none)
    persistence_mode: bool | None = None
    processes: tuple[GpuProcess, ...] = ()
    # Later optional fields (an older agent leaves them out; docs/protocol.md).
    temp_mem_max_c: float | None = _r(-100, 300)  # NVML memory (HBM) maximum temperature threshold
    clock_sm_app_mhz: int | None = _r(0, 100_000)  # SM application clock (the clock under load)
    fabric_state: int | None = _r(0, 255)  # NVML_GPU_FABRIC_STATE_*: 1 not started .. 3 completed
    fabric_status: int | None = _r(0, 1 << 32)  # nvmlReturn_t of the fabric registration, 0 = success
    fabric_clique_id: int | None = _r(0, 1 << 32)
    fabric_health_mask: int | None = _r(0, 1 << 32)  # NVML_GPU_FABRIC_HEALTH_MASK_* (v2+)
    nvlink_down_links: tuple[int, ...] = field(default=(), metadata={"range": (0, 63)})  # inactive links
    nvlink_crc_by_link: tuple[int, ...] = field(default=(), metadata={"range": (0, U64)})  # index = link
    nvlink_replay_by_link: tuple[int, ...] = field(default=(), metadata={"range": (0, U64)})
    nvlink_recovery_by_link: tuple[int, ...] = field(default=(), metadata={"range": (0, U64)})
    mig: tuple[MigSample, ...] = ()  # MIG devices (mig_mode on)


@dataclass(frozen=True, slots=True)
class DiskUsage:
    mount: str = _s(LEN_PATH, "")
    total_bytes: int = _r(0, U64, 0)
    used_bytes: int = _r(0, U64, 0)
    free_bytes: int = _r(0, U64, 0)
    readonly: bool | None = None  # mounted read-only (the "ro" mount option)
    inodes_total: int | None = _r(0, U64)
    inodes_used: int | None = _r(0, U64)


@dataclass(frozen=True, slots=True)
class NicCounters:
    """Cumulative counters of one network interface."""

    name: str = _s(LEN_NAME, "")
    up: bool | None = None
    speed_mbps: int | None = _r(0, 10_000_000)
    rx_bytes: int = _r(0, U64, 0)
    tx_bytes: int = _r(0, U64, 0)
    rx_errors: int = _r(0, U64, 0)
    tx_errors: int = _r(0, U64, 0)
    rx_drops: int = _r(0, U64, 0)
    tx_drops: int = _r(0, U64, 0)


@dataclass(frozen=True, slots=True)
class IbPort:
    """One InfiniBand / RoCE port (``/sys/class/infiniband/<device>/ports/<port>``). Counters are
    cumulative as the HCA reports them (the collector turns them into rates)."""

    device: str = _s(LEN_VERSION, "")  # mlx5_0
    port: int = _r(0, 255, 1)
    state: str | None = _s(LEN_VERSION)  # DOWN, INIT, ARMED, ACTIVE, ACTIVE_DEFER (the name after "4: ")
    phys_state: str | None = _s(LEN_VERSION)  # LinkUp, Polling, Disabled, ... (the name after "5: ")
    rate_gbps: float | None = _r(0, 1e6)  # "400 Gb/sec (4X NDR)" -> 400
    link_layer: str | None = _s(LEN_VERSION)  # InfiniBand or Ethernet (RoCE)
    symbol_error: int | None = _r(0, U64)
    link_downed: int | None = _r(0, U64)
    link_error_recovery: int | None = _r(0, U64)
    port_rcv_errors: int | None = _r(0, U64)
    port_rcv_remote_physical_errors: int | None = _r(0, U64)
    port_rcv_switch_relay_errors: int | None = _r(0, U64)
    port_rcv_constraint_errors: int | None = _r(0, U64)
    port_xmit_discards: int | None = _r(0, U64)
    port_xmit_constraint_errors: int | None = _r(0, U64)
    local_link_integrity_errors: int | None = _r(0, U64)
    excessive_buffer_overrun_errors: int | None = _r(0, U64)
    vl15_dropped: int | None = _r(0, U64)


@dataclass(frozen=True, slots=True)
class KernelLogCount:
    """Kernel-log lines of one class (one SXid code for ``sxid``) seen since the agent started."""

    name: str = _s(LEN_NAME, "")  # class: nvme_timeout, fs_error, oom_kill, ..., sxid (see docs/health.md)
    code: int | None = _r(0, 1 << 20)  # the SXid code, for name "sxid"
    count: int = _r(0, U64, 0)  # running count in this agent run
    fatal: bool | None = None  # SXid: the driver printed "Fatal" (True) or "Non-fatal" (False)
    last_message: str | None = _s(MAX_STR)  # the last such line, without its prefix


@dataclass(frozen=True, slots=True)
class ModuleState:
    """An expected kernel module (``/proc/modules``)."""

    name: str = _s(LEN_NAME, "")
    loaded: bool = False


@dataclass(frozen=True, slots=True)
class ServiceState:
    """An expected systemd service (``systemctl show -p LoadState,ActiveState,SubState``)."""

    name: str = _s(LEN_NAME, "")
    load_state: str | None = _s(LEN_VERSION)  # loaded, not-found, masked, ...
    active_state: str | None = _s(
        LEN_VERSION
    )  # active, inactive, failed, activating, deactivating, reloading
    sub_state: str | None = _s(LEN_VERSION)  # running, dead, exited, failed, auto-restart, ...


@dataclass(frozen=True, slots=True)
class ClockSync:
    """The kernel's clock discipline (``adjtimex``), as NTP/chrony/timesyncd left it."""

    synced: bool | None = None  # False: the kernel clock is marked unsynchronised (STA_UNSYNC)
    offset_s: float | None = _r(-1e9, 1e9)  # the PLL's current offset (how far it still has to go)
    max_error_s: float | None = _r(0, 1e9)  # the kernel's maximum error estimate
    source: str | None = _s(LEN_NAME)  # "adjtimex"


@dataclass(frozen=True, slots=True)
class SystemSample:
    """Host metrics from psutil."""

    cpu_pct: float | None = _r(0, 100)
    cpu_count: int | None = _r(0, 1 << 20)
    load_1: float | None = _r(0, 1e6)
    load_5: float | None = _r(0, 1e6)
    load_15: float | None = _r(0, 1e6)
    mem_total_bytes: int | None = _r(0, U64)
    mem_available_bytes: int | None = _r(0, U64)
    swap_total_bytes: int | None = _r(0, U64)
    swap_used_bytes: int | None = _r(0, U64)
    fds_open: int | None = _r(0, U64)
    fds_max: int | None = _r(0, U64)
    uptime_s: float | None = _r(0, 1e12)
    disks: tuple[DiskUsage, ...] = ()
    nics: tuple[NicCounters, ...] = ()
    ib_ports: tuple[IbPort, ...] = ()
    kernel_log: tuple[KernelLogCount, ...] = ()  # classes seen at least once in this agent run
    modules: tuple[ModuleState, ...] = ()
    services: tuple[ServiceState, ...] = ()
    clock: ClockSync | None = None
    dstate_procs: int | None = _r(0, 1 << 32)  # processes stuck in D state (uninterruptible sleep)
    dstate_names: tuple[str, ...] = _s(LEN_NAME, ())  # a few of their names
    absent: tuple[str, ...] = _s(LEN_NAME, ())  # sources this node lacks: "ib", "nvswitch", "kmsg", "systemd"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Result of one agent-side network check (TCP connect, NATS round trip)."""

    id: str = _s(LEN_LONG, "")  # stable id, e.g. "tcp:storage-1:2049" or "nats_rtt"
    kind: str = _s(LEN_WORD, "")  # "tcp" or "nats_rtt"
    target: str = _s(LEN_LONG, "")
    ok: bool = False
    latency_ms: float | None = _r(0, 1e7)
    error: str | None = _s(LEN_LONG)


@dataclass(frozen=True, slots=True)
class AgentStats:
    """The agent's own figures, so its cost and delivery are visible."""

    version: str = _s(LEN_VERSION, "")
    backend: str = _s(LEN_WORD, "")  # "nvml" or "simulated"
    uptime_s: float = _r(0, 1e12, 0.0)
    cpu_s: float = _r(0, 1e12, 0.0)  # process CPU time (user + system) since start
    rss_bytes: int = _r(0, U64, 0)
    tick_s: float = _r(0, 1e6, 0.0)  # how long the last sampling tick took
    buffered_frames: int = _r(0, U64, 0)  # waiting for NATS
    dropped_frames: int = _r(0, U64, 0)  # lost to buffer overflow since start
    published_frames: int = _r(0, U64, 0)
    publish_errors: int = _r(0, U64, 0)
    nvml_errors: int = _r(0, U64, 0)


@dataclass(frozen=True, slots=True)
class PublishOutage:
    """The agent could not publish (NATS unreachable) from ``since`` to ``until``: carried by
    the first sample built after it could publish again, so the collector can explain the gap."""

    since: float = _r(0, 1e11, 0.0)  # wall time the connection was lost (or the agent started)
    until: float = _r(0, 1e11, 0.0)  # wall time it could publish again
    buffered_frames: int = _r(0, U64, 0)  # frames kept in the buffer meanwhile, replayed since
    dropped_frames: int = _r(0, U64, 0)  # frames lost to buffer overflow meanwhile (exact)


@dataclass(frozen=True, slots=True)
class MigInstance:
    """One MIG device of a GPU: its profile and ids."""

    gpu_instance_id: int = _r(0, 1 << 32, 0)
    compute_instance_id: int = _r(0, 1 << 32, 0)
    profile: str | None = _s(LEN_VERSION)  # e.g. "1g.10gb" (from the MIG device's name)
    uuid: str | None = _s(LEN_UUID)  # MIG-...
    mem_total_bytes: int | None = _r(0, I53)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Static facts about one GPU."""

    index: int = _r(0, 1023, 0)
    uuid: str = _s(LEN_UUID, "")
    name: str | None = _s(LEN_NAME)
    serial: str | None = _s(LEN_VERSION)
    pci_bus_id: str | None = _s(LEN_VERSION)
    minor_number: int | None = _r(0, 1 << 20)
    architecture: str | None = _s(LEN_VERSION)
    mem_total_bytes: int | None = _r(0, I53)
    vbios: str | None = _s(LEN_VERSION)
    mig_mode: bool | None = None
    persistence_mode: bool | None = None
    power_limit_default_w: float | None = _r(0, 100_000)
    pcie_link_gen_max: int | None = _r(0, 16)
    pcie_link_width_max: int | None = _r(0, 64)
    nvlink_links_total: int | None = _r(0, 64)
    unsupported: tuple[str, ...] = _s(LEN_NAME, ())  # sample fields NVML reports as not supported on this GPU
    fabric_cluster_uuid: str | None = _s(LEN_UUID)  # NVSwitch fabric (NVML GPU fabric info), when registered
    mig_instances: tuple[MigInstance, ...] = ()  # MIG devices (mig_mode on)


@dataclass(frozen=True, slots=True)
class HostFacts:
    hostname: str = _s(LEN_NAME, "")
    os: str | None = _s(LEN_NAME)
    kernel: str | None = _s(LEN_NAME)
    cpu_model: str | None = _s(LEN_NAME)
    cpu_count: int | None = _r(0, 1 << 20)
    mem_total_bytes: int | None = _r(0, U64)
    boot_time: float | None = _r(0, 1e12)
    kernel_boot_id: str | None = _s(LEN_VERSION)
    agent_version: str | None = _s(LEN_VERSION)
    python_version: str | None = _s(LEN_VERSION)


# ----------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True, kw_only=True)
class _Header:
    host: str = _s(LEN_TOKEN, MISSING)
    provider: str = _s(LEN_TOKEN, MISSING)
    boot_id: str = _s(LEN_BOOT_ID, MISSING)
    seq: int = _r(0, U64, 0)
    ts: float = _r(0, 1e11, 0.0)
    v: int = SCHEMA_VERSION


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleFrame(_Header):
    """Periodic sample: every GPU of the host, system metrics, check results, agent figures."""

    KIND: ClassVar[str] = "sample"
    kind: Literal["sample"] = "sample"
    interval_s: float = _r(0, 86_400, 0.0)
    gpus: tuple[GpuSample, ...] = ()
    system: SystemSample | None = None
    checks: tuple[CheckResult, ...] = ()
    agent: AgentStats | None = None
    outage: PublishOutage | None = None  # the first sample after the agent could not publish


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFrame(_Header):
    """An immediate event (see :data:`EVENT_TYPES`)."""

    KIND: ClassVar[str] = "event"
    kind: Literal["event"] = "event"
    type: str = _s(LEN_WORD, "xid")
    source: str = _s(LEN_WORD, "agent")  # "nvml", "kmsg", "simulated" or "agent"
    gpu_index: int | None = _r(0, 1023)
    gpu_uuid: str | None = _s(LEN_UUID)
    xid: int | None = _r(0, 1 << 20)
    count: int | None = _r(0, U64)  # running count for (GPU, type/xid) in this boot
    value: int | None = _r(0, U64)
    message: str | None = _s(MAX_STR)


@dataclass(frozen=True, slots=True, kw_only=True)
class InventoryFrame(_Header):
    """What the host has: sent at start and whenever it changes."""

    KIND: ClassVar[str] = "inventory"
    kind: Literal["inventory"] = "inventory"
    backend: str = _s(LEN_WORD, "")
    driver_version: str | None = _s(LEN_VERSION)
    cuda_version: str | None = _s(LEN_VERSION)
    nvml_version: str | None = _s(LEN_VERSION)
    gpus: tuple[GpuInfo, ...] = ()
    host_facts: HostFacts | None = None
    nvml_error: str | None = _s(MAX_STR)  # NVML cannot initialise: the agent runs without GPUs; NVML's text


Frame = SampleFrame | EventFrame | InventoryFrame
_FRAME_TYPES: Final[dict[str, type[Any]]] = {c.KIND: c for c in (SampleFrame, EventFrame, InventoryFrame)}
F = TypeVar("F", SampleFrame, EventFrame, InventoryFrame)

# ----------------------------------------------------------------------------- validation

_Check = Callable[[Any, str, str], Any]
_SPECS: dict[type[Any], tuple[tuple[str, _Check, bool], ...]] = {}


def _fail(reason: str, path: str, message: str) -> typing.NoReturn:
    raise FrameDecodeError(reason, message, path)


def _num_check(kind: type, lo: float, hi: float, optional: bool) -> _Check:
    def check_int(value: Any, path: str, name: str) -> Any:
        if value is None and optional:
            return None
        if type(value) is not int:
            _fail(
                "bad_type",
                _p(path, name),
                f"expected integer{' or null' if optional else ''}, got {_tn(value)}",
            )
        if not lo <= value <= hi:
            _fail("out_of_range", _p(path, name), f"{value} outside [{lo}, {hi}]")
        return value

    def check_float(value: Any, path: str, name: str) -> Any:
        if value is None and optional:
            return None
        t = type(value)
        if t is int:
            value = float(value)
        elif t is not float:
            _fail(
                "bad_type",
                _p(path, name),
                f"expected number{' or null' if optional else ''}, got {_tn(value)}",
            )
        if not lo <= value <= hi:  # also false for NaN
            shown = "NaN" if math.isnan(value) else value
            _fail("out_of_range", _p(path, name), f"{shown} outside [{lo}, {hi}]")
        return value

    return check_int if kind is int else check_float


def _scalar_check(kind: type, optional: bool, max_len: int = MAX_STR) -> _Check:
    tname = {str: "string", bool: "boolean"}[kind]

    def check(value: Any, path: str, name: str) -> Any:
        if value is None and optional:
            return None
        if type(value) is not kind:
            _fail(
                "bad_type",
                _p(path, name),
                f"expected {tname}{' or null' if optional else ''}, got {_tn(value)}",
            )
        if kind is str and len(typing.cast(str, value)) > max_len:
            _fail("too_long", _p(path, name), f"string longer than {max_len} characters")
        return value

    return check


def _record_check(cls: type[Any], optional: bool) -> _Check:
    def check(value: Any, path: str, name: str) -> Any:
        if value is None and optional:
            return None
        return _build(cls, value, _p(path, name))

    return check


def _tuple_check(item: _Check) -> _Check:
    def check(value: Any, path: str, name: str) -> Any:
        if type(value) is not list and type(value) is not tuple:
            _fail("bad_type", _p(path, name), f"expected array, got {_tn(value)}")
        if len(value) > MAX_LIST:
            _fail("out_of_range", _p(path, name), f"array longer than {MAX_LIST}")
        here = _p(path, name)
        return tuple([item(v, here, f"[{i}]") for i, v in enumerate(value)])

    return check


def _literal_check(allowed: tuple[Any, ...]) -> _Check:
    def check(value: Any, path: str, name: str) -> Any:
        if value not in allowed:
            _fail("bad_type", _p(path, name), f"expected one of {list(allowed)}, got {value!r}")
        return value

    return check


def _check_for(hint: Any, meta: Any) -> _Check:
    optional = False
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        hint = args[0]
        origin = get_origin(hint)
    if origin is Literal:
        return _literal_check(get_args(hint))
    if origin is tuple:
        return _tuple_check(_check_for(get_args(hint)[0], meta))
    if hint in (int, float):
        lo, hi = meta.get("range", (-U64, U64))
        return _num_check(hint, lo, hi, optional)
    if hint is str:
        return _scalar_check(hint, optional, meta.get("max_len", MAX_STR))
    if hint is bool:
        return _scalar_check(hint, optional)
    if isinstance(hint, type) and hint in _RECORDS:
        return _record_check(hint, optional)
    raise TypeError(f"no wire check for {hint!r}")  # a programming error, at import


def _spec(cls: type[Any]) -> tuple[tuple[str, _Check, bool], ...]:
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        spec = tuple(
            (f.name, _check_for(hints[f.name], f.metadata), f.default is MISSING)
            for f in fields(cls)
            if f.name != "v"
        )
        _SPECS[cls] = spec
    return spec


def _build(cls: type[Any], value: Any, path: str) -> Any:
    if type(value) is not dict:
        _fail("bad_type", path, f"expected map, got {_tn(value)}")
    kwargs = {}
    for name, check, required in _SPECS[cls]:
        raw = value.get(name, MISSING)
        if raw is MISSING:
            if required:
                _fail("missing_field", _p(path, name), "required field missing")
            continue
        kwargs[name] = check(raw, path, name)
    return cls(**kwargs)


def _p(path: str, name: str) -> str:
    if not path:
        return name
    return f"{path}{name}" if name.startswith("[") else f"{path}.{name}"


def _tn(value: Any) -> str:
    return "null" if value is None else type(value).__name__


_RECORDS: Final = (
    GpuProcess,
    MigSample,
    GpuSample,
    DiskUsage,
    NicCounters,
    IbPort,
    KernelLogCount,
    ModuleState,
    ServiceState,
    ClockSync,
    SystemSample,
    CheckResult,
    AgentStats,
    PublishOutage,
    MigInstance,
    GpuInfo,
    HostFacts,
    SampleFrame,
    EventFrame,
    InventoryFrame,
)
for _cls in _RECORDS:
    _spec(_cls)

# ----------------------------------------------------------------------------- fast path
# Generated, per class, from the same type hints and ranges: straight-line code that accepts
# exactly what the checks above accept (or less). Anything it does not accept is handed to
# the reference ``_build`` above, which accepts it or raises the precise FrameDecodeError, so
# errors and results are the same, only valid frames decode about twice as fast.


class _Slow(Exception):
    """The fast path declines; the reference builder decides."""


_FAST: dict[type[Any], Callable[[Any], Any]] = {}


def _gen_value(hint: Any, meta: Any, var: str, ns: dict[str, Any], depth: int) -> list[str]:
    """Lines that validate (and convert) local ``var`` in place, raising _Slow when unsure."""
    optional = False
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        hint = args[0]
        origin = get_origin(hint)
    body: list[str]
    if origin is Literal:
        key = f"_lit{len(ns)}"
        ns[key] = get_args(hint)
        return [f"if {var} not in {key}: raise _Slow"]  # literals are never optional here
    if origin is tuple:
        item = f"_i{depth}"
        inner = _gen_value(get_args(hint)[0], meta, item, ns, depth + 1)
        body = [
            f"if type({var}) is not list and type({var}) is not tuple: raise _Slow",
            f"if len({var}) > MAX_LIST: raise _Slow",
            f"_l{depth} = []",
            f"for {item} in {var}:",
            *("    " + line for line in inner),
            f"    _l{depth}.append({item})",
            f"{var} = tuple(_l{depth})",
        ]
    elif hint is int:
        lo, hi = meta.get("range", (-U64, U64))
        body = [f"if type({var}) is not int or not {lo!r} <= {var} <= {hi!r}: raise _Slow"]
    elif hint is float:
        lo, hi = meta.get("range", (-U64, U64))
        body = [
            f"if type({var}) is int: {var} = float({var})",
            f"elif type({var}) is not float: raise _Slow",
            f"if not {lo!r} <= {var} <= {hi!r}: raise _Slow",
        ]
    elif hint is str:
        body = [f"if type({var}) is not str or len({var}) > {meta.get('max_len', MAX_STR)!r}: raise _Slow"]
    elif hint is bool:
        body = [f"if type({var}) is not bool: raise _Slow"]
    elif isinstance(hint, type) and hint in _RECORDS:
        key = f"_fast_{hint.__name__}"
        body = [f"{var} = {key}({var})"]
    else:
        raise TypeError(f"no wire check for {hint!r}")  # a programming error, at import
    if optional:
        return [f"if {var} is not None:", *("    " + line for line in body)]
    return body


def _gen_fast(cls: type[Any], ns: dict[str, Any]) -> str:
    hints = typing.get_type_hints(cls)
    lines = [
        f"def _fast_{cls.__name__}(value):",
        "    if type(value) is not dict: raise _Slow",
        "    g = value.get",
    ]
    args = []
    for n, f in enumerate(fields(cls)):
        if f.name == "v":
            continue
        var = f"v{n}"
        if f.default is MISSING:
            lines += [f"    {var} = g({f.name!r}, _MISSING)", f"    if {var} is _MISSING: raise _Slow"]
        else:
            key = f"_d{len(ns)}"
            ns[key] = f.default
            lines.append(f"    {var} = g({f.name!r}, {key})")
            if f.default is None or type(f.default) is tuple:  # the default itself is valid as is
                lines.append(f"    if {var} is not {key}:")
                lines += ["        " + line for line in _gen_value(hints[f.name], f.metadata, var, ns, 0)]
                args.append((f.name, var))
                continue
        lines += ["    " + line for line in _gen_value(hints[f.name], f.metadata, var, ns, 0)]
        args.append((f.name, var))
    call = ", ".join(f"{name}={var}" for name, var in args)
    lines.append(f"    return _cls_{cls.__name__}({call})")
    ns[f"_cls_{cls.__name__}"] = cls
    return "\n".join(lines)


def _compile_fast() -> None:
    ns: dict[str, Any] = {"_Slow": _Slow, "_MISSING": MISSING, "MAX_LIST": MAX_LIST, "MAX_STR": MAX_STR}
    for cls in _RECORDS:
        source = _gen_fast(cls, ns)
        exec(compile(source, f"<frames fast path: {cls.__name__}>", "exec"), ns)  # noqa: S102 (from type hints)
    for cls in _RECORDS:
        _FAST[cls] = ns[f"_fast_{cls.__name__}"]


_compile_fast()


def _build_fast(cls: type[Any], value: Any) -> Any:
    try:
        return _FAST[cls](value)
    except (_Slow, TypeError, ValueError, OverflowError):
        return _build(cls, value, "")


# ----------------------------------------------------------------------------- typed path
# When msgspec is installed, a sample frame (the bulk of the traffic) is decoded by msgspec
# straight into the dataclasses, then its ranges and lengths are checked by generated code;
# anything either step refuses goes through the reference path below, which gives the exact
# FrameDecodeError. The one difference: the content of fields this build does not know is
# skipped unread (msgpack's reference path also refuses non-string map keys and bad UTF-8 in
# them; both ignore such fields otherwise).

try:
    import msgspec
except ImportError:  # optional: without it every frame takes the reference path
    msgspec = None  # type: ignore[assignment]


def _gen_post(cls: type[Any], ns: dict[str, Any]) -> str:
    """Source of ``_post_<cls>(o) -> bool``: ranges, string and array lengths of a decoded record."""
    hints = typing.get_type_hints(cls)
    lines = [f"def _post_{cls.__name__}(o):"]
    for f in fields(cls):
        hint, optional = hints[f.name], False
        if get_origin(hint) in (Union, types.UnionType):
            args = [a for a in get_args(hint) if a is not type(None)]
            optional, hint = len(args) < len(get_args(hint)), args[0]
        body: list[str] = []
        if hint in (int, float) and f.name != "v":  # v: checked by the caller
            lo, hi = f.metadata.get("range", (-U64, U64))  # the same default as _check_for
            body = [f"if not {lo!r} <= x <= {hi!r}: return False"]
        elif hint is str:
            body = [f"if len(x) > {f.metadata.get('max_len', MAX_STR)!r}: return False"]
        elif isinstance(hint, type) and hint in _RECORDS:
            body = [f"if not _post_{hint.__name__}(x): return False"]
        elif get_origin(hint) is tuple:
            item = get_args(hint)[0]
            body = ["if len(x) > MAX_LIST: return False"]
            if item is str:
                limit = f.metadata.get("max_len", MAX_STR)
                body.append(f"for y in x:\n            if len(y) > {limit!r}: return False")
            elif item in (int, float):
                lo, hi = f.metadata.get("range", (-U64, U64))
                body.append(f"for y in x:\n            if not {lo!r} <= y <= {hi!r}: return False")
            elif isinstance(item, type) and item in _RECORDS:
                body.append(f"for y in x:\n            if not _post_{item.__name__}(y): return False")
        if not body:
            continue
        lines.append(f"    x = o.{f.name}")
        if optional:
            lines.append("    if x is not None:")
            lines += ["        " + b for b in body]
        else:
            lines += ["    " + b for b in body]
    lines.append("    return True")
    return "\n".join(lines)


def _wire_variant(cls: type[Any]) -> type[Any]:
    """``cls`` with ``v`` and ``kind`` required, so that msgspec refuses a frame without them."""
    hints = typing.get_type_hints(cls)
    specs: list[Any] = []
    for f in fields(cls):
        if f.name in ("v", "kind") or f.default is MISSING:
            specs.append((f.name, hints[f.name]))
        else:
            specs.append((f.name, hints[f.name], field(default=f.default)))
    return make_dataclass(f"_Wire{cls.__name__}", specs, kw_only=True, slots=True)


def _compile_typed() -> tuple[Any, Callable[[Any], bool], tuple[str, ...]] | None:
    if msgspec is None:
        return None
    ns: dict[str, Any] = {"MAX_LIST": MAX_LIST, "MAX_STR": MAX_STR}
    for cls in _RECORDS:
        exec(compile(_gen_post(cls, ns), f"<frames post-check: {cls.__name__}>", "exec"), ns)  # noqa: S102
    names = tuple(f.name for f in fields(SampleFrame) if f.name not in ("v", "kind"))
    return msgspec.msgpack.Decoder(_wire_variant(SampleFrame)), ns["_post_SampleFrame"], names


_TYPED: Final = _compile_typed()


def _decode_typed(data: bytes) -> SampleFrame | None:
    """The sample frame in ``data`` if msgspec and the post-checks accept it, else ``None``."""
    if _TYPED is None:
        return None
    decoder, post, names = _TYPED
    try:
        w = decoder.decode(data)
        if w.v != SCHEMA_VERSION or not post(w):
            return None
        return SampleFrame(**{name: getattr(w, name) for name in names})
    except Exception:  # noqa: BLE001 (MsgspecError, RecursionError, ...: the reference path decides)
        return None


# ----------------------------------------------------------------------------- nesting bound
# Decoders recurse into nested maps and arrays: ~1,000 nested one-element arrays (a 1 KB frame)
# exhaust Python's recursion limit inside msgspec, and deep objects make every later walk
# recursive. :func:`nesting_depth` reads only the MessagePack headers (no object is built), so the
# depth is known before anything decodes it. msgspec's typed path below builds only the
# schema's fields (depth 5 at most) and skips unknown content; it declines on any error, so a
# deep frame always reaches the reference path, which checks the depth first.


def _header_table() -> tuple[tuple[int, int, int], ...]:
    """Per first byte: (kind, size, length bytes). kind 0 scalar of ``size`` bytes; 1 string/bin/ext
    whose length is in the ``size`` bytes after the first (``length bytes`` extra, ext type byte);
    2 array, 3 map (count in the next ``size`` bytes, or in the first byte when size is 0); -1 invalid."""
    t: list[tuple[int, int, int]] = [(-1, 0, 0)] * 256
    for b in range(0x00, 0x80):
        t[b] = (0, 1, 0)
    for b in range(0xE0, 0x100):
        t[b] = (0, 1, 0)
    for b in range(0x80, 0x90):
        t[b] = (3, 0, 0)
    for b in range(0x90, 0xA0):
        t[b] = (2, 0, 0)
    for b in range(0xA0, 0xC0):
        t[b] = (1, 0, 0)  # fixstr: length in the low 5 bits
    for b, size in {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,
                    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10,
                    0xD8: 18}.items():  # fmt: skip
        t[b] = (0, size, 0)
    for b, (size, extra) in {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1),
                             0xC9: (4, 1), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}.items():  # fmt: skip
        t[b] = (1, size, extra)
    t[0xDC], t[0xDD], t[0xDE], t[0xDF] = (2, 2, 0), (2, 4, 0), (3, 2, 0), (3, 4, 0)
    return tuple(t)


_HEADERS: Final = _header_table()


def nesting_depth(data: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep the first MessagePack object in ``data`` nests maps and arrays (a top-level map
    is 1), reading headers only; stops counting past ``limit`` (returns ``limit + 1``).
    Malformed or truncated input ends the scan early: the decoder then says what is wrong."""
    table, n, i = _HEADERS, len(data), 0
    stack: list[int] = []
    left = 1  # objects still to read at the current level
    deepest = 0
    while True:
        if left == 0:
            if not stack:
                return deepest
            left = stack.pop()
            continue
        if i >= n:
            return deepest
        left -= 1
        b = data[i]
        kind, size, extra = table[b]
        if kind == 0:
            i += size
        elif kind == 1:
            if size == 0:
                i += 1 + (b & 0x1F)
            else:
                i += 1 + size + extra + int.from_bytes(data[i + 1 : i + 1 + size], "big")
        elif kind >= 2:
            if size == 0:
                count = b & 0x0F
                i += 1
            else:
                count = int.from_bytes(data[i + 1 : i + 1 + size], "big")
                i += 1 + size
            if kind == 3:
                count *= 2
            if count:
                stack.append(left)
                left = count
                if len(stack) > deepest:
                    deepest = len(stack)
                    if deepest > limit:
                        return deepest
        else:
            return deepest


# ----------------------------------------------------------------------------- encode/decode

_FIELD_NAMES: Final = {cls: tuple(f.name for f in fields(cls)) for cls in _RECORDS}


def to_wire(obj: Any) -> Any:
    """The plain-data form of a record (dicts, lists, scalars), as it goes on the wire."""
    spec = _WIRE_SPEC.get(type(obj))
    if spec is None:
        if isinstance(obj, tuple | list):
            return [to_wire(v) for v in obj]
        return obj
    names, get, nested = spec
    out = dict(zip(names, get(obj), strict=True))
    for name in nested:  # only fields typed as a record or a tuple can hold nested data
        v = out[name]
        if type(v) is tuple or type(v) in _FIELD_NAMES:
            out[name] = to_wire(v)
    return out


def _nested_fields(cls: type[Any]) -> tuple[str, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for name in _FIELD_NAMES[cls]:
        hint = hints[name]
        args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        if any(get_origin(a) is tuple or a in _RECORDS for a in args):
            out.append(name)
    return tuple(out)


# per record: field names, one attrgetter for all of them, the fields that may nest
_WIRE_SPEC: Final = {
    cls: (_FIELD_NAMES[cls], operator.attrgetter(*_FIELD_NAMES[cls]), _nested_fields(cls)) for cls in _RECORDS
}


def encode(frame: Frame) -> bytes:
    """MessagePack bytes of ``frame``. Raises :class:`FrameEncodeError` for unencodable values."""
    try:
        data: bytes = msgpack.packb(to_wire(frame), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise FrameEncodeError(f"cannot encode {type(frame).__name__}: {e}") from e
    return data


def decode(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Decode and validate one frame of any kind.

    Raises :class:`FrameDecodeError` (``reason`` says why, ``field`` where).
    """
    if len(data) > max_bytes:
        raise FrameDecodeError("oversized", f"frame of {len(data)} bytes exceeds {max_bytes}")
    typed = _decode_typed(data)
    if typed is not None:
        return typed
    return from_wire(_unpack(data))


def _unpack(data: bytes) -> Any:
    """The plain data of ``data``, its nesting bounded before it is built."""
    depth = nesting_depth(data)
    if depth > MAX_DEPTH:
        raise FrameDecodeError("too_deep", f"maps and arrays nested deeper than {MAX_DEPTH}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise FrameDecodeError("malformed", f"not valid MessagePack: {e}") from e
    except Exception as e:  # noqa: BLE001 (anything else the unpacker raises is still malformed input)
        raise FrameDecodeError("malformed", f"not decodable: {type(e).__name__}: {e}") from e


def decode_partial(
    data: bytes, max_bytes: int = MAX_FRAME_BYTES
) -> tuple[Frame, tuple[FrameDecodeError, ...]]:
    """:func:`decode`, except that a sample frame's GPU entry that fails validation is dropped
    instead of the whole frame: returns the frame and one error per dropped entry (``field``
    ``gpus[i]...``, ``i`` the entry's place in the frame as sent). Any other error raises."""
    try:
        return decode(data, max_bytes), ()
    except FrameDecodeError as e:
        if not (e.field or "").startswith("gpus["):
            raise
        first = e
    raw = _unpack(data)  # it unpacked before: the error is in a field
    gpus = raw.get("gpus") if type(raw) is dict and raw.get("kind") == "sample" else None
    if type(gpus) is not list:
        raise first
    good: list[Any] = []
    dropped: list[FrameDecodeError] = []
    for i, g in enumerate(gpus):
        try:
            _build(GpuSample, g, f"gpus[{i}]")
        except FrameDecodeError as ge:
            dropped.append(ge)
        else:
            good.append(g)
    if not dropped:
        raise first
    return from_wire({**raw, "gpus": good}), tuple(dropped)


def from_wire(raw: Any) -> Frame:
    """Validate plain data (as produced by :func:`to_wire`) into a frame."""
    if type(raw) is not dict:
        raise FrameDecodeError("not_a_map", f"frame must be a map, got {_tn(raw)}")
    v = raw.get("v")
    if type(v) is not int:
        raise FrameDecodeError("version", f"missing or non-integer schema version: {v!r}", "v")
    if v != SCHEMA_VERSION:
        raise FrameDecodeError(
            "version", f"unsupported schema major version {v}; this build reads {SCHEMA_VERSION}", "v"
        )
    kind = raw.get("kind")
    cls = _FRAME_TYPES.get(kind) if type(kind) is str else None
    if cls is None:
        raise FrameDecodeError("unknown_kind", f"unknown frame kind {kind!r}", "kind")
    frame: Frame = _build_fast(cls, raw)
    if type(frame) is EventFrame:
        if frame.type not in EVENT_TYPES:
            raise FrameDecodeError("bad_type", f"unknown event type {frame.type!r}", "type")
        if frame.source not in EVENT_SOURCES:
            raise FrameDecodeError("bad_type", f"unknown event source {frame.source!r}", "source")
    return frame


def decode_as(data: bytes, cls: type[F], max_bytes: int = MAX_FRAME_BYTES) -> F:
    """Decode a frame that must be of ``cls``'s kind."""
    frame = decode(data, max_bytes)
    if type(frame) is not cls:
        raise FrameDecodeError("unknown_kind", f"expected a {cls.KIND} frame, got {frame.kind}", "kind")
    return frame
