"""Typed wire frames (schema v2, reads v1) and their MessagePack encoding.

The schema is the msgspec :class:`~msgspec.Struct` types below: their fields, their types and
the ``Meta`` constraints on them (ranges, string and array lengths) are the whole of the
validation, and one msgspec decoder per schema version reads MessagePack straight into them.
``docs/protocol.md`` documents every field (``tests/test_protocol_doc.py`` checks the two agree).

Every frame carries ``v`` (the schema's major version), ``kind`` (``sample``, ``event`` or
``inventory``), ``host``, ``provider``, ``boot_id`` (one run of the agent), ``seq`` (per
``boot_id``, strictly increasing across all kinds) and ``ts`` (Unix time in seconds, UTC).
Units live in field names; a value the GPU or driver cannot provide is ``None`` (MessagePack
``nil``), never a sentinel number.

Version 2 sends a sample's arrays of records as **tables** (field names once per frame, one
array of values per field) and leaves the static facts of each GPU (:data:`STATIC_GPU_FIELDS`)
to the inventory frame; event and inventory frames are maps as in version 1. :func:`decode`
reads both versions into the same types; :func:`encode` writes version 2.

:func:`encode` and :func:`decode` are pure. :func:`decode` raises
:class:`~shared.errors.FrameDecodeError` naming the reason and the field; fields it does not
know are ignored (a newer minor revision may add some); another major ``v`` is rejected.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from itertools import repeat, starmap
from operator import attrgetter
from typing import Annotated, Any, ClassVar, Final, TypeVar

import msgpack
import msgspec
from msgspec import Meta, Struct

from shared import SCHEMA_VERSION
from shared.errors import FrameDecodeError, FrameEncodeError
from shared.subjects import MAX_TOKEN

SUPPORTED_VERSIONS: Final = (1, SCHEMA_VERSION)  # v1 is read for one release (agents not yet upgraded)

MAX_FRAME_BYTES: Final = 1 << 20  # a frame larger than 1 MiB is rejected as oversized
MAX_STR: Final = 4096  # the longest string of any field (each field has its own limit, below)
MAX_LIST: Final = 4096
MAX_DEPTH: Final = 16  # nesting of maps and arrays (the schema needs 5)
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


# ----------------------------------------------------------------------------- constrained types
# The ranges are inclusive; NaN and infinities are outside every range.

_LIST: Final = Meta(max_length=MAX_LIST)
Token = Annotated[str, Meta(max_length=LEN_TOKEN)]
BootId = Annotated[str, Meta(max_length=LEN_BOOT_ID)]
Uuid = Annotated[str, Meta(max_length=LEN_UUID)]
Word = Annotated[str, Meta(max_length=LEN_WORD)]
Version = Annotated[str, Meta(max_length=LEN_VERSION)]
Name = Annotated[str, Meta(max_length=LEN_NAME)]
Long = Annotated[str, Meta(max_length=LEN_LONG)]
Path = Annotated[str, Meta(max_length=LEN_PATH)]
Text = Annotated[str, Meta(max_length=MAX_STR)]
Count = Annotated[int, Meta(ge=0)]  # at most U64: MessagePack has no larger integer
U32 = Annotated[int, Meta(ge=0, le=1 << 32)]
U20 = Annotated[int, Meta(ge=0, le=1 << 20)]
U8 = Annotated[int, Meta(ge=0, le=255)]
Bytes = Annotated[int, Meta(ge=0, le=I53)]
Index = Annotated[int, Meta(ge=0, le=1023)]
PState = Annotated[int, Meta(ge=0, le=32)]
MHz = Annotated[int, Meta(ge=0, le=100_000)]
PcieGen = Annotated[int, Meta(ge=0, le=16)]
Lanes = Annotated[int, Meta(ge=0, le=64)]
Link = Annotated[int, Meta(ge=0, le=63)]
Mbps = Annotated[int, Meta(ge=0, le=10_000_000)]
Pct = Annotated[float, Meta(ge=0, le=100)]
Celsius = Annotated[float, Meta(ge=-100, le=300)]
Watts = Annotated[float, Meta(ge=0, le=100_000)]
Joules = Annotated[float, Meta(ge=0, le=1e18)]
Float1e6 = Annotated[float, Meta(ge=0, le=1e6)]
Float1e9 = Annotated[float, Meta(ge=0, le=1e9)]
Offset = Annotated[float, Meta(ge=-1e9, le=1e9)]
Seconds = Annotated[float, Meta(ge=0, le=1e12)]
Millis = Annotated[float, Meta(ge=0, le=1e7)]
UnixTime = Annotated[float, Meta(ge=0, le=1e11)]
Interval = Annotated[float, Meta(ge=0, le=86_400)]

# ----------------------------------------------------------------------------- records


class GpuProcess(Struct, frozen=True):
    """A process using a GPU."""

    pid: U32 = 0
    name: Name | None = None
    used_mem_bytes: Bytes | None = None
    container: Long | None = None  # container or job id from /proc/<pid>/cgroup, when found
    gpu_instance_id: U32 | None = None  # MIG: the GPU instance it runs in
    compute_instance_id: U32 | None = None  # MIG: the compute instance it runs in


class MigSample(Struct, frozen=True):
    """One MIG device (a compute instance of a GPU instance) at one instant."""

    gpu_instance_id: U32 = 0
    compute_instance_id: U32 = 0
    mem_total_bytes: Bytes | None = None
    mem_used_bytes: Bytes | None = None
    util_gpu_pct: Pct | None = None  # NVML gives none for MIG devices today: None


class GpuSample(Struct, frozen=True):
    """One GPU at one instant. Counters are cumulative as NVML reports them."""

    index: Index = 0
    uuid: Uuid = ""
    lost: bool = False  # fell off the bus: every reading below is None
    util_gpu_pct: Pct | None = None
    util_mem_pct: Pct | None = None
    mem_total_bytes: Bytes | None = None
    mem_used_bytes: Bytes | None = None
    mem_reserved_bytes: Bytes | None = None
    temp_c: Celsius | None = None
    mem_temp_c: Celsius | None = None
    temp_slowdown_c: Celsius | None = None
    temp_shutdown_c: Celsius | None = None
    temp_max_operating_c: Celsius | None = None
    fan_pct: Pct | None = None
    power_w: Watts | None = None
    power_limit_w: Watts | None = None
    energy_j: Joules | None = None
    pstate: PState | None = None
    clock_sm_mhz: MHz | None = None
    clock_mem_mhz: MHz | None = None
    clock_event_reasons: Count | None = None  # NVML clocks-event (throttle) reason bits
    throttle_thermal_ns: Count | None = None  # cumulative violation time, thermal policy
    throttle_power_ns: Count | None = None  # cumulative violation time, power policy
    ecc_enabled: bool | None = None
    ecc_sbe_volatile: Count | None = None
    ecc_dbe_volatile: Count | None = None
    ecc_sbe_aggregate: Count | None = None
    ecc_dbe_aggregate: Count | None = None
    retired_pages_sbe: Count | None = None
    retired_pages_dbe: Count | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: Count | None = None
    remapped_rows_uncorrectable: Count | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    pcie_replay_count: Count | None = None
    pcie_link_gen: PcieGen | None = None
    pcie_link_width: Lanes | None = None
    pcie_link_gen_max: PcieGen | None = None
    pcie_link_width_max: Lanes | None = None
    nvlink_links_total: Lanes | None = None
    nvlink_links_up: Lanes | None = None
    nvlink_crc_errors: Count | None = None  # summed over links (flit CRC)
    nvlink_replay_errors: Count | None = None
    nvlink_recovery_errors: Count | None = None
    recovery_action: U8 | None = None  # NVML_GPU_RECOVERY_ACTION_* (0 = none)
    persistence_mode: bool | None = None
    processes: Annotated[tuple[GpuProcess, ...], _LIST] = ()
    # Later optional fields (an older agent leaves them out; docs/protocol.md).
    temp_mem_max_c: Celsius | None = None  # NVML memory (HBM) maximum temperature threshold
    clock_sm_app_mhz: MHz | None = None  # SM application clock (the clock under load)
    fabric_state: U8 | None = None  # NVML_GPU_FABRIC_STATE_*: 1 not started .. 3 completed
    fabric_status: U32 | None = None  # nvmlReturn_t of the fabric registration, 0 = success
    fabric_clique_id: U32 | None = None
    fabric_health_mask: U32 | None = None  # NVML_GPU_FABRIC_HEALTH_MASK_* (v2+)
    nvlink_down_links: Annotated[tuple[Link, ...], _LIST] = ()  # inactive links
    nvlink_crc_by_link: Annotated[tuple[Count, ...], _LIST] = ()  # index = link
    nvlink_replay_by_link: Annotated[tuple[Count, ...], _LIST] = ()
    nvlink_recovery_by_link: Annotated[tuple[Count, ...], _LIST] = ()
    mig: Annotated[tuple[MigSample, ...], _LIST] = ()  # MIG devices (mig_mode on)


class DiskUsage(Struct, frozen=True):
    mount: Path = ""
    total_bytes: Count = 0
    used_bytes: Count = 0
    free_bytes: Count = 0
    readonly: bool | None = None  # mounted read-only (the "ro" mount option)
    inodes_total: Count | None = None
    inodes_used: Count | None = None


class NicCounters(Struct, frozen=True):
    """Cumulative counters of one network interface."""

    name: Name = ""
    up: bool | None = None
    speed_mbps: Mbps | None = None
    rx_bytes: Count = 0
    tx_bytes: Count = 0
    rx_errors: Count = 0
    tx_errors: Count = 0
    rx_drops: Count = 0
    tx_drops: Count = 0


class IbPort(Struct, frozen=True):
    """One InfiniBand / RoCE port (``/sys/class/infiniband/<device>/ports/<port>``). Counters are
    cumulative as the HCA reports them (the collector turns them into rates)."""

    device: Version = ""  # mlx5_0
    port: U8 = 1
    state: Version | None = None  # DOWN, INIT, ARMED, ACTIVE, ACTIVE_DEFER (the name after "4: ")
    phys_state: Version | None = None  # LinkUp, Polling, Disabled, ... (the name after "5: ")
    rate_gbps: Float1e6 | None = None  # "400 Gb/sec (4X NDR)" -> 400
    link_layer: Version | None = None  # InfiniBand or Ethernet (RoCE)
    symbol_error: Count | None = None
    link_downed: Count | None = None
    link_error_recovery: Count | None = None
    port_rcv_errors: Count | None = None
    port_rcv_remote_physical_errors: Count | None = None
    port_rcv_switch_relay_errors: Count | None = None
    port_rcv_constraint_errors: Count | None = None
    port_xmit_discards: Count | None = None
    port_xmit_constraint_errors: Count | None = None
    local_link_integrity_errors: Count | None = None
    excessive_buffer_overrun_errors: Count | None = None
    vl15_dropped: Count | None = None


class KernelLogCount(Struct, frozen=True):
    """Kernel-log lines of one class (one SXid code for ``sxid``) seen since the agent started."""

    name: Name = ""  # class: nvme_timeout, fs_error, oom_kill, ..., sxid (see docs/health.md)
    code: U20 | None = None  # the SXid code, for name "sxid"
    count: Count = 0  # running count in this agent run
    fatal: bool | None = None  # SXid: the driver printed "Fatal" (True) or "Non-fatal" (False)
    last_message: Text | None = None  # the last such line, without its prefix


class ModuleState(Struct, frozen=True):
    """An expected kernel module (``/proc/modules``)."""

    name: Name = ""
    loaded: bool = False


class ServiceState(Struct, frozen=True):
    """An expected systemd service (``systemctl show -p LoadState,ActiveState,SubState``)."""

    name: Name = ""
    load_state: Version | None = None  # loaded, not-found, masked, ...
    active_state: Version | None = None  # active, inactive, failed, activating, deactivating, reloading
    sub_state: Version | None = None  # running, dead, exited, failed, auto-restart, ...


class ClockSync(Struct, frozen=True):
    """The kernel's clock discipline (``adjtimex``), as NTP/chrony/timesyncd left it."""

    synced: bool | None = None  # False: the kernel clock is marked unsynchronised (STA_UNSYNC)
    offset_s: Offset | None = None  # the PLL's current offset (how far it still has to go)
    max_error_s: Float1e9 | None = None  # the kernel's maximum error estimate
    source: Name | None = None  # "adjtimex"


