"""The board model behind :mod:`agent.gpu.simulated`: one simulated GPU and its faults.

:class:`SimGpu` holds the static facts of one GPU (derived from seed, host and index), its
job phases and its thermal and energy state. :func:`overrides` says what the active faults
change in a reading; :func:`counters` computes the cumulative counters from the fault
schedule alone, so they are monotonic and independent of the sampling times.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Final, TypeVar

from agent.faults import Fault
from shared.frames import GpuInfo, GpuProcess

T = TypeVar("T")
MIB: Final = 1 << 20
DRIVER_VERSION: Final = "550.127.08"
CUDA_VERSION: Final = "12.4"

# NVML clocks-event reason bits (docs/reference.md).
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
THERMAL_REASONS: Final = frozenset({"hw_slowdown", "hw_thermal", "sw_thermal"})
HW_BITS: Final = HW_SLOWDOWN | HW_THERMAL | HW_POWER_BRAKE
# H100 SXM thresholds as NVML reports them.
TEMP_SLOWDOWN_C: Final = 89.0
TEMP_SHUTDOWN_C: Final = 92.0
TEMP_MAX_OPERATING_C: Final = 87.0
TEMP_MEM_MAX_C: Final = 95.0  # NVML_TEMPERATURE_THRESHOLD_MEM_MAX of an H100 SXM
IDLE_PCIE_GEN: Final = 1  # an idle GPU lowers its PCIe link generation to save power
# NVML_GPU_FABRIC_STATE_*, and what each ``fabric`` fault value reports (state, status, health mask).
FABRIC_NOT_STARTED: Final = 1
FABRIC_IN_PROGRESS: Final = 2
FABRIC_COMPLETED: Final = 3
FABRIC_FAULTS: Final[dict[str, tuple[int, int, int]]] = {
    "not_started": (FABRIC_NOT_STARTED, 0, 0),
    "in_progress": (FABRIC_IN_PROGRESS, 0, 0),
    "failed": (FABRIC_COMPLETED, 999, 0),  # NVML_ERROR_UNKNOWN
    "degraded": (FABRIC_COMPLETED, 0, 1),  # NVML_GPU_FABRIC_HEALTH_MASK_DEGRADED_BW_TRUE
}

_IDLE_S: Final = (20.0, 240.0)
_BUSY_S: Final = (120.0, 1800.0)
_TAU_CORE_S: Final = 25.0
_TAU_MEM_S: Final = 40.0
_PROCESS_NAMES: Final = ("python3", "pt_main_thread", "torchrun", "vllm", "nccl-tests", "train.py")


class Model:
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


def fault_value(f: Fault) -> float:
    """The numeric value of a fault (the parser guarantees one for the kinds that read it)."""
    v = f.value
    return float(v) if isinstance(v, int | float) else 0.0


def fault_int(f: Fault) -> int:
    """The value of a fault as an integer (XID code, link count, recovery action)."""
    return int(fault_value(f))


class Overrides:
    """What the active faults of one GPU change in its readings."""

    __slots__ = (
        "bits",
        "fabric",
        "hbm_temp",
        "links_down",
        "lost",
        "mem_full",
        "pcie_width",
        "persistence",
        "power",
        "recovery",
        "remap_fail",
        "remap_pend",
        "retire_pend",
        "temp",
    )

    def __init__(self) -> None:
        self.lost = self.mem_full = self.remap_fail = self.remap_pend = self.retire_pend = False
        self.persistence = True
        self.power: float | None = None
        self.temp: float | None = None
        self.hbm_temp: float | None = None
        self.pcie_width: int | None = None
        self.fabric: tuple[int, int, int] | None = None
        self.bits = self.links_down = self.recovery = 0


NO_OVERRIDES: Final = Overrides()
_FLAGS: Final = {
    "lost": "lost",
    "mem_full": "mem_full",
    "row_remap_fail": "remap_fail",
    "remap_pending": "remap_pend",
    "retired_pages": "retire_pend",
}


def overrides(active: list[Fault]) -> Overrides:
    """What the ``active`` faults of one GPU change in its next reading."""
    ov = Overrides()
    for f in active:
        k = f.kind
        if k in _FLAGS:
            setattr(ov, _FLAGS[k], True)
        elif k == "power":
            ov.power = fault_value(f)
        elif k == "temp":
            ov.temp = fault_value(f)
        elif k == "throttle":
            ov.bits |= THROTTLE_BITS[str(f.value)]
        elif k == "persistence_off":
            ov.persistence = False
        elif k == "nvlink_down":
            ov.links_down = max(ov.links_down, fault_int(f))
        elif k == "recovery_action":
            ov.recovery = max(ov.recovery, fault_int(f))
        elif k == "pcie_width":
            w = fault_int(f)
            ov.pcie_width = w if ov.pcie_width is None else min(ov.pcie_width, w)
        elif k == "hbm_temp":
            ov.hbm_temp = fault_value(f)
        elif k == "fabric":
            ov.fabric = FABRIC_FAULTS[str(f.value)]
    return ov


def fault_bits(g: SimGpu, t: float) -> int:
    """The clock-event reason bits that ``g``'s faults set at ``t``."""
    bits = 0
    for f in g.faults:
        if f.active(t):
            if f.kind == "throttle":
                bits |= THROTTLE_BITS[str(f.value)]
            elif f.kind == "temp" and fault_value(f) >= TEMP_SLOWDOWN_C:
                bits |= HW_THERMAL | HW_SLOWDOWN
    return bits


