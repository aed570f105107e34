"""Thresholds of the health checks: ``[health]``, ``[health.gpu]``, ``[health.host]``,
``[health.network]``, ``[health.provider]`` and ``[health.node]`` of ``collector.toml``.

Every threshold has a documented default (``docs/health.md`` says where each comes from).
:func:`health_config_from` builds the frozen :class:`HealthConfig` from the raw TOML tables
and the ``GPUWARDEN_HEALTH_*`` environment; a bad value raises
:class:`~shared.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from shared.config import build_section, dur, env_name, num
from shared.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HealthSection:
    """``[health]``: staleness and how observations are emitted."""

    stale_after: float = dur(0)  # 0: stale_factor x the host's sample interval
    stale_factor: float = num(3.0, 1.0, 1000.0)
    default_interval: float = dur("5s")  # used when a frame does not say its interval
    never_reported_grace: float = dur("1m")  # an expected host that never reported: unknown, then this
    emit_healthy_for: int = num(21, 1, 10_000)  # healthy observations sent after a problem clears
    max_clock_skew: float = dur("30s")  # frames dated further ahead: host.clock_skew, not live readings


@dataclass(frozen=True, slots=True)
class GpuThresholds:
    """``[health.gpu]``."""

    temp_warning_c: float = num(85.0, 0, 300)
    temp_critical_c: float = num(92.0, 0, 300)
    temp_slowdown_margin_c: float = num(5.0, 0, 100)  # warning this close to NVML's slowdown temp
    temp_shutdown_margin_c: float = num(5.0, 0, 100)  # critical this close to NVML's shutdown temp
    xid_window: float = dur("1h")  # an XID keeps its check failing this long after it occurred
    rma_fatal_xids: int = num(3, 1, 1000)  # fatal XIDs on one GPU within rma_window -> RMA advice
    rma_window: float = dur("24h")
    rma_reboots: int = num(2, 1, 1000)  # the same fatal XID again after this many reboots -> RMA
    rma_history: float = dur("30d")  # fault history kept per physical GPU (serial, else UUID)
    ecc_sbe_rate_per_min: float = num(10.0, 0, 1e9)  # single-bit ECC errors per minute: warning above
    rate_window: float = dur("30s")  # counter rates (ECC, PCIe replay, NVLink) over at least this span
    retired_pages_critical: int = num(63, 1, 1_000_000)  # DCGM: retired pages >= 63 fails
    remapped_rows_unc_warning: int = num(512, 1, 1_000_000)  # DCGM: uncorrectable remapped rows
    clock_event_mask: int = num(0x8 | 0x40 | 0x80, 0, (1 << 64) - 1)  # HW slowdown, HW thermal, brake
    clock_event_sustained: float = dur("5m")  # reasons held this long: critical
    thermal_violation_warns: bool = True  # any increase of the thermal violation time warns (DCGM)
    pcie_replay_factor: float = num(1.0, 0.01, 1e6)  # multiplies the expected replay rate
    nvlink_crc_critical_per_s: float = num(100.0, 0, 1e12)  # DCGM: CRC errors >= 100/s fail
    power_over_limit_pct: float = num(2.0, 0, 1000)  # warning above the limit by more than this
    memory_full_pct: float = num(95.0, 0, 100)
    persistence_check: bool = True  # persistence mode off: info
    busy_util_pct: float = num(50.0, 0, 100)  # a GPU this busy is "under load" (PCIe gen, SM clock)
    pcie_link_check: bool = True  # width below max any time, generation below max while busy: warning
    hbm_temp_margin_c: float = num(
        5.0, 0, 100
    )  # HBM this close to NVML's memory max: warning; at it: critical
    memory_trend_window: float = dur("24h")  # lifetime DBE / retired pages grew: warning this long
    sm_clock_low_pct: float = num(50.0, 0, 100)  # busy, no clock-event reason, SM below this % of app clock
    fan_stall_temp_c: float = num(60.0, 0, 300)  # a fan at 0 % while the GPU is this hot: warning
    fabric_check: bool = True  # NVSwitch fabric registration (where NVML reports it)


@dataclass(frozen=True, slots=True)
class HostThresholds:
    """``[health.host]``: system checks (percentages of the total unless the name says)."""

    cpu_warning_pct: float = num(95.0, 0, 100)
    mem_warning_pct: float = num(90.0, 0, 100)
    mem_critical_pct: float = num(97.0, 0, 100)
    swap_warning_pct: float = num(50.0, 0, 100)
    swap_critical_pct: float = num(90.0, 0, 100)
    disk_warning_pct: float = num(85.0, 0, 100)
    disk_critical_pct: float = num(95.0, 0, 100)
    load_warning_per_core: float = num(2.0, 0, 1e6)  # 5-minute load average / CPU count
    load_critical_per_core: float = num(4.0, 0, 1e6)
    fds_warning_pct: float = num(80.0, 0, 100)
    fds_critical_pct: float = num(95.0, 0, 100)
    nic_errors_per_min: float = num(10.0, 0, 1e12)  # rx+tx errors per minute: warning above
    nic_drops_per_min: float = num(1000.0, 0, 1e12)  # rx+tx drops per minute: warning above
    nic_down_warns: bool = True  # an interface reported down: warning


@dataclass(frozen=True, slots=True)
class NodeThresholds:
    """``[health.node]``: InfiniBand, kernel log, SXids, modules, services, clock, file systems,
    D state (the node part of the sample; a source the node lacks is not evaluated)."""

    ib_rate_expected_gbps: float = num(0.0, 0, 1e6)  # 0: by GPU model (GPU_MODEL_IB), else not judged
    ib_ports_expected: int = num(0, 0, 1024)  # InfiniBand ports a host should have; 0: by GPU model
    ib_down_status: str = "critical"  # a port not ACTIVE/LinkUp: critical or warning
    ib_errors_per_min: float = num(10.0, 0, 1e12)  # symbol, receive, recovery, integrity errors
    ib_flap_window: float = dur("10m")  # a link_downed increase keeps host.ib_flap failing this long
    kmsg_window: float = dur("1h")  # kernel-log classes are counted over this window
    kmsg_nvme_timeout: int = num(1, 0, 1_000_000)  # lines within kmsg_window to fail (0: off)
    kmsg_nvme_reset: int = num(1, 0, 1_000_000)
    kmsg_fs_error: int = num(1, 0, 1_000_000)
    kmsg_fs_readonly: int = num(1, 0, 1_000_000)
    kmsg_oom_kill: int = num(1, 0, 1_000_000)
    kmsg_hung_task: int = num(1, 0, 1_000_000)
    kmsg_soft_lockup: int = num(1, 0, 1_000_000)
    kmsg_mce: int = num(1, 0, 1_000_000)
    kmsg_aer_corrected: int = num(100, 0, 1_000_000)
    kmsg_aer_uncorrected: int = num(1, 0, 1_000_000)
    kmsg_mlx5_error: int = num(1, 0, 1_000_000)
    kmsg_peermem: int = num(1, 0, 1_000_000)
    sxid_window: float = dur("1h")  # an SXid keeps host.sxid failing this long
    module_missing_status: str = "critical"
    service_down_status: str = "warning"
    critical_services: tuple[str, ...] = ("nvidia-fabricmanager",)  # down: critical whatever the above
    clock_offset_warning_s: float = num(0.1, 0, 1e9)
    clock_offset_critical_s: float = num(1.0, 0, 1e9)
    clock_unsynced_warns: bool = True
    readonly_ignore: tuple[str, ...] = ()  # mounts that are read-only on purpose
    inodes_warning_pct: float = num(90.0, 0, 100)
    inodes_critical_pct: float = num(97.0, 0, 100)
    dstate_warning: int = num(1, 0, 1 << 32)  # processes stuck in D state (0: off)
    dstate_critical: int = num(10, 0, 1 << 32)


# GPU model (a substring of the NVML name, upper case) -> (InfiniBand ports, Gb/s per port) that
# a host of that class carries (DGX/HGX: one NDR port per GPU), as gpud's defaults do.
GPU_MODEL_IB: Final[tuple[tuple[str, int, float], ...]] = (
    ("GB200", 4, 400.0),
    ("B200", 8, 400.0),
    ("B100", 8, 400.0),
    ("H200", 8, 400.0),
    ("H100", 8, 400.0),
    ("H800", 8, 400.0),
)


def expected_ib(cfg: NodeThresholds, gpu_model: str | None) -> tuple[int, float]:
    """(ports, Gb/s per port) an InfiniBand host should have; 0 where nothing is expected."""
    ports, rate = cfg.ib_ports_expected, cfg.ib_rate_expected_gbps
    if (not ports or not rate) and gpu_model:
        name = gpu_model.upper()
        for key, n, gbps in GPU_MODEL_IB:
            if key in name:
                ports, rate = ports or n, rate or gbps
                break
    return ports, rate


@dataclass(frozen=True, slots=True)
class NetworkThresholds:
    """``[health.network]``: the agent's reachability checks."""

    latency_warning_ms: float = num(100.0, 0, 1e7)
    latency_critical_ms: float = num(1000.0, 0, 1e7)
    unreachable_status: str = "critical"  # status of a failed check: critical or warning
    nats_sustained: float = dur("1m")  # a failed NATS round trip alone is judged after failing this long