class SystemSample(Struct, frozen=True):
    """Host metrics from psutil."""

    cpu_pct: Pct | None = None
    cpu_count: U20 | None = None
    load_1: Float1e6 | None = None
    load_5: Float1e6 | None = None
    load_15: Float1e6 | None = None
    mem_total_bytes: Count | None = None
    mem_available_bytes: Count | None = None
    swap_total_bytes: Count | None = None
    swap_used_bytes: Count | None = None
    fds_open: Count | None = None
    fds_max: Count | None = None
    uptime_s: Seconds | None = None
    disks: Annotated[tuple[DiskUsage, ...], _LIST] = ()
    nics: Annotated[tuple[NicCounters, ...], _LIST] = ()
    ib_ports: Annotated[tuple[IbPort, ...], _LIST] = ()
    kernel_log: Annotated[
        tuple[KernelLogCount, ...], _LIST
    ] = ()  # classes seen at least once in this agent run
    modules: Annotated[tuple[ModuleState, ...], _LIST] = ()
    services: Annotated[tuple[ServiceState, ...], _LIST] = ()
    clock: ClockSync | None = None
    dstate_procs: U32 | None = None  # processes stuck in D state (uninterruptible sleep)
    dstate_names: Annotated[tuple[Name, ...], _LIST] = ()  # a few of their names
    absent: Annotated[
        tuple[Name, ...], _LIST
    ] = ()  # sources this node lacks: "ib", "nvswitch", "kmsg", "systemd"