def _seed_int(*parts: object) -> int:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _uuid(seed: int, host: str, index: int) -> str:
    h = hashlib.blake2b(f"gpu|{seed}|{host}|{index}".encode(), digest_size=16).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class Draws:
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
        """A float in [a, b)."""
        return a + (b - a) * self.random()

    def randrange(self, a: int, b: int) -> int:
        """An integer in [a, b)."""
        return a + int(self.random() * (b - a))

    def choice(self, seq: Sequence[T]) -> T:
        """One element of ``seq``."""
        return seq[int(self.random() * len(seq))]


_BUS_IDS: Final = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


class SimGpu:
    """One simulated GPU: static facts, job phases and thermal/energy state."""

    __slots__ = (
        "ambient",
        "base_counters",
        "busy",
        "down_tuples",
        "energy_j",
        "faults",
        "index",
        "job_seq",
        "lag_core",
        "lag_dt",
        "lag_mem",
        "last_t",
        "link_zeros",
        "mem_ratio",
        "mem_temp",
        "mem_used",
        "model",
        "pci_bus_id",
        "peak_w",
        "phase",
        "processes",
        "remap_corr_base",
        "rng",
        "sbe_agg_base",
        "seg_end",
        "seg_start",
        "serial",
        "temp",
        "util_amp",
        "util_base",
        "uuid",
        "wobble_hz",
    )

    def __init__(self, index: int, host: str, seed: int, model: Model, faults: tuple[Fault, ...]) -> None:
        self.index = index
        self.model = model
        self.uuid = _uuid(seed, host, index)
        self.rng = Draws(f"sim|{seed}|{host}|{index}")
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
        # the cumulative counters of a GPU without faults (see SimulatedBackend._counters)
        self.base_counters = (0, 0, 0, 0, self.sbe_agg_base, 0, 0, self.remap_corr_base, 0, 0, 0, 0)
        self.link_zeros: tuple[int, ...] = (0,) * model.links  # per-link counters without errors
        self.down_tuples: dict[int, tuple[int, ...]] = {0: ()}
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

    def links_down_tuple(self, n: int) -> tuple[int, ...]:
        """The links that are down when ``n`` are: the last ``n`` (built once per ``n``)."""
        down = self.down_tuples.get(n)
        if down is None:
            links = self.model.links
            down = self.down_tuples[n] = tuple(range(links - n, links))
        return down

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

    def heat(self, t: float, power: float) -> None:
        """Move temperatures towards what ``power`` sustains (thermal lag) and add energy."""
        target = self.ambient + 0.068 * power
        mem_target = self.ambient + 3.0 + 0.075 * power
        last = self.last_t
        self.last_t = t
        if last is None:
            self.temp, self.mem_temp = target, mem_target
        elif t > last:
            dt = t - last
            if dt != self.lag_dt:  # regular ticks reuse the lag factors
                self.lag_dt = dt
                self.lag_core = 1.0 - math.exp(-dt / _TAU_CORE_S)
                self.lag_mem = 1.0 - math.exp(-dt / _TAU_MEM_S)
            self.temp += (target - self.temp) * self.lag_core
            self.mem_temp += (mem_target - self.mem_temp) * self.lag_mem
            self.energy_j += power * dt

    def util(self, t: float) -> float:
        """GPU utilisation in percent at ``t`` (0 while idle)."""
        if not self.busy:
            return 0.0
        u = self.util_base + self.util_amp * math.sin(self.wobble_hz * t + self.phase)
        return 100.0 if u > 100.0 else (0.0 if u < 0.0 else u)

    def info(self, persistence: bool) -> GpuInfo:
        """The inventory entry of this GPU."""
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


def counters(g: SimGpu, t: float) -> tuple[int, ...]:
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
            if f.value in THERMAL_REASONS:
                thermal += f.overlap(t)
            else:
                power += f.overlap(t)
        elif k == "temp":
            if fault_value(f) >= TEMP_SLOWDOWN_C:
                thermal += f.overlap(t)
        elif k == "power":
            if fault_value(f) > g.model.limit_w:
                power += f.overlap(t)
        elif k == "ecc_sbe":
            sbe += fault_value(f) / 60.0 * f.overlap(t)
        elif k == "pcie_replay":
            replay += fault_value(f) / 60.0 * f.overlap(t)
        elif k == "nvlink_err":
            crc += fault_value(f) * f.overlap(t)
        elif k == "retired_pages":
            retired = max(retired, fault_int(f))
        elif k == "remap_pending":
            remap_corr += 1
    sbe_vol = dbe_vol = 0
    if reset:
        sbe_before = sum(fault_value(f) / 60.0 * f.overlap(reset) for f in g.faults if f.kind == "ecc_sbe")
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
