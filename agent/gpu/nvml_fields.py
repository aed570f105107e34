"""The NVML field table: which :class:`~shared.frames.GpuSample` readings are batched through
``nvmlDeviceGetFieldValues``, how each raw value converts, and the single call that replaces a
field the driver does not offer in the batch.

Field ids are NVML's ABI (``NVML_FI_DEV_*`` in ``nvml.h``); they are spelled as numbers here so
an older binding that lacks a constant still asks for the field. A driver that does not know a
field id answers ``NOT_SUPPORTED`` (or ``INVALID_ARGUMENT``) for that entry only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from shared.frames import GpuSample, fields


class Query(Protocol):
    """One NVML call for one GPU through the backend's error policy; ``None`` when unavailable."""

    def __call__(self, topic: str, fn_name: str, *args: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One batched reading: sample attribute, NVML field id, conversion and single-call fallback."""

    attr: str
    field_id: int
    kind: type  # int, float or bool
    scale: float = 1.0  # multiply the raw value (mW -> W is 1e-3)
    fallback: str | None = None  # key of FALLBACKS; None: no single call gives this reading
    per_link: bool = False  # asked once per NVLink (scopeId = link): a tuple by link (state: links up)


NVLINK_GET_STATE: Final = 165
NVLINK_LINK_COUNT: Final = 91

BATCH: Final[tuple[FieldSpec, ...]] = (
    FieldSpec("ecc_enabled", 1, bool, fallback="ecc_enabled"),  # ECC_CURRENT
    FieldSpec("ecc_sbe_volatile", 3, int, fallback="ecc_sbe_volatile"),
    FieldSpec("ecc_dbe_volatile", 4, int, fallback="ecc_dbe_volatile"),
    FieldSpec("ecc_sbe_aggregate", 5, int, fallback="ecc_sbe_aggregate"),
    FieldSpec("ecc_dbe_aggregate", 6, int, fallback="ecc_dbe_aggregate"),
    FieldSpec("retired_pages_sbe", 29, int, fallback="retired_pages_sbe"),
    FieldSpec("retired_pages_dbe", 30, int, fallback="retired_pages_dbe"),
    FieldSpec("retired_pages_pending", 31, bool, fallback="retired_pages_pending"),
    FieldSpec("nvlink_crc_errors", 38, int, fallback="nvlink_crc_errors"),  # CRC_FLIT total
    FieldSpec("nvlink_replay_errors", 52, int, fallback="nvlink_replay_errors"),
    FieldSpec("nvlink_recovery_errors", 59, int, fallback="nvlink_recovery_errors"),
    FieldSpec("throttle_power_ns", 74, int, fallback="throttle_power_ns"),  # PERF_POLICY_POWER
    FieldSpec("throttle_thermal_ns", 75, int, fallback="throttle_thermal_ns"),  # PERF_POLICY_THERMAL
    FieldSpec("mem_temp_c", 82, float),
    FieldSpec("energy_j", 83, float, scale=1e-3, fallback="energy_j"),  # mJ
    FieldSpec("pcie_replay_count", 94, int, fallback="pcie_replay_count"),
    FieldSpec("remapped_rows_correctable", 142, int, fallback="remapped_rows"),
    FieldSpec("remapped_rows_uncorrectable", 143, int, fallback="remapped_rows"),
    FieldSpec("remap_pending", 144, bool, fallback="remapped_rows"),
    FieldSpec("remap_failure", 145, bool, fallback="remapped_rows"),
    FieldSpec("power_w", 186, float, scale=1e-3, fallback="power_w"),  # POWER_INSTANT, mW
    FieldSpec("recovery_action", 230, int, fallback="recovery_action"),  # GET_GPU_RECOVERY_ACTION
    FieldSpec("nvlink_links_up", NVLINK_GET_STATE, int, fallback="nvlink_links_up", per_link=True),
    # NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY / _RECOVERY / _CRC, per link (no single-call fallback here:
    # a driver without them gives the totals above only)
    FieldSpec("nvlink_replay_by_link", 161, int, per_link=True),
    FieldSpec("nvlink_recovery_by_link", 162, int, per_link=True),
    FieldSpec("nvlink_crc_by_link", 163, int, per_link=True),
)
# Readings derived from another one's answer (nvlink_links_up's per-link states name the links down).
DERIVED: Final[dict[str, str]] = {"nvlink_down_links": "nvlink_links_up"}

# NVML value types (nvmlValueType_t) -> member of the c_nvmlValue_t union
_UNION_MEMBER: Final = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}

SAMPLE_FIELDS: Final = frozenset(f.name for f in fields(GpuSample))
SCALAR_FIELDS: Final = frozenset(f.name for f in fields(GpuSample) if not isinstance(f.default, tuple))

# Topics of the error policy that stand for several sample fields (a topic is otherwise the field).
TOPIC_ATTRS: Final[dict[str, tuple[str, ...]]] = {
    "remapped_rows": (
        "remapped_rows_correctable",
        "remapped_rows_uncorrectable",
        "remap_pending",
        "remap_failure",
    ),
    "utilization": ("util_gpu_pct", "util_mem_pct"),
    "memory": ("mem_total_bytes", "mem_used_bytes", "mem_reserved_bytes"),
    "memory_v2": ("mem_reserved_bytes",),
    "pcie_link_max": ("pcie_link_gen_max", "pcie_link_width_max"),
    "nvlink_state": ("nvlink_links_up", "nvlink_down_links"),
    "fabric": ("fabric_state", "fabric_status", "fabric_clique_id", "fabric_health_mask"),
}


def raw_value(fv: Any) -> int | float | None:
    """The number in one ``c_nvmlFieldValue_t`` according to its ``valueType``."""
    member = _UNION_MEMBER.get(int(fv.valueType))
    if member is None:
        return None
    value: int | float = getattr(fv.value, member)
    return value


def convert(spec: FieldSpec, raw: int | float | None) -> Any:
    """``raw`` in the unit and type of ``spec.attr``; ``None`` stays ``None``."""
    if raw is None:
        return None
    if spec.kind is bool:
        return bool(raw)
    if spec.kind is float:
        return float(raw) * spec.scale
    if spec.scale != 1.0:
        return round(raw * spec.scale)
    return int(raw) if raw >= 0 else None


_RANGES: Final[dict[str, tuple[float, float]]] = {
    f.name: f.metadata["range"] for f in fields(GpuSample) if "range" in f.metadata
}


def wire_safe(values: dict[str, Any]) -> list[str]:
    """Set to ``None`` (in place) every reading outside its wire range or NaN; return their names.

    A driver bug or an unexpected sentinel must cost one reading, never the whole frame (the
    collector rejects a frame with an out-of-range field).
    """
    bad = []
    for name, value in values.items():
        bounds = _RANGES.get(name)
        if bounds is None or value is None or isinstance(value, bool):
            continue
        if isinstance(value, tuple):  # per-link counters
            if not all(bounds[0] <= x <= bounds[1] for x in value):
                bad.append(name)
        elif not bounds[0] <= value <= bounds[1]:  # also false for NaN
            bad.append(name)
    for name in bad:
        values[name] = () if isinstance(values[name], tuple) else None
    return bad


def topic_fields(topics: Iterable[str]) -> set[str]:
    """The sample fields that a set of not-supported topics stands for."""
    out: set[str] = set()
    for topic in topics:
        out.update(a for a in TOPIC_ATTRS.get(topic, (topic,)) if a in SAMPLE_FIELDS)
    return out


# ----------------------------------------------------------------------------- fallbacks

Fallback = Callable[[Query, Any, Any, int], dict[str, Any]]  # (query, nvml module, handle, links)


def _scaled(v: Any, scale: float) -> float | None:
    return None if v is None else float(v) * scale


def _ecc(attr: str, error_type: int, counter_type: int) -> Fallback:
    def read(q: Query, nvml: Any, h: Any, links: int) -> dict[str, Any]:
        return {attr: q(attr, "nvmlDeviceGetTotalEccErrors", h, error_type, counter_type)}

    return read


def _retired(attr: str, cause: int) -> Fallback:
    def read(q: Query, nvml: Any, h: Any, links: int) -> dict[str, Any]:
        pages = q(attr, "nvmlDeviceGetRetiredPages", h, cause)
        return {attr: None if pages is None else len(pages)}

    return read


def _violation(attr: str, policy: int) -> Fallback:
    def read(q: Query, nvml: Any, h: Any, links: int) -> dict[str, Any]:
        v = q(attr, "nvmlDeviceGetViolationStatus", h, policy)
        return {attr: None if v is None else int(v.violationTime)}

    return read


def _nvlink_errors(attr: str, counter: int) -> Fallback:
    def read(q: Query, nvml: Any, h: Any, links: int) -> dict[str, Any]:
        if links <= 0:
            return {attr: None}
        total = 0
        for link in range(links):
            v = q(attr, "nvmlDeviceGetNvLinkErrorCounter", h, link, counter)
            if v is None:
                return {attr: None}
            total += int(v)
        return {attr: total}

    return read


def _links_up(q: Query, nvml: Any, h: Any, links: int) -> dict[str, Any]:
    if links <= 0:
        return {"nvlink_links_up": None}
    down = []
    for link in range(links):
        state = q("nvlink_state", "nvmlDeviceGetNvLinkState", h, link)
        if state is None:
            return {"nvlink_links_up": None}
        if state != 1:
            down.append(link)
    return {"nvlink_links_up": links - len(down), "nvlink_down_links": tuple(down)}


def _remapped(q: Query, nvml: Any, h: Any, links: int) -> dict[str, Any]:
    rows = q("remapped_rows", "nvmlDeviceGetRemappedRows", h)
    if rows is None:
        return {}
    corr, unc, pending, failure = rows
    return {
        "remapped_rows_correctable": int(corr),
        "remapped_rows_uncorrectable": int(unc),
        "remap_pending": bool(pending),
        "remap_failure": bool(failure),
    }


def _recovery(q: Query, nvml: Any, h: Any, links: int) -> dict[str, Any]:
    return {"recovery_action": q("recovery_action", "nvmlDeviceGetGpuRecoveryAction", h)}


def _simple(attr: str, fn_name: str, conv: Callable[[Any], Any]) -> Fallback:
    def read(q: Query, nvml: Any, h: Any, links: int) -> dict[str, Any]:
        v = q(attr, fn_name, h)
        return {attr: None if v is None else conv(v)}

    return read


# Constants as numbers (nvml.h): error type CORRECTED 0 / UNCORRECTED 1; counter VOLATILE 0 /
# AGGREGATE 1; retirement cause MULTIPLE_SBE 0 / DBE 1; perf policy POWER 0 / THERMAL 1; NVLink
# error counter DL_REPLAY 0 / DL_RECOVERY 1 / DL_CRC_FLIT 2.
FALLBACKS: Final[dict[str, Fallback]] = {
    "ecc_enabled": _simple("ecc_enabled", "nvmlDeviceGetEccMode", lambda v: int(v[0]) == 1),
    "ecc_sbe_volatile": _ecc("ecc_sbe_volatile", 0, 0),
    "ecc_dbe_volatile": _ecc("ecc_dbe_volatile", 1, 0),
    "ecc_sbe_aggregate": _ecc("ecc_sbe_aggregate", 0, 1),
    "ecc_dbe_aggregate": _ecc("ecc_dbe_aggregate", 1, 1),
    "retired_pages_sbe": _retired("retired_pages_sbe", 0),
    "retired_pages_dbe": _retired("retired_pages_dbe", 1),
    "retired_pages_pending": _simple(
        "retired_pages_pending", "nvmlDeviceGetRetiredPagesPendingStatus", lambda v: int(v) == 1
    ),
    "nvlink_crc_errors": _nvlink_errors("nvlink_crc_errors", 2),
    "nvlink_replay_errors": _nvlink_errors("nvlink_replay_errors", 0),
    "nvlink_recovery_errors": _nvlink_errors("nvlink_recovery_errors", 1),
    "nvlink_links_up": _links_up,
    "throttle_power_ns": _violation("throttle_power_ns", 0),
    "throttle_thermal_ns": _violation("throttle_thermal_ns", 1),
    "energy_j": _simple("energy_j", "nvmlDeviceGetTotalEnergyConsumption", lambda v: _scaled(v, 1e-3)),
    "pcie_replay_count": _simple("pcie_replay_count", "nvmlDeviceGetPcieReplayCounter", int),
    "remapped_rows": _remapped,
    "power_w": _simple("power_w", "nvmlDeviceGetPowerUsage", lambda v: _scaled(v, 1e-3)),
    "recovery_action": _recovery,
}

# Fallbacks that need a function not every binding has: without it the reading is unsupported.
# (No binding up to 13.615 has a call for the recovery action, only field 230.)
FALLBACK_NEEDS: Final[dict[str, str]] = {"recovery_action": "nvmlDeviceGetGpuRecoveryAction"}