class CheckResult(Struct, frozen=True):
    """Result of one agent-side network check (TCP connect, NATS round trip)."""

    id: Long = ""  # stable id, e.g. "tcp:storage-1:2049" or "nats_rtt"
    kind: Word = ""  # "tcp" or "nats_rtt"
    target: Long = ""
    ok: bool = False
    latency_ms: Millis | None = None
    error: Long | None = None


class AgentStats(Struct, frozen=True):
    """The agent's own figures, so its cost and delivery are visible."""

    version: Version = ""
    backend: Word = ""  # "nvml" or "simulated"
    uptime_s: Seconds = 0.0
    cpu_s: Seconds = 0.0  # process CPU time (user + system) since start
    rss_bytes: Count = 0
    tick_s: Float1e6 = 0.0  # how long the last sampling tick took
    buffered_frames: Count = 0  # waiting for NATS
    dropped_frames: Count = 0  # lost to buffer overflow since start
    published_frames: Count = 0
    publish_errors: Count = 0
    nvml_errors: Count = 0


class PublishOutage(Struct, frozen=True):
    """The agent could not publish (NATS unreachable) from ``since`` to ``until``: carried by
    the first sample built after it could publish again, so the collector can explain the gap."""

    since: UnixTime = 0.0  # wall time the connection was lost (or the agent started)
    until: UnixTime = 0.0  # wall time it could publish again
    buffered_frames: Count = 0  # frames kept in the buffer meanwhile, replayed since
    dropped_frames: Count = 0  # frames lost to buffer overflow meanwhile (exact)


class MigInstance(Struct, frozen=True):
    """One MIG device of a GPU: its profile and ids."""

    gpu_instance_id: U32 = 0
    compute_instance_id: U32 = 0
    profile: Version | None = None  # e.g. "1g.10gb" (from the MIG device's name)
    uuid: Uuid | None = None  # MIG-...
    mem_total_bytes: Bytes | None = None


class GpuInfo(Struct, frozen=True):
    """Static facts about one GPU."""

    index: Index = 0
    uuid: Uuid = ""
    name: Name | None = None
    serial: Version | None = None
    pci_bus_id: Version | None = None
    minor_number: U20 | None = None
    architecture: Version | None = None
    mem_total_bytes: Bytes | None = None
    vbios: Version | None = None
    mig_mode: bool | None = None
    persistence_mode: bool | None = None
    power_limit_default_w: Watts | None = None
    pcie_link_gen_max: PcieGen | None = None
    pcie_link_width_max: Lanes | None = None
    nvlink_links_total: Lanes | None = None
    unsupported: Annotated[
        tuple[Name, ...], _LIST
    ] = ()  # sample fields NVML reports as not supported on this GPU
    fabric_cluster_uuid: Uuid | None = None  # NVSwitch fabric (NVML GPU fabric info), when registered
    mig_instances: Annotated[tuple[MigInstance, ...], _LIST] = ()  # MIG devices (mig_mode on)
    # Static facts of the GPU that samples of schema v2 leave out (added in v2; see STATIC_GPU_FIELDS)
    temp_slowdown_c: Celsius | None = None
    temp_shutdown_c: Celsius | None = None
    temp_max_operating_c: Celsius | None = None
    temp_mem_max_c: Celsius | None = None
    power_limit_w: Watts | None = None  # the enforced power limit
    clock_sm_app_mhz: MHz | None = None
    ecc_enabled: bool | None = None


class HostFacts(Struct, frozen=True):
    hostname: Name = ""
    os: Name | None = None
    kernel: Name | None = None
    cpu_model: Name | None = None
    cpu_count: U20 | None = None
    mem_total_bytes: Count | None = None
    boot_time: Seconds | None = None
    kernel_boot_id: Version | None = None
    agent_version: Version | None = None
    python_version: Version | None = None


# ----------------------------------------------------------------------------- frames


class _Header(Struct, frozen=True, kw_only=True):
    host: Token
    provider: Token
    boot_id: BootId
    seq: Count = 0
    ts: UnixTime = 0.0
    v: int = SCHEMA_VERSION


class SampleFrame(_Header, frozen=True, kw_only=True, tag_field="kind", tag="sample"):
    """Periodic sample: every GPU of the host, system metrics, check results, agent figures."""

    KIND: ClassVar[str] = "sample"
    kind: ClassVar[str] = "sample"
    interval_s: Interval = 0.0
    gpus: Annotated[tuple[GpuSample, ...], _LIST] = ()
    system: SystemSample | None = None
    checks: Annotated[tuple[CheckResult, ...], _LIST] = ()
    agent: AgentStats | None = None
    outage: PublishOutage | None = None  # the first sample after the agent could not publish


