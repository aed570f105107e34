"""Per-GPU checks of the signals sampled beside the classic ones: the PCIe link against its
maximum, HBM temperature against NVML's memory limit, lifetime memory-error trends, the SM
clock against its application clock, fans, and the NVSwitch fabric registration.

Same rules as :mod:`collector.health.gpu`: a reading the GPU cannot give (``None``) is not
evaluated; each function emits at most one observation for its check. The fast path in
:meth:`collector.health.gpu.GpuChecks.quiet_sample` applies the same thresholds inline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from collector.health.config import GpuThresholds
from collector.health.model import CRITICAL, HEALTHY, WARNING, Emitter, GpuState
from shared.frames import GpuSample

GPU_IDLE: Final = 0x1  # the one clock-event reason that is no reason
# NVML_GPU_FABRIC_STATE_*
FABRIC_NOT_SUPPORTED: Final = 0
FABRIC_NOT_STARTED: Final = 1
FABRIC_IN_PROGRESS: Final = 2
FABRIC_COMPLETED: Final = 3
# NVML_GPU_FABRIC_HEALTH_MASK_*: (shift, name) of the 2-bit fields where 1 (TRUE) is a problem
FABRIC_HEALTH_BITS: Final = ((0, "degraded bandwidth"), (4, "unhealthy route"))


def _grew(new: int | None, old: int | None) -> int:
    """How much a lifetime counter grew (0 when unknown or when it went backwards)."""
    return new - old if new is not None and old is not None and new > old else 0


def _retired(g: GpuSample) -> int | None:
    if g.retired_pages_sbe is None and g.retired_pages_dbe is None:
        return None
    return (g.retired_pages_sbe or 0) + (g.retired_pages_dbe or 0)


def fabric_problems(mask: int | None) -> list[str]:
    """The fabric health-mask fields that say TRUE (a problem)."""
    if not mask:
        return []
    return [name for shift, name in FABRIC_HEALTH_BITS if (mask >> shift) & 0x3 == 1]


def pcie_link_problem(cfg: GpuThresholds, g: GpuSample) -> str | None:
    """What is wrong with the PCIe link; ``""`` when fine; ``None`` when not evaluable."""
    w, wmax, gen, gmax = g.pcie_link_width, g.pcie_link_width_max, g.pcie_link_gen, g.pcie_link_gen_max
    util = g.util_gpu_pct
    width_known = w is not None and bool(wmax)
    gen_known = gen is not None and bool(gmax) and util is not None
    if not cfg.pcie_link_check or not (width_known or gen_known):
        return None
    problems = []
    if width_known and w is not None and wmax is not None and w < wmax:
        problems.append(f"width x{w} of x{wmax}")
    busy = util is not None and util >= cfg.busy_util_pct
    if gen_known and gen is not None and gmax is not None and gen < gmax and busy:
        problems.append(f"Gen{gen} of Gen{gmax} while {util:.0f}% busy")
    return ", ".join(problems)


def sm_clock_low(cfg: GpuThresholds, g: GpuSample) -> bool | None:
    """Busy, no clock-event reason, SM clock well below the application clock; ``None``: not evaluable."""
    clk, app, util, reasons = g.clock_sm_mhz, g.clock_sm_app_mhz, g.util_gpu_pct, g.clock_event_reasons
    if clk is None or not app or util is None or reasons is None:
        return None
    return util >= cfg.busy_util_pct and not reasons & ~GPU_IDLE and clk < app * cfg.sm_clock_low_pct / 100.0


def retired_grew(g: GpuSample, prev: GpuSample) -> bool:
    """Whether the retired-page count (SBE + DBE) grew since ``prev``."""
    return _grew(_retired(g), _retired(prev)) > 0


def fabric_ok(g: GpuSample) -> bool:
    """A registered fabric: completed, status success, nothing TRUE in the health mask."""
    return (
        g.fabric_state == FABRIC_COMPLETED
        and not g.fabric_status
        and not fabric_problems(g.fabric_health_mask)
    )


class SignalChecks:
    """gpu.pcie_link, gpu.hbm_temp, gpu.memory_trend, gpu.sm_clock, gpu.fan, gpu.fabric."""

    def __init__(self, cfg: GpuThresholds) -> None:
        self.cfg = cfg

    def sample(
        self,
        em: Emitter,
        gs: GpuState,
        base: Mapping[str, str],
        g: GpuSample,
        prev: GpuSample | None,
        ts: float,
    ) -> None:
        self._pcie_link(em, gs, base, g, ts)
        self._hbm(em, gs, base, g, ts)
        self._memory_trend(em, gs, base, g, prev, ts)
        self._sm_clock(em, gs, base, g, ts)
        self._fan(em, gs, base, g, ts)
        self._fabric(em, gs, base, g, ts)

    def _pcie_link(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float) -> None:
        problem = pcie_link_problem(self.cfg, g)
        if problem is None:
            return
        width = float(g.pcie_link_width or 0)
        if not problem:
            em.emit(gs.checks, "gpu.pcie_link", base, HEALTHY, ts, value=width)
            return
        em.emit(
            gs.checks,
            "gpu.pcie_link",
            base,
            WARNING,
            ts,
            value=width,
            summary=f"GPU {gs.index} PCIe link degraded ({problem}): reseat the GPU, check the riser and "
            "slot",
            advice="The link trained below its maximum (a narrower width at any time, or a lower "
            "generation while the GPU is busy; idle GPUs lower their generation to save power, "
            "which is not judged). Host-GPU bandwidth is cut. Reseat the card, check risers, "
            "retimers and cables, update the firmware.",
        )

    def _hbm(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float) -> None:
        mt, lim = g.mem_temp_c, g.temp_mem_max_c
        if mt is None or lim is None:
            return
        if mt >= lim:
            status = CRITICAL
        elif mt >= lim - self.cfg.hbm_temp_margin_c:
            status = WARNING
        else:
            em.emit(gs.checks, "gpu.hbm_temp", base, HEALTHY, ts, value=mt)
            return
        em.emit(
            gs.checks,
            "gpu.hbm_temp",
            base,
            status,
            ts,
            value=mt,
            summary=f"GPU {gs.index} HBM at {mt:g} C (NVML memory limit {lim:g} C): check cooling and "
            "airflow",
            advice="The memory (HBM) temperature is near or past the limit NVML reports for it "
            "(NVML_TEMPERATURE_THRESHOLD_MEM_MAX): the GPU slows its memory down, then errors "
            "follow. Check the cold plate or heatsink, fans and inlet temperature.",
        )

    def _memory_trend(
        self,
        em: Emitter,
        gs: GpuState,
        base: Mapping[str, str],
        g: GpuSample,
        prev: GpuSample | None,
        ts: float,
    ) -> None:
        retired = _retired(g)
        if g.ecc_dbe_aggregate is None and retired is None:
            return
        if prev is not None:
            dbe = _grew(g.ecc_dbe_aggregate, prev.ecc_dbe_aggregate)
            pages = _grew(retired, _retired(prev))
            if dbe or pages:
                what = []
                if dbe:
                    what.append(
                        f"lifetime double-bit ECC errors {prev.ecc_dbe_aggregate} -> {g.ecc_dbe_aggregate}"
                    )
                if pages:
                    what.append(f"retired pages {_retired(prev)} -> {retired}")
                gs.memory_trend_at, gs.memory_trend = ts, ", ".join(what)
        since = gs.memory_trend_at
        if since is None or ts - since >= self.cfg.memory_trend_window:
            gs.memory_trend_at, gs.memory_trend = None, ""
            em.emit(gs.checks, "gpu.memory_trend", base, HEALTHY, ts, value=0.0)
            return
        hours = self.cfg.memory_trend_window / 3600
        em.emit(
            gs.checks,
            "gpu.memory_trend",
            base,
            WARNING,
            ts,
            value=float(g.ecc_dbe_aggregate or 0),
            summary=f"GPU {gs.index} memory is wearing ({gs.memory_trend}): "
            "plan a reset and an RMA if it keeps growing",
            advice=f"A lifetime (aggregate) memory-error counter grew within the last {hours:g} h. "
            "Volatile counters clear at a GPU reset; these do not, so they show a trend across "
            "resets. Run field diagnostics; RMA the GPU if the count keeps rising.",
        )

    def _sm_clock(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float) -> None:
        low = sm_clock_low(self.cfg, g)
        if low is None:
            return
        clk = float(g.clock_sm_mhz or 0)
        if not low:
            em.emit(gs.checks, "gpu.sm_clock", base, HEALTHY, ts, value=clk)
            return
        em.emit(
            gs.checks,
            "gpu.sm_clock",
            base,
            WARNING,
            ts,
            value=clk,
            summary=f"GPU {gs.index} SM clock {clk:.0f} MHz under load, below "
            f"{self.cfg.sm_clock_low_pct:g}% of "
            f"its {g.clock_sm_app_mhz} MHz application clock with no throttle reason: "
            "check clock locks and firmware",
            advice="The GPU is busy, NVML reports no clock-event (throttle) reason, yet the SM clock is "
            "far below the application clock: a forgotten clock lock (nvidia-smi -q -d CLOCK), "
            "a firmware problem or a failing board. Reset the clocks (nvidia-smi -rgc -rac); "
            "run diagnostics if it persists.",
        )

    def _fan(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float) -> None:
        fan, temp = g.fan_pct, g.temp_c
        if fan is None or temp is None:  # boards without fans (SXM) report none: not evaluated
            return
        if fan == 0 and temp >= self.cfg.fan_stall_temp_c:
            em.emit(
                gs.checks,
                "gpu.fan",
                base,
                WARNING,
                ts,
                value=fan,
                summary=f"GPU {gs.index} fan at 0% at {temp:g} C: the fan has failed or stalled, replace it",
                advice="The GPU is hot but its fan does not turn. Check the fan and its connector; "
                "replace the fan or the board before the GPU throttles or shuts down.",
            )
        else:
            em.emit(gs.checks, "gpu.fan", base, HEALTHY, ts, value=fan)

    def _fabric(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float) -> None:
        state = g.fabric_state
        if not self.cfg.fabric_check or state is None or state == FABRIC_NOT_SUPPORTED:
            return
        c = gs.checks
        advice = (
            "On NVSwitch systems the fabric manager (nvidia-fabricmanager) registers every GPU "
            "with the NVLink fabric; until it has, CUDA jobs fail to start (error 802, system "
            "not yet initialised) or lose NVLink bandwidth. Check systemctl status "
            "nvidia-fabricmanager and its log; restart it, then reset the GPUs."
        )
        if state == FABRIC_NOT_STARTED:
            em.emit(
                c,
                "gpu.fabric",
                base,
                CRITICAL,
                ts,
                value=float(state),
                summary=f"GPU {gs.index} NVSwitch fabric registration not started: start "
                "nvidia-fabricmanager",
                advice=advice,
            )
        elif state == FABRIC_IN_PROGRESS:
            em.emit(
                c,
                "gpu.fabric",
                base,
                WARNING,
                ts,
                value=float(state),
                summary=f"GPU {gs.index} NVSwitch fabric registration in progress: "
                "check nvidia-fabricmanager if it lasts",
                advice=advice,
            )
        elif state != FABRIC_COMPLETED:
            em.emit(
                c,
                "gpu.fabric",
                base,
                WARNING,
                ts,
                value=float(state),
                summary=f"GPU {gs.index} NVSwitch fabric in unknown state {state}: check "
                "nvidia-fabricmanager",
                advice=advice,
            )
        elif g.fabric_status:
            em.emit(
                c,
                "gpu.fabric",
                base,
                CRITICAL,
                ts,
                value=float(g.fabric_status),
                summary=f"GPU {gs.index} NVSwitch fabric registration failed (NVML status "
                f"{g.fabric_status}): check nvidia-fabricmanager",
                advice=advice,
            )
        elif problems := fabric_problems(g.fabric_health_mask):
            em.emit(
                c,
                "gpu.fabric",
                base,
                WARNING,
                ts,
                value=float(g.fabric_health_mask or 0),
                summary=f"GPU {gs.index} NVSwitch fabric {' and '.join(problems)}: "
                "check nvidia-fabricmanager and the NVLinks",
                advice=advice,
            )
        else:
            em.emit(c, "gpu.fabric", base, HEALTHY, ts, value=float(state))
