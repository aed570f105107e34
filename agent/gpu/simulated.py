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

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, Final, TypeVar

from agent.faults import Fault, FaultSchedule
from agent.gpu.base import GpuEvent, Inventory
from shared.frames import GpuInfo, GpuProcess, GpuSample

T = TypeVar("T")
MIB: Final = 1 << 20
DRIVER_VERSION: Final = "550.127.08"
CUDA_VERSION: Final = "12.4"

# NVML clocks-event reason bits (REFERENCE.md).
GPU_IDLE: Final = 0x1
SW_POWER_CAP: Final = 0x4
HW_SLOWDOWN: Final = 0x8
SW_THERMAL: Final = 0x20
HW_THERMAL: Final = 0x40
HW_POWER_BRAKE: Final = 0x80
THROTTLE_BITS: Final[dict[str, int]] = {
    "hw_slowdown": HW_SLOWDOWN,
    "hw_thermal": HW_THERMAL | HW_SLOWDOWN,
    "sw_thermal": SW_THERMAL,
    "power_brake": HW_POWER_BRAKE | HW_SLOWDOWN,
    "sw_power": SW_POWER_CAP,
}
_THERMAL_REASONS: Final = frozenset({"hw_slowdown", "hw_thermal", "sw_thermal"})
_HW_BITS: Final = HW_SLOWDOWN | HW_THERMAL | HW_POWER_BRAKE

# Fault kinds that emit events at their start; ``lost``, ``throttle`` and ``temp`` (at or above
# the slowdown temperature) also at their end.
EVENT_FAULTS: Final = frozenset(
    {"xid", "ecc_dbe", "lost", "recovery_action", "row_remap_fail", "remap_pending", "retired_pages"}
    | {"throttle", "temp"}
)

_IDLE_S: Final = (20.0, 240.0)
_BUSY_S: Final = (120.0, 1800.0)
_TAU_CORE_S: Final = 25.0
_TAU_MEM_S: Final = 40.0
_PROCESS_NAMES: Final = ("python3", "pt_main_thread", "torchrun", "vllm", "nccl-tests", "train.py")


class _Model:
    """Static facts for a board family, derived from the model name."""

    def __init__(self, name: str) -> None:
        self.name = name
        up = name.upper()
        gb = re.search(r"(\d+)\s*GB", up)
        mem_gib = int(gb.group(1)) if gb else 80
        # Boards report a little less than their nominal size (an 80 GB H100: 81559 MiB).
        self.mem_total = int(mem_gib * 1019.5) * MIB
        if re.search(r"\bA(100|800|30|10)\b", up):
            self.arch, self.gen, self.links, self.limit_w = "Ampere", 4, 12, 400.0
            self.sm_max, self.mem_clock = 1410, 1593
        elif re.search(r"\bB(100|200)\b", up):
            self.arch, self.gen, self.links, self.limit_w = "Blackwell", 5, 18, 1000.0
            self.sm_max, self.mem_clock = 1965, 3996
        else:
            self.arch, self.gen, self.links, self.limit_w = "Hopper", 5, 18, 700.0
            self.sm_max, self.mem_clock = 1980, 2619
        if "PCIE" in up:
            self.limit_w, self.links = self.limit_w / 2, 0
        self.idle_w = self.limit_w * 0.1


def _fv(f: Fault) -> float:
    """The numeric value of a fault (the parser guarantees one for the kinds that read it)."""
    v = f.value
    return float(v) if isinstance(v, int | float) else 0.0


def _iv(f: Fault) -> int:
    return int(_fv(f))


def _fault_bits(g: _Gpu, t: float) -> int:
    """The clock-event reason bits that ``g``'s faults set at ``t``."""
    bits = 0
    for f in g.faults:
        if f.active(t):
            if f.kind == "throttle":
                bits |= THROTTLE_BITS[str(f.value)]
            elif f.kind == "temp" and _fv(f) >= TEMP_SLOWDOWN_C:
                bits |= HW_THERMAL | HW_SLOWDOWN
    return bits