@dataclass(frozen=True, slots=True)
class ProviderThresholds:
    """``[health.provider]``: provider status from the share of bad GPUs (critical or lost)."""

    critical_gpu_pct: float = num(20.0, 0, 100)  # critical when more than this share is bad
    warning_gpu_pct: float = num(5.0, 0, 100)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """The whole health configuration."""

    health: HealthSection = field(default_factory=HealthSection)
    gpu: GpuThresholds = field(default_factory=GpuThresholds)
    host: HostThresholds = field(default_factory=HostThresholds)
    network: NetworkThresholds = field(default_factory=NetworkThresholds)
    provider: ProviderThresholds = field(default_factory=ProviderThresholds)
    node: NodeThresholds = field(default_factory=NodeThresholds)


_SUBTABLES: Final = frozenset({"gpu", "host", "network", "provider", "node"})


def _table(raw: Mapping[str, Any], key: str, full: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(full, "expected a table")
    return value


def _build(cls: type[T], raw: Mapping[str, Any], section: str, env: Mapping[str, str]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for k, v in raw.items():
        if section == "health" and k in _SUBTABLES:
            continue
        if k not in names:
            raise ConfigError(f"{section}.{k}", "unknown key")
        values[k] = v
    for name in names:
        var = env_name(section, name)
        if var in env:
            values[name] = env[var]
    return build_section(cls, values, section, env)


def health_config_from(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> HealthConfig:
    """Build :class:`HealthConfig` from the raw top-level tables of ``collector.toml``.

    ``raw`` maps top-level section names to their tables (``CollectorConfig.raw``); only
    ``raw["health"]`` (with its sub-tables ``gpu``, ``host``, ``network``, ``provider``) is
    read. ``GPUWARDEN_HEALTH_GPU_TEMP_WARNING_C`` style variables in ``env`` (default: the
    process environment) override the file. Raises :class:`ConfigError` naming the key.
    """
    env = os.environ if env is None else env
    top = _table(raw, "health", "health")
    health = _build(HealthSection, top, "health", env)
    gpu = _build(GpuThresholds, _table(top, "gpu", "health.gpu"), "health.gpu", env)
    host = _build(HostThresholds, _table(top, "host", "health.host"), "health.host", env)
    network = _build(NetworkThresholds, _table(top, "network", "health.network"), "health.network", env)
    provider = _build(ProviderThresholds, _table(top, "provider", "health.provider"), "health.provider", env)
    node = _build(NodeThresholds, _table(top, "node", "health.node"), "health.node", env)
    _pair(
        node.clock_offset_warning_s,
        node.clock_offset_critical_s,
        "health.node.clock_offset_warning_s",
        "clock_offset_critical_s",
    )
    _pair(
        node.inodes_warning_pct,
        node.inodes_critical_pct,
        "health.node.inodes_warning_pct",
        "inodes_critical_pct",
    )
    for key in ("ib_down_status", "module_missing_status", "service_down_status"):
        if getattr(node, key) not in ("critical", "warning"):
            raise ConfigError(
                f"health.node.{key}", f"expected 'critical' or 'warning', got {getattr(node, key)!r}"
            )
    _pair(gpu.temp_warning_c, gpu.temp_critical_c, "health.gpu.temp_warning_c", "temp_critical_c")
    _pair(host.mem_warning_pct, host.mem_critical_pct, "health.host.mem_warning_pct", "mem_critical_pct")
    _pair(host.swap_warning_pct, host.swap_critical_pct, "health.host.swap_warning_pct", "swap_critical_pct")
    _pair(host.disk_warning_pct, host.disk_critical_pct, "health.host.disk_warning_pct", "disk_critical_pct")
    _pair(host.fds_warning_pct, host.fds_critical_pct, "health.host.fds_warning_pct", "fds_critical_pct")
    _pair(
        host.load_warning_per_core,
        host.load_critical_per_core,
        "health.host.load_warning_per_core",
        "load_critical_per_core",
    )
    _pair(
        network.latency_warning_ms,
        network.latency_critical_ms,
        "health.network.latency_warning_ms",
        "latency_critical_ms",
    )
    _pair(
        provider.warning_gpu_pct,
        provider.critical_gpu_pct,
        "health.provider.warning_gpu_pct",
        "critical_gpu_pct",
    )
    if network.unreachable_status not in ("critical", "warning"):
        raise ConfigError(
            "health.network.unreachable_status",
            f"expected 'critical' or 'warning', got {network.unreachable_status!r}",
        )
    return HealthConfig(health=health, gpu=gpu, host=host, network=network, provider=provider, node=node)


def _pair(warning: float, critical: float, key: str, other: str) -> None:
    if warning > critical:
        raise ConfigError(key, f"must not exceed {other} ({critical}), got {warning}")