class EventFrame(_Header, frozen=True, kw_only=True, tag_field="kind", tag="event"):
    """An immediate event (see :data:`EVENT_TYPES`)."""

    KIND: ClassVar[str] = "event"
    kind: ClassVar[str] = "event"
    type: Word = "xid"
    source: Word = "agent"  # "nvml", "kmsg", "simulated" or "agent"
    gpu_index: Index | None = None
    gpu_uuid: Uuid | None = None
    xid: U20 | None = None
    count: Count | None = None  # running count for (GPU, type/xid) in this boot
    value: Count | None = None
    message: Text | None = None


class InventoryFrame(_Header, frozen=True, kw_only=True, tag_field="kind", tag="inventory"):
    """What the host has: sent at start, whenever it changes, and every few minutes (the agent's
    ``inventory_interval``): the static facts of each GPU the samples of v2 leave out."""

    KIND: ClassVar[str] = "inventory"
    kind: ClassVar[str] = "inventory"
    backend: Word = ""
    driver_version: Version | None = None
    cuda_version: Version | None = None
    nvml_version: Version | None = None
    gpus: Annotated[tuple[GpuInfo, ...], _LIST] = ()
    host_facts: HostFacts | None = None
    nvml_error: Text | None = None  # NVML cannot initialise: the agent runs without GPUs; NVML's text


Frame = SampleFrame | EventFrame | InventoryFrame
_FRAME_TYPES: Final[dict[str, type[Any]]] = {c.KIND: c for c in (SampleFrame, EventFrame, InventoryFrame)}
F = TypeVar("F", SampleFrame, EventFrame, InventoryFrame)
S = TypeVar("S")

_RECORDS: Final = (
    GpuProcess, MigSample, GpuSample, DiskUsage, NicCounters, IbPort, KernelLogCount, ModuleState,
    ServiceState, ClockSync, SystemSample, CheckResult, AgentStats, PublishOutage, MigInstance,
    GpuInfo, HostFacts, SampleFrame, EventFrame, InventoryFrame,
)  # fmt: skip

# The facts of a GPU that do not change from sample to sample: a v2 sample leaves them out and
# the inventory frame carries them (GpuInfo has a field of each name); the collector joins them.
STATIC_GPU_FIELDS: Final = (
    "uuid", "mem_total_bytes", "temp_slowdown_c", "temp_shutdown_c", "temp_max_operating_c",
    "temp_mem_max_c", "power_limit_w", "pcie_link_gen_max", "pcie_link_width_max",
    "nvlink_links_total", "clock_sm_app_mhz", "ecc_enabled", "persistence_mode",
)  # fmt: skip