def _seed_int(*parts: object) -> int:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _uuid(seed: int, host: str, index: int) -> str:
    h = hashlib.blake2b(f"gpu|{seed}|{host}|{index}".encode(), digest_size=16).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class _Draws:
    """A light deterministic stream of uniform numbers (blake2b in counter mode).

    ``random.Random`` keeps 2.5 KB of state; a fleet has tens of thousands of GPUs.
    """

    __slots__ = ("_buf", "_key", "_n")

    def __init__(self, key: str) -> None:
        self._key = key.encode()
        self._n = 0
        self._buf: list[float] = []

    def random(self) -> float:
        """A float in [0, 1)."""
        if not self._buf:
            d = hashlib.blake2b(self._key + self._n.to_bytes(8, "big"), digest_size=64).digest()
            self._n += 1
            self._buf = [
                (int.from_bytes(d[i : i + 8], "big") >> 11) / 9007199254740992.0 for i in range(56, -8, -8)
            ]
        return self._buf.pop()

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randrange(self, a: int, b: int) -> int:
        return a + int(self.random() * (b - a))

    def choice(self, seq: Sequence[T]) -> T:
        return seq[int(self.random() * len(seq))]


_BUS_IDS: Final = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


class _Gpu:
    """One simulated GPU: static facts, job phases and thermal/energy state."""

    def __init__(self, index: int, host: str, seed: int, model: _Model, faults: tuple[Fault, ...]) -> None:
        self.index = index
        self.model = model
        self.uuid = _uuid(seed, host, index)
        self.rng = _Draws(f"sim|{seed}|{host}|{index}")
        rng = self.rng
        bus = _BUS_IDS[index] if index < len(_BUS_IDS) else (0x100 + index) & 0xFF
        self.pci_bus_id = f"00000000:{bus:02X}:00.0"
        self.serial = str(1650000000000 + _seed_int("serial", seed, host, index) % 10_000_000_000)
        self.faults = faults
        self.ambient = 26.0 + rng.uniform(0.0, 4.0)
        self.sbe_agg_base = rng.choice((0, 0, 0, 0, 0, 0, 0, 2, 5, 17))
        self.remap_corr_base = rng.choice((0, 0, 0, 0, 0, 0, 0, 1))
        self.phase = rng.uniform(0.0, 2 * math.pi)
        self.energy_j = rng.uniform(5e7, 5e9)
        self.wobble_hz = rng.uniform(0.01, 0.05) * 2 * math.pi
        # job phase state
        self.busy = rng.random() < 0.6
        length = rng.uniform(*(_BUSY_S if self.busy else _IDLE_S))
        self.seg_start = -rng.uniform(0.0, length)
        self.seg_end = self.seg_start + length
        self.job_seq = 0
        self._start_phase()
        self.last_t: float | None = None
        self.lag_dt = 0.0
        self.lag_core = self.lag_mem = 0.0
        self.temp = 0.0
        self.mem_temp = 0.0

    def _idle(self) -> None:
        self.util_base = 0.0
        self.util_amp = 0.0
        self.mem_ratio = 0.0
        self.mem_used = 4 * MIB
        self.peak_w = self.model.idle_w
        self.processes: tuple[GpuProcess, ...] = ()

    def _new_job(self) -> None:
        rng = self.rng
        self.job_seq += 1
        self.util_base = rng.uniform(65.0, 97.0)
        self.util_amp = rng.uniform(2.0, 10.0)
        self.mem_ratio = rng.uniform(0.25, 0.6)
        total = self.model.mem_total
        self.mem_used = int(total * rng.uniform(0.3, 0.93)) // MIB * MIB
        self.peak_w = self.model.limit_w * rng.uniform(0.6, 0.93)
        container = (
            f"slurm-job-{rng.randrange(100_000, 9_999_999)}"
            if rng.random() < 0.5
            else f"docker-{rng.randrange(0, 1 << 48):012x}"
        )
        nproc = 1 if rng.random() < 0.7 else 2
        pid = rng.randrange(1000, 4_000_000)
        name = rng.choice(_PROCESS_NAMES)
        share = self.mem_used // nproc // MIB * MIB
        self.processes = tuple(
            GpuProcess(pid=pid + i, name=name, used_mem_bytes=share, container=container)
            for i in range(nproc)
        )

    def advance(self, t: float) -> None:
        """Move the job phases forward to time ``t``."""
        while t >= self.seg_end:
            self.busy = not self.busy
            self.seg_start = self.seg_end
            self.seg_end += self.rng.uniform(*(_BUSY_S if self.busy else _IDLE_S))
            self._start_phase()

    def _start_phase(self) -> None:
        if self.busy:
            self._new_job()
        else:
            self._idle()

    def util(self, t: float) -> float:
        if not self.busy:
            return 0.0
        u = self.util_base + self.util_amp * math.sin(self.wobble_hz * t + self.phase)
        return 100.0 if u > 100.0 else (0.0 if u < 0.0 else u)

    def info(self, persistence: bool) -> GpuInfo:
        m = self.model
        return GpuInfo(
            index=self.index,
            uuid=self.uuid,
            name=m.name,
            serial=self.serial,
            pci_bus_id=self.pci_bus_id,
            minor_number=self.index,
            architecture=m.arch,
            mem_total_bytes=m.mem_total,
            vbios="96.00.99.00.01",
            mig_mode=False,
            persistence_mode=persistence,
            power_limit_default_w=m.limit_w,
            pcie_link_gen_max=m.gen,
            pcie_link_width_max=16,
            nvlink_links_total=m.links,
            unsupported=("fan_pct",),
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
    "persistence_mode", "processes",
)  # fmt: skip
# Positional construction is ~40% cheaper; fall back to keywords if GpuSample's fields move.
_POSITIONAL: Final = tuple(f.name for f in fields(GpuSample))[: len(_ORDER)] == tuple(_ORDER)


