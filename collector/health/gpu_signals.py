"""Per-GPU checks of the signals sampled beside the classic ones: the PCIe link against its
maximum, HBM temperature against NVML's memory limit, lifetime memory-error trends, the SM
clock against its application clock, fans, and the NVSwitch fabric registration.

Same rules as :mod:`collector.health.gpu`: a reading the GPU cannot give (``None``) is not
evaluated; each function emits at most one observation for its check. The fast path in
:meth:`collector.health.gpu.GpuChecks.quiet_sample` applies the same thresholds inline.
"""

from __future__ import annotations

from typing import Final

from collector.health.config import GpuThresholds
from collector.health.model import CRITICAL, WARNING, GpuVerdicts
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

    def sample(self, v: GpuVerdicts) -> None:
        self._pcie_link(v)
        self._hbm(v)
        self._memory_trend(v)
        self._sm_clock(v)
        self._fan(v)
        self._fabric(v)

    def _pcie_link(self, v: GpuVerdicts) -> None:
        problem = pcie_link_problem(self.cfg, v.g)
        if problem is None:
            return
        width = float(v.g.pcie_link_width or 0)
        if not problem:
            v.ok("gpu.pcie_link", width)
            return
        summary = f"GPU {v.gs.index} PCIe link degraded ({problem}): reseat the GPU, check the riser and slot"
        v.bad("gpu.pcie_link", WARNING, width, summary)

    def _hbm(self, v: GpuVerdicts) -> None:
        mt, lim = v.g.mem_temp_c, v.g.temp_mem_max_c
        if mt is None or lim is None:
            return
        if mt >= lim:
            status = CRITICAL
        elif mt >= lim - self.cfg.hbm_temp_margin_c:
            status = WARNING
        else:
            v.ok("gpu.hbm_temp", mt)
            return
        summary = f"GPU {v.gs.index} HBM at {mt:g} C (NVML memory limit {lim:g} C): check cooling and airflow"
        v.bad("gpu.hbm_temp", status, mt, summary)

    def _memory_trend(self, v: GpuVerdicts) -> None:
        gs, g, prev, ts = v.gs, v.g, v.prev, v.at
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
            v.ok("gpu.memory_trend", 0.0)
            return
        hours = self.cfg.memory_trend_window / 3600
        summary = (
            f"GPU {gs.index} memory is wearing ({gs.memory_trend}): plan a reset and an RMA if it keeps "
        )
        summary += "growing"
        advice = (
            f"A lifetime (aggregate) memory-error counter grew within the last {hours:g} h. "
            "Volatile counters clear at a GPU reset; these do not, so they show a trend across "
            "resets. Run field diagnostics; RMA the GPU if the count keeps rising."
        )
        v.bad("gpu.memory_trend", WARNING, float(g.ecc_dbe_aggregate or 0), summary, advice)

    def _sm_clock(self, v: GpuVerdicts) -> None:
        low = sm_clock_low(self.cfg, v.g)
        if low is None:
            return
        clk = float(v.g.clock_sm_mhz or 0)
        if not low:
            v.ok("gpu.sm_clock", clk)
            return
        summary = (
            f"GPU {v.gs.index} SM clock {clk:.0f} MHz under load, below "
            f"{self.cfg.sm_clock_low_pct:g}% of "
            f"its {v.g.clock_sm_app_mhz} MHz application clock with no throttle reason: "
            "check clock locks and firmware"
        )
        v.bad("gpu.sm_clock", WARNING, clk, summary)

    def _fan(self, v: GpuVerdicts) -> None:
        fan, temp = v.g.fan_pct, v.g.temp_c
        if fan is None or temp is None:  # boards without fans (SXM) report none: not evaluated
            return
        if fan == 0 and temp >= self.cfg.fan_stall_temp_c:
            summary = f"GPU {v.gs.index} fan at 0% at {temp:g} C: the fan has failed or stalled, replace it"
            v.bad("gpu.fan", WARNING, fan, summary)
        else:
            v.ok("gpu.fan", fan)

    def _fabric(self, v: GpuVerdicts) -> None:
        g = v.g
        state = g.fabric_state
        if not self.cfg.fabric_check or state is None or state == FABRIC_NOT_SUPPORTED:
            return
        status, value, what = WARNING, float(state), ""
        if state == FABRIC_NOT_STARTED:
            status, what = CRITICAL, "registration not started: start nvidia-fabricmanager"
        elif state == FABRIC_IN_PROGRESS:
            what = "registration in progress: check nvidia-fabricmanager if it lasts"
        elif state != FABRIC_COMPLETED:
            what = f"in unknown state {state}: check nvidia-fabricmanager"
        elif g.fabric_status:
            status, value = CRITICAL, float(g.fabric_status)
            what = f"registration failed (NVML status {g.fabric_status}): check nvidia-fabricmanager"
        elif problems := fabric_problems(g.fabric_health_mask):
            value = float(g.fabric_health_mask or 0)
            what = f"{' and '.join(problems)}: check nvidia-fabricmanager and the NVLinks"
        if what:
            v.bad("gpu.fabric", status, value, f"GPU {v.gs.index} NVSwitch fabric {what}")
        else:
            v.ok("gpu.fabric", value)
