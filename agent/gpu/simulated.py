"""Simulated GPUs: deterministic, seedable, cheap, with fault injection.

Each GPU is a small model of an H100-class board, determined by ``(seed, host, index)``:
it alternates idle and busy phases (jobs start and stop); utilisation and memory follow the
job, power follows utilisation (about 70 W idle, up to about 95% of the power limit busy),
temperatures follow power with a thermal lag, and one or two processes (pid, name, memory,
container) run while it is busy. ECC is enabled with counters mostly at zero, persistence
mode is on, the PCIe link is Gen5 x16 and 18 NVLink links are up.

Faults (:mod:`agent.faults`) change the readings while they are active and emit events at
their start (see :data:`EVENT_FAULTS`). Counters (ECC, PCIe replays, NVLink errors,
violation time) are computed from the fault schedule, so they are cumulative, monotonic and
the same whatever the sampling times. The end of an ``ecc_dbe`` fault models the GPU reset
that clears the volatile ECC counters; aggregate counters never go down.

Cost: every static part is precomputed and nothing is random at sample time; a GPU without
faults costs about 8 us (most of it building the frozen :class:`~shared.frames.GpuSample`),
so :meth:`SimulatedBackend.sample` for 8 GPUs takes about 65 us on a 2-core VM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Final

from agent.faults import Fault, FaultSchedule
from agent.gpu.base import GpuEvent, Inventory
from agent.gpu.simmodel import (
    CUDA_VERSION,
    DRIVER_VERSION,
    FABRIC_COMPLETED,
    GPU_IDLE,
    HW_BITS,
    HW_SLOWDOWN,
    HW_THERMAL,
    IDLE_PCIE_GEN,
    MIB,
    NO_OVERRIDES,
    SW_POWER_CAP,
    SW_THERMAL,
    TEMP_MAX_OPERATING_C,
    TEMP_MEM_MAX_C,
    TEMP_SHUTDOWN_C,
    TEMP_SLOWDOWN_C,
    Model,
    SimGpu,
    counters,
    fault_bits,
    fault_int,
    fault_value,
    overrides,
)
from shared.errors import NvmlUnavailableError
from shared.frames import GpuSample, fields

SIM_NVML_ERROR: Final = "Driver Not Loaded"  # what a simulated nvml_init_fail reports (NVML's text)
# The detail of a simulated XID 74, in the driver's words (a link error class: check and reseat).
XID74_DETAIL: Final = "NVLink: fatal error detected on link 0(0x0, 0x0, 0x10000, 0x0, 0x0, 0x0, 0x0)"
# Fault kinds that emit events at their start; ``lost``, ``throttle`` and ``temp`` (at or above
# the slowdown temperature) also at their end.
EVENT_FAULTS: Final = frozenset(
    {"xid", "ecc_dbe", "lost", "recovery_action", "row_remap_fail", "remap_pending", "retired_pages"}
    | {"throttle", "temp"}
)

_ORDER: Final = (
    "index", "uuid", "lost", "util_gpu_pct", "util_mem_pct", "mem_total_bytes", "mem_used_bytes",
    "mem_reserved_bytes", "temp_c", "mem_temp_c", "temp_slowdown_c", "temp_shutdown_c",
    "temp_max_operating_c", "fan_pct", "power_w", "power_limit_w", "energy_j", "pstate", "clock_sm_mhz",
    "clock_mem_mhz", "clock_event_reasons", "throttle_thermal_ns", "throttle_power_ns", "ecc_enabled",
    "ecc_sbe_volatile", "ecc_dbe_volatile", "ecc_sbe_aggregate", "ecc_dbe_aggregate", "retired_pages_sbe",
    "retired_pages_dbe", "retired_pages_pending", "remapped_rows_correctable",
    "remapped_rows_uncorrectable", "remap_pending", "remap_failure", "pcie_replay_count", "pcie_link_gen",
    "pcie_link_width", "pcie_link_gen_max", "pcie_link_width_max", "nvlink_links_total", "nvlink_links_up",
    "nvlink_crc_errors", "nvlink_replay_errors", "nvlink_recovery_errors", "recovery_action",
    "persistence_mode", "processes", "temp_mem_max_c", "clock_sm_app_mhz", "fabric_state",
    "fabric_status", "fabric_clique_id", "fabric_health_mask", "nvlink_down_links", "nvlink_crc_by_link",
    "nvlink_replay_by_link", "nvlink_recovery_by_link",
)  # fmt: skip
# Positional construction is ~40% cheaper; fall back to keywords if GpuSample's fields move.
_POSITIONAL: Final = tuple(f.name for f in fields(GpuSample))[: len(_ORDER)] == tuple(_ORDER)


def _keyword_sample(values: list[Any]) -> GpuSample:
    return GpuSample(**dict(zip(_ORDER, values, strict=True)))


class SimulatedBackend:
    """A :class:`~agent.gpu.base.GpuBackend` of ``gpus`` simulated GPUs on host ``host``.

    ``faults`` is filtered to the faults that apply to ``host``; fault times count from
    :meth:`open`, measured with ``clock`` (seconds, monotonic). Thread safety: one thread may
    block in :meth:`wait_events` while another calls :meth:`sample`, :meth:`poll_events`
    and :meth:`close`.
    """

    name = "simulated"
    kernel_log = False  # simulated XIDs come as events; the kernel log knows nothing of them

    def __init__(
        self,
        gpus: int,
        *,
        host: str,
        seed: int = 0,
        faults: FaultSchedule | None = None,
        clock: Callable[[], float] = time.monotonic,
        model: str = "NVIDIA H100 80GB HBM3",
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= gpus <= 1024:
            raise ValueError(f"gpus must be in [0, 1024], got {gpus}")
        self.host = host
        self.seed = seed
        self.faults = (faults or FaultSchedule()).for_host(host)
        self._clock = clock
        self._wall = wall  # Unix time of events (a virtual clock in scenario tests)
        self._model = Model(model)
        self._gpus = [SimGpu(i, host, seed, self._model, self.faults.for_gpu(i)) for i in range(gpus)]
        self._t0: float | None = None
        self._wall0 = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._events: list[tuple[float, GpuEvent]] = []
        self._next_event = 0
        self._inventory: Inventory | None = None
        self._has_persistence_faults = bool(self.faults.of_kind("persistence_off"))
        self._open_failed = False  # the last open failed (nvml_init_fail): the clock keeps running

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Start the simulation: fault times count from now.

        While an ``nvml_init_fail`` fault is active this raises
        :class:`~shared.errors.NvmlUnavailableError` as NVML would; the simulation clock keeps
        running from the first (failed) open, so the agent's retries succeed once the fault
        window has passed, and events scheduled during the failure are not delivered late.
        """
        with self._lock:
            if not self._open_failed:
                self._t0 = self._clock()
                self._wall0 = self._wall()
                self._events = self._schedule_events()
            self._closed = False
            self._wake.clear()
            t = self._clock() - (self._t0 or 0.0)
            if any(f.active(t) for f in self.faults.of_kind("nvml_init_fail")):
                self._open_failed = True
                raise NvmlUnavailableError(
                    f"NVML unavailable: {SIM_NVML_ERROR} (simulated nvml_init_fail)", SIM_NVML_ERROR
                )
            self._next_event = sum(1 for at, _ in self._events if at <= t) if self._open_failed else 0
            self._open_failed = False
            for g in self._gpus:
                g.last_t = None

    def close(self) -> None:
        """Stop; wakes a thread blocked in :meth:`wait_events` (idempotent)."""
        self._closed = True
        self._wake.set()

    def host_down(self) -> bool:
        """A ``host_down`` fault is active (times count from :meth:`open`; False before it)."""
        return self._t0 is not None and bool(self.faults) and self.faults.host_down(self.elapsed())

    def elapsed(self) -> float:
        """Seconds since :meth:`open`, per the clock. Raises ``RuntimeError`` before ``open``."""
        if self._t0 is None:
            raise RuntimeError("SimulatedBackend is not open: call open() first")
        return self._clock() - self._t0

    # ------------------------------------------------------------------ inventory

    def inventory(self) -> Inventory:
        """The simulated GPUs (UUIDs, serials and PCI bus ids derived from seed and host)."""
        if self._has_persistence_faults and self._t0 is not None:
            t = self.elapsed()
            return self._build_inventory(
                [not any(f.kind == "persistence_off" and f.active(t) for f in g.faults) for g in self._gpus]
            )
        if self._inventory is None:
            self._inventory = self._build_inventory([True] * len(self._gpus))
        return self._inventory

    def _build_inventory(self, persistence: list[bool]) -> Inventory:
        return Inventory(
            backend=self.name,
            driver_version=DRIVER_VERSION,
            cuda_version=CUDA_VERSION,
            nvml_version=f"12.{DRIVER_VERSION}",
            gpus=tuple(g.info(p) for g, p in zip(self._gpus, persistence, strict=True)),
        )

    # ------------------------------------------------------------------ samples

    def sample(self) -> list[GpuSample]:
        """Every GPU now, in index order. Raises ``RuntimeError`` before :meth:`open`."""
        t = self.elapsed()
        out = []
        for g in self._gpus:
            g.advance(t)
            out.append(self._sample_gpu(g, t))
        return out

    def _sample_gpu(self, g: SimGpu, t: float) -> GpuSample:
        m = g.model
        faults = g.faults
        ov = overrides([f for f in faults if f.active(t)]) if faults else NO_OVERRIDES
        if ov.lost:
            g.last_t = t
            return GpuSample(index=g.index, uuid=g.uuid, lost=True)
        util = g.util(t)
        power = m.idle_w + (g.peak_w - m.idle_w) * util * 0.01 if util else m.idle_w
        if ov.power is not None:
            power = ov.power
        g.heat(t, power)
        # NVML reports whole degrees, whole percent, milliwatts and millijoules
        mem_temp = float(int(g.mem_temp + 0.5))
        if ov.temp is None:
            temp = float(int(g.temp + 0.5))
        else:
            temp, mem_temp = ov.temp, max(mem_temp, float(int(ov.temp + 2.5)))
        reasons = ov.bits if g.busy else ov.bits | GPU_IDLE
        if temp >= TEMP_SLOWDOWN_C:
            reasons |= HW_THERMAL | HW_SLOWDOWN
        sm = m.sm_max if g.busy else 345
        if reasons & HW_BITS:
            sm = min(sm, m.sm_max * 55 // 100)
        elif reasons & (SW_THERMAL | SW_POWER_CAP):
            sm = min(sm, m.sm_max * 80 // 100)
        mem_used = int(m.mem_total * 0.99) if ov.mem_full else g.mem_used
        links = m.links
        links_down = ov.links_down if ov.links_down < links else links
        (
            thermal_ns,
            power_ns,
            sbe_vol,
            dbe_vol,
            sbe_agg,
            dbe_agg,
            retired,
            remap_corr,
            remap_unc,
            replay,
            crc,
            nvreplay,
        ) = counters(g, t) if faults else g.base_counters
        if ov.hbm_temp is not None:
            mem_temp = ov.hbm_temp
        zeros = g.link_zeros
        if crc or nvreplay:  # the simulated errors are all on link 0
            crc_links, replay_links = (crc, *zeros[1:]), (nvreplay, *zeros[1:])
        else:
            crc_links = replay_links = zeros
        fabric: tuple[int | None, ...] = (None, None, None, None)  # PCIe board: no NVSwitch fabric
        if ov.fabric is not None:
            fabric = (*ov.fabric[:2], 0, ov.fabric[2])
        elif links:
            fabric = (FABRIC_COMPLETED, 0, 0, 0)  # state, status, clique id, health mask
        values: list[Any] = [  # in GpuSample's field order (_ORDER)
            g.index, g.uuid, False,
            float(int(util)), float(int(util * g.mem_ratio)),  # NVML: whole percent
            m.mem_total, mem_used, 556 * MIB,
            temp, mem_temp, TEMP_SLOWDOWN_C, TEMP_SHUTDOWN_C, TEMP_MAX_OPERATING_C,
            None,  # fan_pct: an SXM board has no fan
            int(power * 1000.0) / 1000.0, m.limit_w, int(g.energy_j * 1000.0) / 1000.0,  # mW, mJ
            0, sm, m.mem_clock, reasons, thermal_ns, power_ns,
            True, sbe_vol, dbe_vol, sbe_agg, dbe_agg,
            0, retired, ov.retire_pend, remap_corr, remap_unc, ov.remap_pend, ov.remap_fail,
            replay, m.gen if g.busy else IDLE_PCIE_GEN, 16 if ov.pcie_width is None else ov.pcie_width,
            m.gen, 16,
            links, links - links_down, crc, nvreplay, 0,
            ov.recovery, ov.persistence, g.processes if g.busy else (),
            TEMP_MEM_MAX_C, m.sm_max, *fabric,
            g.links_down_tuple(links_down), crc_links, replay_links, zeros,
        ]  # fmt: skip
        return GpuSample(*values) if _POSITIONAL else _keyword_sample(values)

    # ------------------------------------------------------------------ events

    def _schedule_events(self) -> list[tuple[float, GpuEvent]]:
        out = [
            e
            for g in self._gpus
            for f in g.faults
            if f.kind in EVENT_FAULTS
            for e in self._fault_events(g, f)
        ]
        out.sort(key=lambda e: e[0])  # stable: simultaneous events keep their order
        return out

    def _fault_events(self, g: SimGpu, f: Fault) -> list[tuple[float, GpuEvent]]:
        t = f.after_s

        def ev(type_: str, xid: int | None = None, value: int | None = None, when: float = t) -> GpuEvent:
            what = f"Xid {xid}" if xid is not None else type_
            if xid == 74:  # as the driver's kernel-log line carries it: the link and its registers
                what = XID74_DETAIL
            return GpuEvent(
                type_,
                self._wall0 + when,
                "simulated",
                g.index,
                g.uuid,
                g.pci_bus_id,
                xid,
                value,
                f"{what} (simulated fault {f.spec})",
            )

        k = f.kind
        events: list[tuple[float, GpuEvent]] = []
        if k == "xid":
            events.append((t, ev("xid", xid=fault_int(f))))
        elif k == "ecc_dbe":
            events += [(t, ev("ecc_dbe", value=1)), (t, ev("xid", xid=48))]
        elif k == "lost":
            events += [(t, ev("xid", xid=79)), (t, ev("gpu_lost"))]
            if f.end_s is not None:
                events.append((f.end_s, ev("gpu_recovered", when=f.end_s)))
        elif k == "recovery_action":
            events.append((t, ev("recovery_action", value=fault_int(f))))
        elif k == "row_remap_fail":
            events += [(t, ev("page_retirement", value=1)), (t, ev("xid", xid=64))]
        elif k == "remap_pending":
            events += [(t, ev("page_retirement", value=0)), (t, ev("xid", xid=63))]
        elif k == "retired_pages":
            events.append((t, ev("page_retirement", value=0)))
        elif k == "throttle" or (k == "temp" and fault_value(f) >= TEMP_SLOWDOWN_C):
            events.append((t, ev("throttle_start", value=fault_bits(g, t))))
            if f.end_s is not None:
                events.append((f.end_s, ev("throttle_stop", value=fault_bits(g, f.end_s), when=f.end_s)))
        return events

    def poll_events(self) -> list[GpuEvent]:
        """Events due by now, without blocking (each is returned once)."""
        if self._t0 is None or self._next_event >= len(self._events):
            return []  # the common case in a large fleet: nothing scheduled any more
        t = self.elapsed()
        with self._lock:
            i = start = self._next_event
            events = self._events
            while i < len(events) and events[i][0] <= t:
                i += 1
            self._next_event = i
            return [e for _, e in events[start:i]]

    def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Block until scheduled events are due, ``timeout_s`` passes or :meth:`close` is called.

        Returns the due events (``[]`` on timeout or close). Wakes within a few milliseconds
        of an event's scheduled time.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        while not self._closed:
            due = self.poll_events()
            if due:
                return due
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with self._lock:
                nxt = self._events[self._next_event][0] if self._next_event < len(self._events) else None
            wait = remaining if nxt is None or self._t0 is None else min(remaining, nxt - self.elapsed())
            self._wake.wait(max(wait, 0.0005))
        return []