def _keyword_sample(values: list[Any]) -> GpuSample:
    return GpuSample(**dict(zip(_ORDER, values, strict=True)))


TEMP_SLOWDOWN_C: Final = 89.0
TEMP_SHUTDOWN_C: Final = 92.0
TEMP_MAX_OPERATING_C: Final = 87.0


class SimulatedBackend:
    """A :class:`~agent.gpu.base.GpuBackend` of ``gpus`` simulated GPUs on host ``host``.

    ``faults`` is filtered to the faults that apply to ``host``; fault times count from
    :meth:`open`, measured with ``clock`` (seconds, monotonic). Thread safety: one thread may
    block in :meth:`wait_events` while another calls :meth:`sample`, :meth:`poll_events`
    and :meth:`close`.
    """

    name = "simulated"

    def __init__(
        self,
        gpus: int,
        *,
        host: str,
        seed: int = 0,
        faults: FaultSchedule | None = None,
        clock: Callable[[], float] = time.monotonic,
        model: str = "NVIDIA H100 80GB HBM3",
    ) -> None:
        if not 0 <= gpus <= 1024:
            raise ValueError(f"gpus must be in [0, 1024], got {gpus}")
        self.host = host
        self.seed = seed
        self.faults = (faults or FaultSchedule()).for_host(host)
        self._clock = clock
        self._model = _Model(model)
        self._gpus = [_Gpu(i, host, seed, self._model, self.faults.for_gpu(i)) for i in range(gpus)]
        self._t0: float | None = None
        self._wall0 = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._events: list[tuple[float, GpuEvent]] = []
        self._next_event = 0
        self._inventory: Inventory | None = None
        self._has_persistence_faults = bool(self.faults.of_kind("persistence_off"))

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Start the simulation: fault times count from now."""
        with self._lock:
            self._t0 = self._clock()
            self._wall0 = time.time()
            self._closed = False
            self._wake.clear()
            self._events = self._schedule_events()
            self._next_event = 0
            for g in self._gpus:
                g.last_t = None

    def close(self) -> None:
        """Stop; wakes a thread blocked in :meth:`wait_events` (idempotent)."""
        self._closed = True
        self._wake.set()

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

    def _sample_gpu(self, g: _Gpu, t: float) -> GpuSample:
        m = g.model
        faults = g.faults
        active = [f for f in faults if f.active(t)] if faults else None
        if active and any(f.kind == "lost" for f in active):
            g.last_t = t
            return GpuSample(index=g.index, uuid=g.uuid, lost=True)
        util = g.util(t)
        power = m.idle_w + (g.peak_w - m.idle_w) * util * 0.01 if util else m.idle_w
        mem_used = g.mem_used
        persistence = True
        forced_temp: float | None = None
        throttles: list[str] = []
        nvlink_down = 0
        recovery = 0
        remap_fail = remap_pend = retire_pend = False
        if active:
            for f in active:
                k = f.kind
                if k == "power":
                    power = _fv(f)
                elif k == "temp":
                    forced_temp = _fv(f)
                elif k == "throttle":
                    throttles.append(str(f.value))
                elif k == "mem_full":
                    mem_used = int(m.mem_total * 0.99)
                elif k == "persistence_off":
                    persistence = False
                elif k == "nvlink_down":
                    nvlink_down = max(nvlink_down, _iv(f))
                elif k == "recovery_action":
                    recovery = max(recovery, _iv(f))
                elif k == "row_remap_fail":
                    remap_fail = True
                elif k == "remap_pending":
                    remap_pend = True
                elif k == "retired_pages":
                    retire_pend = True
        # thermal lag towards the temperature that the power draw sustains
        target = g.ambient + 0.068 * power
        mem_target = g.ambient + 3.0 + 0.075 * power
        last = g.last_t
        if last is None:
            g.temp, g.mem_temp = target, mem_target
        elif t > last:
            dt = t - last
            if dt != g.lag_dt:  # regular ticks reuse the lag factors
                g.lag_dt = dt
                g.lag_core = 1.0 - math.exp(-dt / _TAU_CORE_S)
                g.lag_mem = 1.0 - math.exp(-dt / _TAU_MEM_S)
            g.temp += (target - g.temp) * g.lag_core
            g.mem_temp += (mem_target - g.mem_temp) * g.lag_mem
            g.energy_j += power * dt
        g.last_t = t
        # NVML reports whole degrees, whole percent, milliwatts and millijoules
        temp = float(int(g.temp + 0.5)) if forced_temp is None else forced_temp
        mem_temp = float(int(g.mem_temp + 0.5))
        if forced_temp is not None and forced_temp > mem_temp:
            mem_temp = float(round(forced_temp + 2.0))
        reasons = 0 if g.busy else GPU_IDLE
        for r in throttles:
            reasons |= THROTTLE_BITS[r]
        if temp >= TEMP_SLOWDOWN_C:
            reasons |= HW_THERMAL | HW_SLOWDOWN
        sm = m.sm_max if g.busy else 345
        if reasons & _HW_BITS:
            sm = min(sm, m.sm_max * 55 // 100)
        elif reasons & (SW_THERMAL | SW_POWER_CAP):
            sm = min(sm, m.sm_max * 80 // 100)
        c = self._counters(g, t) if faults else None
        if c is None:
            thermal_ns = power_ns = sbe_vol = dbe_vol = dbe_agg = retired = remap_unc = 0
            replay = crc = nvreplay = 0
            sbe_agg = g.sbe_agg_base
            remap_corr = g.remap_corr_base
        else:
            (thermal_ns, power_ns, sbe_vol, dbe_vol, sbe_agg, dbe_agg, retired, remap_corr, remap_unc) = c[:9]
            replay, crc, nvreplay = c[9:]
        values: list[Any] = [  # in GpuSample's field order (_ORDER)
            g.index, g.uuid, False,
            float(int(util)), float(int(util * g.mem_ratio)),  # NVML: whole percent
            m.mem_total, mem_used, 556 * MIB,
            temp, mem_temp, TEMP_SLOWDOWN_C, TEMP_SHUTDOWN_C, TEMP_MAX_OPERATING_C,
            None,  # fan_pct: an SXM board has no fan
            int(power * 1000.0) / 1000.0, m.limit_w, int(g.energy_j * 1000.0) / 1000.0,  # mW, mJ
            0, sm, m.mem_clock, reasons, thermal_ns, power_ns,
            True, sbe_vol, dbe_vol, sbe_agg, dbe_agg,
            0, retired, retire_pend, remap_corr, remap_unc, remap_pend, remap_fail,
            replay, m.gen, 16, m.gen, 16,
            m.links, m.links - nvlink_down if nvlink_down < m.links else 0, crc, nvreplay, 0,
            recovery, persistence, g.processes if g.busy else (),
        ]  # fmt: skip
        return GpuSample(*values) if _POSITIONAL else _keyword_sample(values)

    def _counters(self, g: _Gpu, t: float) -> tuple[int, ...]:
        """Cumulative counters at ``t`` from the GPU's faults (monotonic by construction)."""
        thermal = power = sbe = replay = crc = 0.0
        dbe_agg = retired = remap_corr = 0
        reset = 0.0  # the last GPU reset (end of an ecc_dbe fault) at or before t
        for f in g.faults:
            if f.after_s > t:
                continue
            k = f.kind
            if k == "ecc_dbe":
                dbe_agg += 1
                end = f.end_s
                if end is not None and end <= t and end > reset:
                    reset = end
            elif k == "throttle":
                if f.value in _THERMAL_REASONS:
                    thermal += f.overlap(t)
                else:
                    power += f.overlap(t)
            elif k == "temp":
                if _fv(f) >= TEMP_SLOWDOWN_C:
                    thermal += f.overlap(t)
            elif k == "power":
                if _fv(f) > g.model.limit_w:
                    power += f.overlap(t)
            elif k == "ecc_sbe":
                sbe += _fv(f) / 60.0 * f.overlap(t)
            elif k == "pcie_replay":
                replay += _fv(f) / 60.0 * f.overlap(t)
            elif k == "nvlink_err":
                crc += _fv(f) * f.overlap(t)
            elif k == "retired_pages":
                retired = max(retired, _iv(f))
            elif k == "remap_pending":
                remap_corr += 1
        sbe_vol = dbe_vol = 0
        if reset:
            sbe_before = sum(_fv(f) / 60.0 * f.overlap(reset) for f in g.faults if f.kind == "ecc_sbe")
            sbe_vol = int(sbe) - int(sbe_before)
            dbe_vol = sum(1 for f in g.faults if f.kind == "ecc_dbe" and reset <= f.after_s <= t)
        else:
            sbe_vol, dbe_vol = int(sbe), dbe_agg
        return (
            int(thermal * 1e9),
            int(power * 1e9),
            sbe_vol,
            dbe_vol,
            g.sbe_agg_base + int(sbe),
            dbe_agg,
            retired,
            g.remap_corr_base + remap_corr,
            dbe_agg,  # every double-bit error remaps a row (uncorrectable)
            int(replay),
            int(crc),
            int(crc) // 20,
        )

    # ------------------------------------------------------------------ events

    def _schedule_events(self) -> list[tuple[float, GpuEvent]]:
        out: list[tuple[float, GpuEvent]] = []
        for g in self._gpus:
            for f in g.faults:
                if f.kind not in EVENT_FAULTS:
                    continue
                for t, ev in self._fault_events(g, f):
                    out.append((t, ev))
        out.sort(key=lambda e: e[0])
        return out

    def _fault_events(self, g: _Gpu, f: Fault) -> list[tuple[float, GpuEvent]]:
        t = f.after_s

        def ev(type_: str, xid: int | None = None, value: int | None = None, when: float = t) -> GpuEvent:
            what = f"Xid {xid}" if xid is not None else type_
            return GpuEvent(
                type=type_,
                ts=self._wall0 + when,
                source="simulated",
                gpu_index=g.index,
                gpu_uuid=g.uuid,
                pci_bus_id=g.pci_bus_id,
                xid=xid,
                value=value,
                message=f"{what} (simulated fault {f.spec})",
            )

        k = f.kind
        events: list[tuple[float, GpuEvent]] = []
        if k == "xid":
            events.append((t, ev("xid", xid=_iv(f))))
        elif k == "ecc_dbe":
            events += [(t, ev("ecc_dbe", value=1)), (t, ev("xid", xid=48))]
        elif k == "lost":
            events += [(t, ev("xid", xid=79)), (t, ev("gpu_lost"))]
            if f.end_s is not None:
                events.append((f.end_s, ev("gpu_recovered", when=f.end_s)))
        elif k == "recovery_action":
            events.append((t, ev("recovery_action", value=_iv(f))))
        elif k == "row_remap_fail":
            events += [(t, ev("page_retirement", value=1)), (t, ev("xid", xid=64))]
        elif k == "remap_pending":
            events += [(t, ev("page_retirement", value=0)), (t, ev("xid", xid=63))]
        elif k == "retired_pages":
            events.append((t, ev("page_retirement", value=0)))
        elif k == "throttle" or (k == "temp" and _fv(f) >= TEMP_SLOWDOWN_C):
            events.append((t, ev("throttle_start", value=_fault_bits(g, t))))
            if f.end_s is not None:
                events.append((f.end_s, ev("throttle_stop", value=_fault_bits(g, f.end_s), when=f.end_s)))
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

    def next_event_at(self) -> float | None:
        """When (seconds since open) the next scheduled event is due, or ``None``."""
        with self._lock:
            if self._next_event < len(self._events):
                return self._events[self._next_event][0]
            return None

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
            nxt = self.next_event_at()
            wait = remaining if nxt is None or self._t0 is None else min(remaining, nxt - self.elapsed())
            self._wake.wait(max(wait, 0.0005))
        return []