# ----------------------------------------------------------------------------- schema introspection


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a record, as the schema declares it: ``metadata`` holds ``range`` (lo, hi)
    for numbers (of the items, for arrays of numbers) and ``max_len`` for strings."""

    name: str
    type: Any
    default: Any  # dataclasses.MISSING for a required field
    metadata: Mapping[str, Any]


def _constraints(tp: Any) -> dict[str, Any]:
    """``range``/``max_len`` of a msgspec type (looking through Optional and array items)."""
    out: dict[str, Any] = {}
    for t in _walk(tp):
        if isinstance(t, msgspec.inspect.IntType | msgspec.inspect.FloatType):
            if t.ge is not None:  # an int without an upper bound: MessagePack's largest, U64
                out["range"] = (t.ge, t.le if t.le is not None else U64)
        elif isinstance(t, msgspec.inspect.StrType) and t.max_length is not None:
            out["max_len"] = t.max_length
    return out


def _walk(t: Any) -> Iterable[Any]:
    if isinstance(t, msgspec.inspect.UnionType):
        for x in t.types:
            yield from _walk(x)
    elif isinstance(t, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
        yield from _walk(t.item_type)
    else:
        yield t


_FIELDS: dict[type[Any], tuple[FieldSpec, ...]] = {}


def fields(cls: type[Any] | Struct) -> tuple[FieldSpec, ...]:
    """The fields of a record type (or of a record's type), in declaration order."""
    if not isinstance(cls, type):
        cls = type(cls)
    spec = _FIELDS.get(cls)
    if spec is None:
        info = msgspec.inspect.type_info(cls)
        hints = {f.name: f.type for f in msgspec.structs.fields(cls)}
        spec = tuple(
            FieldSpec(
                f.name,
                hints[f.name],
                MISSING
                if f.required
                else (f.default if f.default is not msgspec.NODEFAULT else f.default_factory()),
                _constraints(f.type),
            )
            for f in info.fields  # type: ignore[attr-defined]
        )
        _FIELDS[cls] = spec
    return spec


def replace(obj: S, /, **changes: Any) -> S:
    """A copy of the record ``obj`` with ``changes`` (msgspec.structs.replace; a dataclass
    instance is handed to dataclasses.replace, so one helper serves both)."""
    if not isinstance(obj, Struct):
        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    return msgspec.structs.replace(obj, **changes)


def to_wire(obj: Any) -> Any:
    """The plain-data form of a record (dicts, lists, scalars) as a version 1 frame spells it:
    a frame's ``kind`` is a key like any other, arrays are lists."""
    return _PLAIN.decode(_ENCODER.encode(obj))


_ENCODER: Final = msgspec.msgpack.Encoder()
_PLAIN: Final = msgspec.msgpack.Decoder()

# ----------------------------------------------------------------------------- errors

_AT: Final = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<key>key` in `)?\$(?P<path>[^`]*)`)?$", re.S)


def _error(e: BaseException, prefix: str = "") -> FrameDecodeError:
    """A msgspec validation error as a :class:`FrameDecodeError` with its reason and field path."""
    m = _AT.match(str(e))
    msg = m.group("msg") if m else str(e)
    path = (m.group("path") or "") if m else ""
    path = path[1:] if path.startswith(".") else path
    if prefix:
        path = f"{prefix}{path}" if path.startswith("[") or not path else f"{prefix}.{path}"
    if m is not None and m.group("key"):  # a map key of the wrong type
        return FrameDecodeError("malformed", f"map key: {msg}", path or None)
    if msg.startswith("Object missing required field `"):
        name = msg.split("`")[1]
        full = f"{path}.{name}" if path else name
        if full == "kind":
            return FrameDecodeError("unknown_kind", "missing frame kind", "kind")
        return FrameDecodeError("missing_field", "required field missing", full)
    if path == "kind":
        return FrameDecodeError("unknown_kind", f"unknown frame kind: {msg}", "kind")
    if "of length <=" in msg:
        return FrameDecodeError(
            "too_long" if msg.startswith("Expected `str`") else "out_of_range", msg, path or None
        )
    if re.search(r"` [<>]=? ", msg) or "out of range" in msg:
        return FrameDecodeError("out_of_range", msg, path or None)
    if not path and msg.startswith("Expected `object`"):
        return FrameDecodeError("not_a_map", f"frame must be a map: {msg}")
    return FrameDecodeError("bad_type", msg, path or None)


def _check_frame(frame: Frame) -> Frame:
    """What the schema's types cannot say: an event's type and source are known ones; a sample
    carries each GPU once (a v2 sample's ``processes`` name their GPU by index)."""
    if type(frame) is SampleFrame:
        gpus = frame.gpus
        if len(gpus) > 1 and len({g.index for g in gpus}) != len(gpus):
            seen: set[int] = set()
            for i, g in enumerate(gpus):
                if g.index in seen:
                    why = f"GPU index {g.index} repeated"
                    raise FrameDecodeError("out_of_range", why, f"gpus[{i}].index")
                seen.add(g.index)
    elif type(frame) is EventFrame:
        if frame.type not in EVENT_TYPES:
            raise FrameDecodeError("bad_type", f"unknown event type {frame.type!r}", "type")
        if frame.source not in EVENT_SOURCES:
            raise FrameDecodeError("bad_type", f"unknown event source {frame.source!r}", "source")
    return frame


# ----------------------------------------------------------------------------- version 2 tables
# A table is a map: field name -> column. A column is an array of one value per row, or, when
# every row has the same value, that value alone (wrapped as {"=": value} when it is itself an
# array or a map). A column whose every value is the field's default is left out, except that a
# counter (a ``Count | None`` field: cumulative error counters, mostly zero) left out is 0 for
# every row (one that is nil for every row is sent as a constant nil). The first field of the
# record is always an array, so the number of rows is always known.

_CONST: Final = "="


def _nested(cls: type[Any]) -> dict[str, type[Any]]:
    """The fields of ``cls`` that are arrays of records, with the record type."""
    out = {}
    for f in msgspec.inspect.type_info(cls).fields:  # type: ignore[attr-defined]
        arrays = [f.type] if not isinstance(f.type, msgspec.inspect.UnionType) else f.type.types
        for t in arrays:
            item = t.item_type if isinstance(t, msgspec.inspect.VarTupleType) else None
            if isinstance(item, msgspec.inspect.StructType):
                out[f.name] = item.cls
    return out


def _counters(cls: type[Any]) -> tuple[str, ...]:
    """The ``Count | None`` fields of ``cls``: 0 when a v2 table leaves their column out."""
    out = []
    for f in msgspec.inspect.type_info(cls).fields:  # type: ignore[attr-defined]
        t = f.type
        if isinstance(t, msgspec.inspect.UnionType) and len(t.types) == 2:
            num = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
            if num and isinstance(num[0], msgspec.inspect.IntType) and num[0].ge == 0 and num[0].le is None:
                out.append(f.name)
    return tuple(out)


_NESTED: Final[dict[type[Any], dict[str, type[Any]]]] = {cls: _nested(cls) for cls in _RECORDS}


def _rows(table: Any, cls: type[Any], path: str) -> list[dict[str, Any]]:
    """The rows (plain maps) of a version 2 table of ``cls`` records (or of an array of maps,
    the version 1 form, which version 2 also accepts)."""
    if type(table) is list:
        return table
    if type(table) is not dict:
        raise FrameDecodeError("bad_type", f"expected a table (map of columns), got {_tn(table)}", path)
    n = 0
    for col in table.values():
        if type(col) is list and len(col) > n:
            n = len(col)
    if n > MAX_LIST:
        raise FrameDecodeError("out_of_range", f"table longer than {MAX_LIST}", path)
    names: list[str] = []
    cols: list[Any] = []
    for name, col in table.items():
        if type(col) is list:
            if len(col) != n:
                why = f"column of {len(col)} values in a table of {n} rows"
                raise FrameDecodeError("bad_type", why, f"{path}.{name}")
        elif type(col) is dict:
            if len(col) != 1 or _CONST not in col:
                raise FrameDecodeError("bad_type", "expected an array or a constant", f"{path}.{name}")
            col = repeat(col[_CONST], n)
        else:
            col = repeat(col, n)
        names.append(name)
        cols.append(col)
    for name in _COUNTERS[cls]:
        if name not in table:
            names.append(name)
            cols.append(repeat(0, n))
    rows = [dict(zip(names, values, strict=True)) for values in zip(*cols, strict=True)] if cols else []
    for name, item in _NESTED[cls].items():
        if name in table:
            for i, row in enumerate(rows):
                value = row[name]
                if type(value) is dict:
                    row[name] = _rows(value, item, f"{path}[{i}].{name}")
    return rows


def _column_value(value: Any) -> Any:
    t = type(value)
    if t is float:
        if value.is_integer() and -I53 <= value <= I53:
            return int(value)  # 1 to 5 bytes instead of 9; read back as the same float
        return value
    if t is tuple:
        if value and isinstance(value[0], Struct):
            return _table(type(value[0]), value)
        return list(value)
    if isinstance(value, Struct):
        return value  # a record in a map (system.clock): the encoder writes it as a map
    return value


_COUNTERS: Final = {cls: _counters(cls) for cls in _RECORDS}
# per record: (field name, the value a table leaves out: the default, or 0 for a counter)
_TABLE_FIELDS: Final = {
    c: tuple((f.name, 0 if f.name in _COUNTERS[c] else f.default) for f in fields(c)) for c in _RECORDS
}


def _is_float(cls: type[Any], name: str) -> bool:
    info = {f.name: f.type for f in msgspec.inspect.type_info(cls).fields}[name]  # type: ignore[attr-defined]
    kinds = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return any(isinstance(t, msgspec.inspect.FloatType) for t in kinds)


# per record: (name, the value a table leaves out, float field, record type of a nested table)
_TABLE_SPEC: Final = {
    c: tuple((name, default, _is_float(c, name), _NESTED[c].get(name)) for name, default in _TABLE_FIELDS[c])
    for c in _RECORDS
}


def _number(v: Any) -> Any:
    if v is not None and v.is_integer() and -I53 <= v <= I53:
        return int(v)  # 1 to 5 bytes instead of 9; read back as the same float
    return v


def _table(cls: type[Any], records: Sequence[Any], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The v2 table of ``records`` (column-wise: the work is in C, not per value)."""
    n = len(records)
    table: dict[str, Any] = {}
    if not n:
        return table
    first = True
    columns = zip(*[msgspec.structs.astuple(r) for r in records], strict=True)
    for (name, default, is_float, item), col in zip(_TABLE_SPEC[cls], columns, strict=True):
        if skip and name in skip:
            continue
        if not first and col.count(default) == n:
            continue
        if item is not None:
            col = tuple(_table(item, v) if v else [] for v in col)
        elif is_float:
            col = tuple(map(_number, col))
        if not first and n > 1 and col.count(col[0]) == n:
            c = col[0]
            table[name] = {_CONST: c} if type(c) in (list, tuple, dict) else c
        else:
            table[name] = col
        first = False
    return table


_STATIC: Final = frozenset(STATIC_GPU_FIELDS)
_static_facts: Final = attrgetter(*STATIC_GPU_FIELDS)  # (a tuple: there are several; in C)
_NO_STATIC: Final[frozenset[str]] = frozenset()
_SAMPLE_FIELDS: Final = ("host", "provider", "boot_id", "seq", "ts", "interval_s")


def _sample_v2(frame: SampleFrame, static: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "v": 2, "kind": "sample", "host": frame.host, "provider": frame.provider, "boot_id": frame.boot_id,
        "seq": frame.seq, "ts": frame.ts, "interval_s": _column_value(frame.interval_s),
    }  # fmt: skip
    gpus = frame.gpus
    skip = {"processes"} | (_NO_STATIC if static else _STATIC)
    out["gpus"] = _table(GpuSample, gpus, frozenset(skip))
    procs = [(g.index, p) for g in gpus for p in g.processes]
    if procs:
        table = _table(GpuProcess, [p for _, p in procs])
        out["processes"] = {"gpu": [i for i, _ in procs], **table}
    if frame.system is not None:
        system = {}
        for name, _ in _TABLE_FIELDS[SystemSample]:
            value = getattr(frame.system, name)
            if value is None or value == ():
                continue
            system[name] = _column_value(value)
        out["system"] = system
    if frame.checks:
        out["checks"] = _table(CheckResult, frame.checks)
    if frame.agent is not None:
        out["agent"] = frame.agent
    if frame.outage is not None:
        out["outage"] = frame.outage
    return out


class _SampleV2(_Header, frozen=True, kw_only=True, tag_field="kind", tag="sample"):
    """A version 2 sample as it is on the wire: tables still to be turned into rows."""

    interval_s: Interval = 0.0
    gpus: dict[str, Any] | list[Any] = {}
    processes: dict[str, Any] | list[Any] = {}
    system: dict[str, Any] | None = None
    checks: dict[str, Any] | list[Any] = {}
    agent: AgentStats | None = None
    outage: PublishOutage | None = None


class _SampleBody(Struct):
    """The parts of a version 2 sample rebuilt from tables, validated as the schema says."""

    gpus: Annotated[tuple[GpuSample, ...], _LIST] = ()
    system: SystemSample | None = None
    checks: Annotated[tuple[CheckResult, ...], _LIST] = ()


def _body(w: _SampleV2) -> dict[str, Any]:
    """The plain rows of a version 2 sample's tables (``gpus`` with their processes)."""
    gpus = _rows(w.gpus, GpuSample, "gpus") if w.gpus else []
    if w.processes:
        by_index: dict[Any, list[dict[str, Any]]] = {}
        for p in _rows(w.processes, GpuProcess, "processes"):
            gpu = p.pop("gpu", None) if type(p) is dict else None
            if type(gpu) is not int:
                raise FrameDecodeError(
                    "bad_type", f"expected the GPU's index, got {_tn(gpu)}", "processes.gpu"
                )
            by_index.setdefault(gpu, []).append(p)
        for g in gpus:
            index = g.get("index", 0) if type(g) is dict else None
            mine = by_index.pop(index, None) if type(index) is int else None
            if mine is not None:
                g["processes"] = mine
        if by_index:
            raise FrameDecodeError(
                "out_of_range", "processes of a GPU the frame does not carry", "processes.gpu"
            )
    body: dict[str, Any] = {"gpus": gpus}
    if w.system is not None:
        system = dict(w.system)
        for name, item in _NESTED[SystemSample].items():
            value = system.get(name)
            if type(value) is dict or type(value) is list:
                system[name] = _rows(value, item, f"system.{name}")
        body["system"] = system
    if w.checks:
        body["checks"] = _rows(w.checks, CheckResult, "checks")
    return body


# ----------------------------------------------------------------------------- typed tables
# The fast path of a v2 sample: msgspec decodes each table into a columns struct derived from
# the record's own fields and constraints (each column: an array of the field's type, or one
# value of it), so every value is validated in C while it is read; rows are then made by
# zipping the columns into the record type. Anything unusual (a nested table inside a row,
# columns of different lengths) declines to the plain path above, which names the error.


_CONSTS: Final[set[type[Any]]] = set()  # the {"=": value} wrappers of the typed tables


def _column_type(cls: type[Any], name: str, hint: Any) -> Any:
    info = msgspec.inspect.type_info(hint)
    kinds = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    if name in _NESTED[cls]:  # a nested table per row: the plain path reads it
        hint = Any
    elif not any(isinstance(t, msgspec.inspect.VarTupleType) for t in kinds):
        return Annotated[list[hint], _LIST] | hint
    const = msgspec.defstruct(
        f"_Const_{cls.__name__}_{name}", [("value", hint)], rename={"value": _CONST}, frozen=True
    )
    _CONSTS.add(const)
    return Annotated[list[hint], _LIST] | const


def _columns(cls: type[Any], extra: Sequence[tuple[Any, ...]] = ()) -> type[Struct]:
    hints = {f.name: f.type for f in msgspec.structs.fields(cls)}
    specs: list[tuple[Any, ...]] = list(extra)
    for name, wire_default in _TABLE_FIELDS[cls]:
        specs.append((name, _column_type(cls, name, hints[name]), wire_default))
    return msgspec.defstruct(f"_Columns_{cls.__name__}", specs, frozen=True)


_TABLES: Final = (
    GpuSample, DiskUsage, NicCounters, IbPort, KernelLogCount, ModuleState, ServiceState, CheckResult,
)  # fmt: skip
_COLUMNS: Final = {cls: _columns(cls) for cls in _TABLES}
_PROCESS_COLUMNS: Final = _columns(GpuProcess, [("gpu", Annotated[list[Index], _LIST] | Index)])


def _columns_of(values: Sequence[Any]) -> list[Any]:
    """The columns of a typed table as iterables of one value per row (a constant repeated), in
    the record's field order; ``[]`` for a table without rows. Columns of different lengths
    decline (the plain path names the error)."""
    n = -1
    for v in values:  # the first field is an array (the encoder's rule): one step, as a rule
        if type(v) is list:
            n = len(v)
            break
    if n < 0:
        return []
    consts = _CONSTS
    return [  # a constant as a list ([v] * n costs less than itertools.repeat)
        v if type(v) is list else [v] * n if type(v) not in consts else [v.value] * n  # {"=": value}
        for v in values
    ]


def _records(values: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The rows of a typed table, from its columns in the record's field order."""
    try:
        return list(zip(*_columns_of(values), strict=True))
    except ValueError:
        raise _Decline from None  # columns of different lengths


_NAMES: Final[dict[type[Any], tuple[str, ...]]] = {
    cls: tuple(name for name, _ in _TABLE_FIELDS[cls]) for cls in _RECORDS
}
_COLUMN_VALUES: Final[dict[type[Any], Any]] = {cls: attrgetter(*_NAMES[cls]) for cls in _TABLES}


def _table_of(cls: type[S], t: Any, processes: dict[int, list[GpuProcess]] | None = None) -> tuple[S, ...]:
    """The records of a typed table (``processes``: a GpuSample table's, from the sample's own
    ``processes`` table, by GPU index; each taken out when given to its GPU)."""
    if type(t) is list or type(t) is tuple:  # the v1 form (or the default), records already
        if processes:
            return tuple(
                replace(g, processes=tuple(processes.pop(g.index))) if g.index in processes else g for g in t
            )
        return tuple(t)
    for name in _NESTED[cls]:
        if getattr(t, name):
            raise _Decline  # a nested table inside a row: the plain path
    values = _COLUMN_VALUES[cls](t)
    if processes:  # in their column: each GPU is made once, with its processes
        index = values[0]
        if type(index) is not list:
            raise _Decline
        values = list(values)
        values[_PROCESSES_AT] = [tuple(processes.pop(i)) if i in processes else () for i in index]
    try:  # one record per row, made in C (zip's row tuples go straight to the constructor)
        return tuple(starmap(cls, zip(*_columns_of(values), strict=True)))
    except ValueError:
        raise _Decline from None  # columns of different lengths


def _system_hint(name: str, hint: Any) -> Any:
    item = _NESTED[SystemSample].get(name)
    if item is None:
        return hint
    return _COLUMNS[item] | Annotated[list[item], _LIST]  # type: ignore[valid-type]


_SYSTEM_V2: Final = msgspec.defstruct(
    "_SystemV2",
    [(f.name, _system_hint(f.name, f.type), f.default) for f in msgspec.structs.fields(SystemSample)],
    frozen=True,
)


class _SampleV2Typed(_Header, frozen=True, kw_only=True, tag_field="kind", tag="sample"):
    """A version 2 sample as msgspec reads it on the fast path (tables as typed columns)."""

    interval_s: Interval = 0.0
    gpus: _COLUMNS[GpuSample] | Annotated[list[GpuSample], _LIST] = ()  # type: ignore[valid-type]
    processes: _PROCESS_COLUMNS = None  # type: ignore[valid-type]  # nil is refused, as by the plain path
    system: _SYSTEM_V2 | None = None  # type: ignore[valid-type]
    checks: _COLUMNS[CheckResult] | Annotated[list[CheckResult], _LIST] = ()  # type: ignore[valid-type]
    agent: AgentStats | None = None
    outage: PublishOutage | None = None


_PROCESS_VALUES: Final = attrgetter("gpu", *_NAMES[GpuProcess])
_PROCESSES_AT: Final = _NAMES[GpuSample].index("processes")
# the places of SystemSample's arrays of records (tables in v2) among its fields
_SYSTEM_TABLES: Final = tuple(
    (i, item) for i, name in enumerate(_NAMES[SystemSample]) if (item := _NESTED[SystemSample].get(name))
)


def _sample_typed(w: _SampleV2Typed) -> SampleFrame:
    by_index: dict[int, list[GpuProcess]] = {}
    if w.processes is not None:
        for row in _records(_PROCESS_VALUES(w.processes)):
            by_index.setdefault(row[0], []).append(GpuProcess(*row[1:]))
    gpus = _table_of(GpuSample, w.gpus, by_index)
    if by_index:
        raise _Decline  # processes of a GPU the frame does not carry
    system = None
    if w.system is not None:
        values = list(msgspec.structs.astuple(w.system))  # SystemSample's fields, in its order
        for i, item in _SYSTEM_TABLES:
            values[i] = _table_of(item, values[i])
        system = SystemSample(*values)
    return SampleFrame(
        host=w.host, provider=w.provider, boot_id=w.boot_id, seq=w.seq, ts=w.ts, v=w.v,
        interval_s=w.interval_s, gpus=gpus, system=system, checks=_table_of(CheckResult, w.checks),
        agent=w.agent, outage=w.outage,
    )  # fmt: skip


def _assemble(w: _SampleV2, body: Mapping[str, Any]) -> SampleFrame:
    try:
        b = msgspec.convert(body, _SampleBody)
    except msgspec.ValidationError as e:
        raise _error(e) from None
    return SampleFrame(
        host=w.host, provider=w.provider, boot_id=w.boot_id, seq=w.seq, ts=w.ts, v=w.v,
        interval_s=w.interval_s, gpus=b.gpus, system=b.system, checks=b.checks, agent=w.agent,
        outage=w.outage,
    )  # fmt: skip


# ----------------------------------------------------------------------------- nesting bound
# The typed decoders build only the schema's fields (nested 5 deep at most) and skip the content
# of fields they do not know without building it. A frame they refuse is read again to name
# the error, and that reading starts with :func:`nesting_depth`, which reads only the
# MessagePack headers (no object is built): ~1,000 nested one-element arrays (a 1 KB frame)
# would exhaust Python's recursion limit in any decoder, and deep objects make every later walk
# recursive. A frame nested deeper than MAX_DEPTH is therefore always ``too_deep``.


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


class _Version(Struct):
    v: Any = None


_VERSION: Final = msgspec.msgpack.Decoder(_Version)
_DECODE_V1: Final = msgspec.msgpack.Decoder(SampleFrame | EventFrame | InventoryFrame)
_DECODE_V2: Final = msgspec.msgpack.Decoder(_SampleV2Typed | EventFrame | InventoryFrame)
_DECLINE: Final = (
    msgspec.MsgspecError,
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
    UnicodeDecodeError,
)


def encode(frame: Frame, *, static: bool = True) -> bytes:
    """MessagePack bytes of ``frame`` in schema version 2. A sample's records go as tables; with
    ``static=False`` (what the agent sends) its GPUs' static facts are left to the inventory.
    Raises :class:`FrameEncodeError` for unencodable values."""
    try:
        if type(frame) is SampleFrame:
            return _ENCODER.encode(_sample_v2(frame, static))
        return _ENCODER.encode(replace(frame, v=SCHEMA_VERSION) if frame.v != SCHEMA_VERSION else frame)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:
        raise FrameEncodeError(f"cannot encode {type(frame).__name__}: {e}") from e


def encode_v1(frame: Frame) -> bytes:
    """The frame in schema version 1 (every record a map, every field in every sample): what an
    agent of the previous release sends. Kept for tests and benchmarks of the old layout."""
    try:
        return _ENCODER.encode(replace(frame, v=1))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:
        raise FrameEncodeError(f"cannot encode {type(frame).__name__}: {e}") from e


def decode(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Decode and validate one frame of any kind, schema version 1 or 2.

    Raises :class:`FrameDecodeError` (``reason`` says why, ``field`` where).
    """
    if len(data) > max_bytes:
        raise FrameDecodeError("oversized", f"frame of {len(data)} bytes exceeds {max_bytes}")
    try:
        v = _VERSION.decode(data).v
        if v == SCHEMA_VERSION and type(v) is int:
            w = _DECODE_V2.decode(data)
            frame: Frame = _sample_typed(w) if type(w) is _SampleV2Typed else w
        elif v == 1 and type(v) is int:
            frame = _DECODE_V1.decode(data)
        else:
            raise _Decline
    except (FrameDecodeError, _Decline, *_DECLINE):
        return from_wire(_unpack(data))  # read again, to name what is wrong (the depth first)
    return _check_frame(frame)


class _Decline(Exception):
    """The typed decoder refuses: the plain reading names the error."""


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


def _version(raw: Any) -> int:
    if type(raw) is not dict:
        raise FrameDecodeError("not_a_map", f"frame must be a map, got {_tn(raw)}")
    v = raw.get("v")
    if type(v) is not int:
        raise FrameDecodeError("version", f"missing or non-integer schema version: {v!r}", "v")
    if v not in SUPPORTED_VERSIONS:
        raise FrameDecodeError(
            "version", f"unsupported schema major version {v}; this build reads {SUPPORTED_VERSIONS}", "v"
        )
    kind = raw.get("kind")
    if type(kind) is not str or kind not in _FRAME_TYPES:
        raise FrameDecodeError("unknown_kind", f"unknown frame kind {kind!r}", "kind")
    return v


def from_wire(raw: Any) -> Frame:
    """Validate plain data (a frame of schema version 1 or 2, as unpacked) into a frame."""
    v = _version(raw)
    try:
        if v == SCHEMA_VERSION and raw["kind"] == "sample":
            w = msgspec.convert(raw, _SampleV2)
            return _check_frame(_assemble(w, _body(w)))
        frame: Frame = msgspec.convert(raw, Frame)
    except msgspec.ValidationError as e:
        raise _error(e) from None
    return _check_frame(frame)


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
    v = _version(raw)
    if raw["kind"] != "sample":
        raise first
    w = None
    if v == SCHEMA_VERSION:
        try:
            w = msgspec.convert(raw, _SampleV2)
        except msgspec.ValidationError as e:
            raise _error(e) from None
        body = _body(w)
    else:
        body = raw
    gpus = body.get("gpus")
    if type(gpus) is not list:
        raise first
    good: list[Any] = []
    dropped: list[FrameDecodeError] = []
    for i, g in enumerate(gpus):
        try:
            msgspec.convert(g, GpuSample)
        except msgspec.ValidationError as ge:
            dropped.append(_error(ge, f"gpus[{i}]"))
        else:
            good.append(g)
    if not dropped:
        raise first
    if w is not None:  # what is kept is checked as a whole frame is (e.g. each GPU index once)
        return _check_frame(_assemble(w, {**body, "gpus": good})), tuple(dropped)
    return from_wire({**raw, "gpus": good}), tuple(dropped)


def decode_as(data: bytes, cls: type[F], max_bytes: int = MAX_FRAME_BYTES) -> F:
    """Decode a frame that must be of ``cls``'s kind."""
    frame = decode(data, max_bytes)
    if type(frame) is not cls:
        raise FrameDecodeError("unknown_kind", f"expected a {cls.KIND} frame, got {frame.kind}", "kind")
    return frame


def _tn(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------- static facts


def static_facts(gpu: GpuSample) -> tuple[Any, ...]:
    """The static facts of a GPU as a sample reads them (:data:`STATIC_GPU_FIELDS` order)."""
    return _static_facts(gpu)


def with_static(info: GpuInfo, gpu: GpuSample) -> GpuInfo:
    """``info`` carrying the static facts ``gpu`` reads (the agent's inventory of v2)."""
    return replace(info, **{name: getattr(gpu, name) for name in STATIC_GPU_FIELDS})


def join_static(gpu: GpuSample, info: GpuInfo) -> GpuSample:
    """``gpu`` (from a v2 sample, without its static facts) completed from its inventory entry:
    each static field the sample leaves unset (``None``, or an empty ``uuid``) takes the
    inventory's value."""
    changes = {}
    for name in STATIC_GPU_FIELDS:
        have = getattr(gpu, name)
        if have is None or have == "":
            value = getattr(info, name)
            if value is not None:
                changes[name] = value
    return replace(gpu, **changes) if changes else gpu
