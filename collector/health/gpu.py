"""Per-GPU checks: one GPU sample (and the recent ones, for rates) to observations.

A value the GPU cannot report (``None``) is not evaluated: the check emits nothing and keeps
its last conclusion. Counter rates (single-bit ECC, PCIe replays, NVLink errors) come from the
delta since the newest sample at least ``rate_window`` older (:func:`rate_base`): counters are
integers, and a short span between two samples (an agent starved, a frame late) would read a
steady fault as no errors at all and resolve it, then fire it again. Until a GPU has been seen
for the window, a rate over its limit is judged, one under it is not called healthy yet. A
counter that went backwards was reset (GPU reset, driver reload), and its new value is the
delta since the reset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from collector.health import gpu_signals
from collector.health.advice import ADVICE
from collector.health.config import GpuThresholds
from collector.health.model import (
    CRITICAL,
    HEALTHY,
    INFO,
    WARNING,
    Emitter,
    GpuState,
    GpuVerdicts,
    RateMark,
    Verdicts,
)
from shared import xid74
from shared.frames import GpuSample
from shared.xid import XidInfo

# NVML clocks-event (throttle) reason bits and names.
REASON_NAMES: Final = (
    (0x4, "SW power cap"),
    (0x8, "HW slowdown"),
    (0x20, "SW thermal"),
    (0x40, "HW thermal"),
    (0x80, "HW power brake"),
)
# Expected PCIe replays per minute per lane: BER 1e-12 x lane rate x 60 s (DCGM; docs/reference.md).
PCIE_PER_LANE_PER_MIN: Final[dict[int, float]] = {
    1: 0.15,
    2: 0.30,
    3: 0.48,
    4: 0.96,
    5: 1.92,
    6: 3.84,
}
# NVML_GPU_RECOVERY_ACTION_*: (name, status).
RECOVERY_ACTIONS: Final[dict[int, tuple[str, str]]] = {
    0: ("NONE", HEALTHY),
    1: ("GPU_RESET", CRITICAL),
    2: ("NODE_REBOOT", CRITICAL),
    3: ("DRAIN_P2P", WARNING),
    4: ("DRAIN_AND_RESET", CRITICAL),
    5: ("RECOVER_IMEX_DOMAIN", WARNING),
    6: ("BUS_RESET", CRITICAL),
    7: ("SYSTEM_REBOOT", CRITICAL),
}
XID_ACTION_ADVICE: Final[dict[str, str]] = {
    "restart_app": "restart the application; the GPU itself is usually fine",
    "reset_gpu": "drain the node and reset the GPU (nvidia-smi -r); RMA if it recurs",
    "reboot": "drain the node and reboot it; RMA if it recurs",
    "ignore": "no action now; track the trend",
    "contact_support": "collect nvidia-bug-report.sh and contact support",
    "follow_linked": "follow the action of the XID it refers to (recovery action)",
}


def pcie_expected_per_min(gen: int | None, width: int | None, factor: float = 1.0) -> float | None:
    """Expected PCIe replays per minute for a link, or ``None`` when the link is unknown."""
    if gen is None or not width:
        return None
    per_lane = PCIE_PER_LANE_PER_MIN.get(gen)
    if per_lane is None:
        return None
    return math.ceil(per_lane * width) * factor


def reason_names(bits: int) -> str:
    return ", ".join(name for bit, name in REASON_NAMES if bits & bit) or "none"


def _delta(new: int | None, old: int | None) -> int | None:
    if new is None or old is None:
        return None
    return new - old if new >= old else new  # went backwards: reset, count since the reset


def rate_mark(g: GpuSample, ts: float) -> RateMark:
    """The rate counters of one sample (per-link ones only where the driver has no total)."""
    crc, rep, rec = g.nvlink_crc_errors, g.nvlink_replay_errors, g.nvlink_recovery_errors
    return (
        ts,
        g.ecc_sbe_volatile,
        g.pcie_replay_count,
        crc,
        rep,
        rec,
        g.nvlink_crc_by_link if crc is None else (),
        g.nvlink_replay_by_link if rep is None else (),
        g.nvlink_recovery_by_link if rec is None else (),
    )


def rate_base(gs: GpuState, ts: float, window: float) -> tuple[RateMark | None, bool]:
    """The sample the rates at ``ts`` are counted from, and whether it spans the whole window:
    the newest at least ``window`` before ``ts`` (older ones are dropped), else the oldest kept
    (the GPU was seen for less than the window); ``None`` when none is kept."""
    marks = gs.rate_marks
    cut = ts - window
    while len(marks) > 1 and marks[1][0] <= cut:
        del marks[0]
    if not marks:
        return None, False
    m = marks[0]
    return m, m[0] <= cut


def keep_mark(gs: GpuState, g: GpuSample, ts: float, step: float) -> None:
    """Remember this sample's rate counters if the last kept is ``step`` older (a quarter of
    the window: a rate base is then at most a quarter of it, plus an interval, older than the
    window; fewer samples kept and copied)."""
    marks = gs.rate_marks
    if not marks or ts - marks[-1][0] >= step:
        marks.append(rate_mark(g, ts))


def _error_counters(g: GpuSample) -> bool:
    """Whether the GPU counts NVLink errors at all (totals or per link)."""
    return not (
        g.nvlink_crc_errors is None
        and g.nvlink_replay_errors is None
        and g.nvlink_recovery_errors is None
        and not g.nvlink_crc_by_link
        and not g.nvlink_replay_by_link
        and not g.nvlink_recovery_by_link
    )


def _link_deltas(new: tuple[int, ...], old: tuple[int, ...]) -> dict[int, int]:
    """Per-link counter deltas (link -> delta); empty when either side lacks per-link counters."""
    if not new or len(new) != len(old):
        return {}
    return {i: (n - o if n >= o else n) for i, (n, o) in enumerate(zip(new, old, strict=True))}


class GpuChecks:
    """The per-GPU checks with their thresholds."""

    def __init__(self, cfg: GpuThresholds) -> None:
        self.cfg = cfg
        self.signals = gpu_signals.SignalChecks(cfg)
        self.rate_step = cfg.rate_window / 4

    def sample(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float) -> None:
        """Evaluate one sample of one GPU; ``gs`` holds the previous one."""
        if gs.quiet and self.quiet_sample(gs, g, ts):
            return
        had_prev = gs.last is not None  # rate checks exist only from the second sample on
        self._full(GpuVerdicts(em, gs, base, g, ts))
        hf = em.healthy_for
        gs.quiet = had_prev and all(cs.status == HEALTHY and cs.quiet >= hf for cs in gs.checks.values())

    def quiet_sample(self, gs: GpuState, g: GpuSample, ts: float) -> bool:
        """The fast path: ``True`` (and ``gs`` updated) when every check of this GPU was quiet
        and healthy and this sample keeps every check healthy, so nothing is emitted.

        It applies exactly the thresholds of the full checks below (a test holds the two
        paths to the same verdicts); any doubt returns ``False`` and the full path runs.
        """
        prev, last_ts = gs.last, gs.last_ts
        if prev is None or last_ts is None or g.lost or ts <= last_ts:
            return False
        cfg = self.cfg
        marks = gs.rate_marks  # (rate_base and keep_mark, inline: this runs per GPU per sample)
        if not marks:
            return False
        cut = ts - cfg.rate_window
        while len(marks) > 1 and marks[1][0] <= cut:
            del marks[0]
        m = marks[0]
        if not gs.rated and m[0] <= cut:
            return False  # the first whole window: the full checks say the rates healthy once
        span = ts - m[0]
        t = g.temp_c
        if t is not None:
            if t >= cfg.temp_warning_c:
                return False
            lim = g.temp_slowdown_c
            if lim is not None and t >= lim - cfg.temp_slowdown_margin_c:
                return False
            lim = g.temp_shutdown_c
            if lim is not None and t >= lim - cfg.temp_shutdown_margin_c:
                return False
        if g.ecc_dbe_volatile:
            return False
        # a counter equal to the rate base's has delta 0 (or None): no call for it
        new, old = g.ecc_sbe_volatile, m[1]
        if new != old:
            d = _delta(new, old)
            if d and d * 60.0 / span > cfg.ecc_sbe_rate_per_min:
                return False
        if g.retired_pages_pending or g.remap_failure or g.remap_pending:
            return False
        if (g.retired_pages_sbe or 0) + (g.retired_pages_dbe or 0) >= cfg.retired_pages_critical:
            return False
        unc = g.remapped_rows_uncorrectable
        if unc is not None and unc >= cfg.remapped_rows_unc_warning:
            return False
        reasons = g.clock_event_reasons
        if reasons is None:
            reasons = gs.event_reasons
        if reasons & cfg.clock_event_mask:
            return False
        new, old = g.throttle_thermal_ns, prev.throttle_thermal_ns
        if new != old and cfg.thermal_violation_warns and _delta(new, old):
            return False
        new, old = g.pcie_replay_count, m[2]
        if new != old:
            d = _delta(new, old)
            if d:
                expected = pcie_expected_per_min(g.pcie_link_gen, g.pcie_link_width, cfg.pcie_replay_factor)
                if expected is not None and d * 60.0 / span > expected:
                    return False
        total = g.nvlink_links_total
        if total:
            up = g.nvlink_links_up
            if (up is not None and up < total) or (
                _delta(g.nvlink_crc_errors, m[3])
                or _delta(g.nvlink_replay_errors, m[4])
                or _delta(g.nvlink_recovery_errors, m[5])
            ):
                return False
            if (
                (g.nvlink_crc_errors is None and any(_link_deltas(g.nvlink_crc_by_link, m[6]).values()))
                or (
                    g.nvlink_replay_errors is None
                    and any(_link_deltas(g.nvlink_replay_by_link, m[7]).values())
                )
                or (
                    g.nvlink_recovery_errors is None
                    and any(_link_deltas(g.nvlink_recovery_by_link, m[8]).values())
                )
            ):
                return False
        p, lim = g.power_w, g.power_limit_w
        if p is not None and lim and p > lim * (1.0 + cfg.power_over_limit_pct / 100.0):
            return False
        used, mem = g.mem_used_bytes, g.mem_total_bytes
        if used is not None and mem and used * 100.0 / mem >= cfg.memory_full_pct:
            return False
        if g.recovery_action:
            return False
        if g.persistence_mode is False and cfg.persistence_check:
            return False
        # the node signals (gpu_signals.SignalChecks), inline: this runs per GPU per sample
        if gs.memory_trend_at is not None:
            return False
        w, wmax = g.pcie_link_width, g.pcie_link_width_max
        if wmax and w is not None and w < wmax and cfg.pcie_link_check:
            return False
        gen, gmax = g.pcie_link_gen, g.pcie_link_gen_max
        if gmax and gen is not None and gen < gmax and cfg.pcie_link_check:
            util = g.util_gpu_pct
            if util is not None and util >= cfg.busy_util_pct:
                return False
        mt, lim = g.mem_temp_c, g.temp_mem_max_c
        if lim is not None and mt is not None and mt >= lim - cfg.hbm_temp_margin_c:
            return False
        new, old = g.ecc_dbe_aggregate, prev.ecc_dbe_aggregate
        if new is not None and old is not None and new > old:
            return False
        sbe, dbe = g.retired_pages_sbe, g.retired_pages_dbe
        if (
            (sbe or dbe)
            and (sbe != prev.retired_pages_sbe or dbe != prev.retired_pages_dbe)  # (grew only if so)
            and gpu_signals.retired_grew(g, prev)
        ):
            return False
        app, clk = g.clock_sm_app_mhz, g.clock_sm_mhz
        if (
            app
            and clk is not None
            and clk < app * cfg.sm_clock_low_pct / 100.0  # (low only if so)
            and gpu_signals.sm_clock_low(cfg, g)
        ):
            return False
        if g.fan_pct == 0 and t is not None and t >= cfg.fan_stall_temp_c:
            return False
        state = g.fabric_state
        if (
            state
            and cfg.fabric_check
            and (state != gpu_signals.FABRIC_COMPLETED or g.fabric_status or g.fabric_health_mask)
            and not gpu_signals.fabric_ok(g)  # (ok if completed, status 0 and no mask bit at all)
        ):
            return False
        if ts - marks[-1][0] >= self.rate_step:
            marks.append(rate_mark(g, ts))
        gs.last, gs.last_ts, gs.stale = g, ts, False
        return True

    def _full(self, v: GpuVerdicts) -> None:
        em, gs, g = v.em, v.gs, v.g
        c = gs.checks
        if g.lost:
            if em.superseded(c, "gpu.lost"):
                return  # read before the GPU came back (gpu_recovered): older news
            if not gs.lost:
                gs.lost = True
            summary = f"GPU {gs.index} fell off the bus: drain the node and reboot it"
            v.bad("gpu.lost", CRITICAL, 1.0, summary, immediate=True)
            return
        if (gs.lost or "gpu.lost" not in c or c["gpu.lost"].quiet < em.healthy_for) and not em.superseded(
            c, "gpu.lost"
        ):  # (read before a gpu_lost event: the GPU stays lost)
            gs.lost = False
            v.ok("gpu.lost", 0.0)
        m, full = rate_base(gs, v.at, self.cfg.rate_window) if v.prev is not None else (None, False)
        if full:
            gs.rated = True
        self._temperature(v)
        self._ecc(v, m, full)
        self._memory_health(v)
        self._clocks(v)
        self._pcie(v, m, full)
        self._nvlink(v, m, full)
        self._power_memory(v)
        self.signals.sample(v)
        if g.recovery_action is not None:
            self.recovery(em, gs, v.base, g.recovery_action, v.at)
        if g.persistence_mode is not None and self.cfg.persistence_check:
            if g.persistence_mode:
                v.ok("gpu.persistence", 1.0)
            else:
                summary = f"persistence mode is off on GPU {gs.index}: enable it (nvidia-smi -pm 1)"
                v.bad("gpu.persistence", INFO, 0.0, summary)
        if v.prev is None:  # the first sample, or a duplicate or out of order: rates start again
            gs.rate_marks.clear()
        keep_mark(gs, g, v.at, self.rate_step)
        gs.last, gs.last_ts, gs.stale = g, v.at, False

    def _temperature(self, v: GpuVerdicts) -> None:
        t = v.g.temp_c
        if t is None:
            return
        cfg = self.cfg
        slow, shut = v.g.temp_slowdown_c, v.g.temp_shutdown_c
        if (
            t >= cfg.temp_critical_c
            or (slow is not None and t >= slow)
            or (shut is not None and t >= shut - cfg.temp_shutdown_margin_c)
        ):
            status = CRITICAL
        elif t >= cfg.temp_warning_c or (slow is not None and t >= slow - cfg.temp_slowdown_margin_c):
            status = WARNING
        else:
            v.ok("gpu.temperature", t)
            return
        limits = f"warning {cfg.temp_warning_c:g} C, critical {cfg.temp_critical_c:g} C"
        if slow is not None:
            limits += f", NVML slowdown {slow:g} C"
        if shut is not None:
            limits += f", shutdown {shut:g} C"
        summary = f"GPU {v.gs.index} at {t:g} C ({limits}): check cooling, fans and airflow"
        v.bad("gpu.temperature", status, t, summary)

    def _ecc(self, v: GpuVerdicts, m: RateMark | None, full: bool) -> None:
        g = v.g
        dbe = g.ecc_dbe_volatile
        if dbe is not None:
            if dbe > 0:
                self.dbe(v.em, v.gs, v.base, v.at, float(dbe))
            else:
                v.ok("gpu.ecc_dbe", 0.0)
        if m is None:
            return
        d = _delta(g.ecc_sbe_volatile, m[1])
        if d is None:
            return
        rate = d * 60.0 / (v.at - m[0])
        limit = self.cfg.ecc_sbe_rate_per_min
        if rate > limit:
            summary = (
                f"GPU {v.gs.index}: {rate:.1f} single-bit ECC errors/min "
                f"(above {limit:g}): watch for retirements, plan a reset"
            )
            v.bad("gpu.ecc_sbe_rate", WARNING, rate, summary)
        elif full:
            v.ok("gpu.ecc_sbe_rate", rate)

    def dbe(self, em: Emitter, gs: GpuState, base: Mapping[str, str], ts: float, value: float) -> None:
        summary = f"GPU {gs.index}: uncorrectable (double-bit) ECC errors: drain and reset the GPU"
        Verdicts(em, gs.checks, base, ts).bad("gpu.ecc_dbe", CRITICAL, value, summary, immediate=True)

    def _memory_health(self, v: GpuVerdicts) -> None:
        cfg, g, index = self.cfg, v.g, v.gs.index
        sbe, dbe, pending = g.retired_pages_sbe, g.retired_pages_dbe, g.retired_pages_pending
        if sbe is not None or dbe is not None or pending is not None:
            total = (sbe or 0) + (dbe or 0)
            if total >= cfg.retired_pages_critical:
                summary = f"GPU {index}: {total} retired pages (limit {cfg.retired_pages_critical}): RMA it"
                v.bad("gpu.retired_pages", CRITICAL, float(total), summary)
            elif pending:
                summary = f"GPU {index}: page retirement pending: reset the GPU to retire the pages"
                v.bad(
                    "gpu.retired_pages", WARNING, float(total), summary, ADVICE["gpu.retired_pages/pending"]
                )
            else:
                v.ok("gpu.retired_pages", float(total))
        fail, rpend, unc = g.remap_failure, g.remap_pending, g.remapped_rows_uncorrectable
        if fail is None and rpend is None and unc is None:
            return
        if fail:
            self.remap_failure(v.em, v.gs, v.base, v.at)
        elif rpend:
            summary = f"GPU {index}: row remap pending: reset the GPU"
            v.bad("gpu.row_remap", WARNING, float(unc or 0), summary, ADVICE["gpu.row_remap/pending"])
        elif unc is not None and unc >= cfg.remapped_rows_unc_warning:
            summary = f"GPU {index}: {unc} uncorrectable remapped rows: plan an RMA"
            v.bad("gpu.row_remap", WARNING, float(unc), summary, ADVICE["gpu.row_remap/uncorrectable"])
        else:
            v.ok("gpu.row_remap", float(unc or 0))

    def remap_failure(self, em: Emitter, gs: GpuState, base: Mapping[str, str], ts: float) -> None:
        summary = f"GPU {gs.index}: row remapping failed: take the GPU out of service and RMA it"
        Verdicts(em, gs.checks, base, ts).bad("gpu.row_remap", CRITICAL, 1.0, summary, immediate=True)

    def _clocks(self, v: GpuVerdicts) -> None:
        cfg, gs, g, prev = self.cfg, v.gs, v.g, v.prev
        if v.em.superseded(gs.checks, "gpu.clock_events"):
            return  # read before a throttle event already judged: older news
        reasons = g.clock_event_reasons
        if reasons is None:
            if not gs.event_reasons:
                return
            reasons = gs.event_reasons
        active = reasons & cfg.clock_event_mask
        if active:
            self.clock_events(v.em, gs, v.base, active, v.at)
            return
        gs.throttle_since = None
        thermal = _delta(g.throttle_thermal_ns, prev.throttle_thermal_ns if prev is not None else None)
        # violation time accrued by a throttle already reported (its reasons active at the last
        # sample, or its events since) is that throttle's, not a new one to warn about
        until, last = gs.throttle_until, gs.last_ts
        reported = until is not None and last is not None and until >= last
        if cfg.thermal_violation_warns and thermal and not reported:
            summary = f"GPU {gs.index} was thermally throttled for {thermal / 1e9:.1f} s: check cooling"
            v.bad("gpu.clock_events", WARNING, thermal / 1e9, summary, ADVICE["gpu.clock_events/thermal"])
            return
        v.ok("gpu.clock_events", 0.0)

    def clock_events(
        self, em: Emitter, gs: GpuState, base: Mapping[str, str], active: int, ts: float
    ) -> None:
        if gs.throttle_since is None:
            gs.throttle_since = ts
        if gs.throttle_until is None or ts > gs.throttle_until:
            gs.throttle_until = ts
        held = ts - gs.throttle_since
        sustained = held >= self.cfg.clock_event_sustained
        status = CRITICAL if sustained else WARNING
        names = reason_names(active)
        what = f"for {held:.0f} s" if sustained else "now"
        summary = f"GPU {gs.index} throttled by {names} {what}: check power delivery and cooling"
        Verdicts(em, gs.checks, base, ts).bad("gpu.clock_events", status, float(active), summary)

    def _pcie(self, v: GpuVerdicts, m: RateMark | None, full: bool) -> None:
        g = v.g
        if m is None:
            return
        d = _delta(g.pcie_replay_count, m[2])
        if d is None:
            return
        expected = pcie_expected_per_min(g.pcie_link_gen, g.pcie_link_width, self.cfg.pcie_replay_factor)
        if expected is None:
            return
        rate = d * 60.0 / (v.at - m[0])
        if rate > expected:
            summary = (
                f"GPU {v.gs.index}: {rate:.1f} PCIe replays/min, above the {expected:g}/min expected "
                f"for Gen{g.pcie_link_gen} x{g.pcie_link_width}: reseat the GPU or check the riser"
            )
            v.bad("gpu.pcie_replay", WARNING, rate, summary)
        elif full:
            v.ok("gpu.pcie_replay", rate)

    def _nvlink(self, v: GpuVerdicts, m: RateMark | None, full: bool) -> None:
        g, prev = v.g, v.prev
        total, up = g.nvlink_links_total, g.nvlink_links_up
        if not total:
            return
        down = total - up if up is not None else 0
        crc = rep = rec = None
        per_link: dict[int, list[str]] = {}
        if m is not None:  # the counts over the rate window; the links named from the last sample
            crc = _delta(g.nvlink_crc_errors, m[3])
            rep = _delta(g.nvlink_replay_errors, m[4])
            rec = _delta(g.nvlink_recovery_errors, m[5])
            # a driver with per-link counters only: their sum
            crc = sum(_link_deltas(g.nvlink_crc_by_link, m[6]).values()) if crc is None and m[6] else crc
            rep = sum(_link_deltas(g.nvlink_replay_by_link, m[7]).values()) if rep is None and m[7] else rep
            rec = sum(_link_deltas(g.nvlink_recovery_by_link, m[8]).values()) if rec is None and m[8] else rec
        if prev is not None:
            crc_l = _link_deltas(g.nvlink_crc_by_link, prev.nvlink_crc_by_link)
            rep_l = _link_deltas(g.nvlink_replay_by_link, prev.nvlink_replay_by_link)
            rec_l = _link_deltas(g.nvlink_recovery_by_link, prev.nvlink_recovery_by_link)
            for name, deltas in (("CRC", crc_l), ("replay", rep_l), ("recovery", rec_l)):
                for link, d in deltas.items():
                    if d:
                        per_link.setdefault(link, []).append(f"{name} +{d}")
        where = "; ".join(f"link {k}: {', '.join(said)}" for k, said in sorted(per_link.items()))
        crc_rate = crc / (v.at - m[0]) if crc is not None and m is not None else 0.0
        index = v.gs.index
        if down > 0 or crc_rate >= self.cfg.nvlink_crc_critical_per_s:
            which = f" (link {', '.join(map(str, g.nvlink_down_links))})" if g.nvlink_down_links else ""
            what = f"{down} of {total} links down{which}" if down > 0 else f"{crc_rate:.0f} CRC errors/s"
            if down <= 0 and where:
                what += f" ({where})"
            summary = f"GPU {index}: NVLink {what}: drain the node, reset the GPUs, check the NVLink bridge"
            v.bad("gpu.nvlink", CRITICAL, float(down) if down else crc_rate, summary)
        elif crc or rep or rec:
            summary = (
                f"GPU {index}: NVLink errors increased (CRC {crc or 0}, replay {rep or 0}, "
                f"recovery {rec or 0}{'; ' + where if where else ''}): watch the trend"
            )
            value = float((crc or 0) + (rep or 0) + (rec or 0))
            v.bad("gpu.nvlink", WARNING, value, summary, ADVICE["gpu.nvlink/errors"])
        elif full or not _error_counters(g):  # (no error over the whole window, or none counted)
            v.ok("gpu.nvlink", 0.0)

    def _power_memory(self, v: GpuVerdicts) -> None:
        cfg, g, index = self.cfg, v.g, v.gs.index
        p, lim = g.power_w, g.power_limit_w
        if p is not None and lim:
            if p > lim * (1.0 + cfg.power_over_limit_pct / 100.0):
                summary = f"GPU {index} draws {p:.0f} W, over its {lim:.0f} W limit: check the power cap"
                v.bad("gpu.power", WARNING, p, summary)
            else:
                v.ok("gpu.power", p)
        used, total = g.mem_used_bytes, g.mem_total_bytes
        if used is not None and total:
            pct = used * 100.0 / total
            if pct >= cfg.memory_full_pct:
                summary = f"GPU {index} memory {pct:.0f}% full: expect out-of-memory errors in jobs"
                v.bad("gpu.memory_full", WARNING, pct, summary)
            else:
                v.ok("gpu.memory_full", pct)

    def recovery(self, em: Emitter, gs: GpuState, base: Mapping[str, str], code: int, ts: float) -> None:
        v = Verdicts(em, gs.checks, base, ts)
        name, status = RECOVERY_ACTIONS.get(code, (f"ACTION_{code}", WARNING))
        if status == HEALTHY:
            v.ok("gpu.recovery_action", 0.0)
            return
        summary = f"GPU {gs.index}: the driver requests {name}: drain the node and perform it"
        v.bad("gpu.recovery_action", status, float(code), summary, immediate=True)

    def xid(
        self,
        em: Emitter,
        gs: GpuState,
        base: Mapping[str, str],
        info: XidInfo,
        ts: float,
        message: str | None = None,
    ) -> None:
        rec = gs.xids[info.code]
        status = CRITICAL if info.fatal else WARNING
        action = XID_ACTION_ADVICE.get(info.action, info.action)
        detail = ""
        if info.code == 74 and (nvl := xid74.decode(message)) is not None:
            detail = f"; {nvl.describe()}"  # the link and the catalogue's NVLink workflow
            if nvl.benign:
                status = WARNING
        summary = f"GPU {gs.index} XID {info.code} ({info.mnemonic}): {info.summary}{detail}"
        advice = (
            f"XID {info.code} {info.mnemonic}, seen {rec.count} time(s); "
            f"{'fatal' if info.fatal else 'non-fatal'}; action: {action}{detail}."
        )
        extra = (("xid", str(info.code)),)
        Verdicts(em, gs.checks, base, ts).bad(
            "gpu.xid", status, float(rec.count), summary, advice, immediate=True, extra=extra
        )

    def expire(self, em: Emitter, gs: GpuState, base: Mapping[str, str], ts: float) -> None:
        """Clear XIDs older than the window and re-judge the RMA count."""
        cfg = self.cfg
        keep = max(cfg.xid_window, cfg.rma_window)
        gone = []
        for code, rec in gs.xids.items():
            local = f"gpu.xid:{code}"
            cs = gs.checks.get(local)
            age = ts - rec.last_at
            if age < cfg.xid_window:
                continue
            if age >= keep and (cs is None or (cs.status == HEALTHY and cs.quiet >= em.healthy_for)):
                gone.append(code)  # long over and said so: forgotten (docs/health.md, "Bounds")
                continue
            if cs is None:
                continue
            if cs.status != HEALTHY or cs.quiet < em.healthy_for:
                em.emit(
                    gs.checks,
                    "gpu.xid",
                    base,
                    HEALTHY,
                    ts,
                    value=float(rec.count),
                    extra=(("xid", str(code)),),
                )
        for code in gone:
            del gs.xids[code]
            gs.checks.pop(f"gpu.xid:{code}", None)
        if gs.fatal_xids or gs.rma_until:
            cutoff = ts - cfg.rma_window
            if gs.fatal_xids and gs.fatal_xids[0] < cutoff:
                gs.fatal_xids[:] = [t for t in gs.fatal_xids if t >= cutoff]
            self.rma(em, gs, base, ts)

    def rma(self, em: Emitter, gs: GpuState, base: Mapping[str, str], ts: float) -> None:
        """``gpu.rma``: ``rma_fatal_xids`` fatal XIDs on this GPU within ``rma_window``, or the
        board's fault history across boots (:mod:`collector.health.history`) asks for it."""
        v = Verdicts(em, gs.checks, base, ts)
        n = len(gs.fatal_xids)
        if gs.rma_until and ts >= gs.rma_until:
            gs.rma_until, gs.rma_summary, gs.rma_evidence = 0.0, "", ""
        if gs.rma_until:
            advice = f"{ADVICE['gpu.rma']}. Evidence: {gs.rma_evidence}."
            v.bad("gpu.rma", CRITICAL, float(max(n, 1)), gs.rma_summary, advice, immediate=True)
        elif n >= self.cfg.rma_fatal_xids:
            hours = self.cfg.rma_window / 3600
            summary = f"GPU {gs.index}: {n} fatal XIDs within {hours:g} h: hardware inspection / RMA"
            v.bad("gpu.rma", CRITICAL, float(n), summary, immediate=True)
        else:
            cs = gs.checks.get("gpu.rma")
            if cs is not None and (cs.status != HEALTHY or cs.quiet < em.healthy_for):
                v.ok("gpu.rma", float(n))
