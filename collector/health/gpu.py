"""Per-GPU checks: one GPU sample (and the previous one, for rates) to observations.

A value the GPU cannot report (``None``) is not evaluated: the check emits nothing and keeps
its last conclusion. Counter rates come from the deltas between consecutive samples; a
counter that went backwards was reset (GPU reset, driver reload), and its new value is the
delta since the reset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from collector.health import gpu_signals
from collector.health.config import GpuThresholds
from collector.health.model import CRITICAL, HEALTHY, INFO, WARNING, Emitter, GpuState
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
RMA_ADVICE: Final = (
    "repeated fatal XIDs on this GPU: take it out of service for hardware inspection / RMA "
    "(run field diagnostics, collect nvidia-bug-report.sh)"
)


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

    def sample(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float) -> None:
        """Evaluate one sample of one GPU; ``gs`` holds the previous one."""
        if gs.quiet and self.quiet_sample(gs, g, ts):
            return
        had_prev = gs.last is not None  # rate checks exist only from the second sample on
        self._full(em, gs, base, g, ts)
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
        cfg, dt = self.cfg, ts - last_ts
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
        d = _delta(g.ecc_sbe_volatile, prev.ecc_sbe_volatile)
        if d and d * 60.0 / dt > cfg.ecc_sbe_rate_per_min:
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
        if cfg.thermal_violation_warns and _delta(g.throttle_thermal_ns, prev.throttle_thermal_ns):
            return False
        d = _delta(g.pcie_replay_count, prev.pcie_replay_count)
        if d:
            expected = pcie_expected_per_min(g.pcie_link_gen, g.pcie_link_width, cfg.pcie_replay_factor)
            if expected is not None and d * 60.0 / dt > expected:
                return False
        total = g.nvlink_links_total
        if total:
            up = g.nvlink_links_up
            if (up is not None and up < total) or (
                _delta(g.nvlink_crc_errors, prev.nvlink_crc_errors)
                or _delta(g.nvlink_replay_errors, prev.nvlink_replay_errors)
                or _delta(g.nvlink_recovery_errors, prev.nvlink_recovery_errors)
            ):
                return False
            if (
                (
                    g.nvlink_crc_errors is None
                    and any(_link_deltas(g.nvlink_crc_by_link, prev.nvlink_crc_by_link).values())
                )
                or (
                    g.nvlink_replay_errors is None
                    and any(_link_deltas(g.nvlink_replay_by_link, prev.nvlink_replay_by_link).values())
                )
                or (
                    g.nvlink_recovery_errors is None
                    and any(_link_deltas(g.nvlink_recovery_by_link, prev.nvlink_recovery_by_link).values())
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
        if (g.retired_pages_sbe or g.retired_pages_dbe) and gpu_signals.retired_grew(g, prev):
            return False
        if g.clock_sm_app_mhz and gpu_signals.sm_clock_low(cfg, g):
            return False
        if g.fan_pct == 0 and t is not None and t >= cfg.fan_stall_temp_c:
            return False
        state = g.fabric_state
        if state and cfg.fabric_check and not gpu_signals.fabric_ok(g):
            return False
        gs.last, gs.last_ts, gs.stale = g, ts, False
        return True

    def _full(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float) -> None:
        c = gs.checks
        if g.lost:
            if em.superseded(c, "gpu.lost"):
                return  # read before the GPU came back (gpu_recovered): older news
            if not gs.lost:
                gs.lost = True
            em.emit(
                c,
                "gpu.lost",
                base,
                CRITICAL,
                ts,
                value=1.0,
                summary=f"GPU {gs.index} fell off the bus: drain the node and reboot it",
                advice="The GPU no longer answers (GPU_IS_LOST, XID 79). Its last values are stale. "
                "Drain the node and reboot; if it recurs, RMA the GPU.",
                immediate=True,
            )
            return
        if (gs.lost or "gpu.lost" not in c or c["gpu.lost"].quiet < em.healthy_for) and not em.superseded(
            c, "gpu.lost"
        ):  # (read before a gpu_lost event: the GPU stays lost)
            gs.lost = False
            em.emit(c, "gpu.lost", base, HEALTHY, ts, value=0.0)
        prev, dt = gs.last, (ts - gs.last_ts) if gs.last_ts is not None else 0.0
        if prev is not None and dt <= 0:
            prev = None  # duplicate or out of order: no rates from it
        self._temperature(em, gs, base, g, ts)
        self._ecc(em, gs, base, g, prev, dt, ts)
        self._memory_health(em, gs, base, g, ts)
        self._clocks(em, gs, base, g, prev, ts)
        self._pcie(em, gs, base, g, prev, dt, ts)
        self._nvlink(em, gs, base, g, prev, dt, ts)
        self._power_memory(em, gs, base, g, ts)
        self.signals.sample(em, gs, base, g, prev, ts)
        if g.recovery_action is not None:
            self.recovery(em, gs, base, g.recovery_action, ts)
        if g.persistence_mode is not None and self.cfg.persistence_check:
            if g.persistence_mode:
                em.emit(c, "gpu.persistence", base, HEALTHY, ts, value=1.0)
            else:
                em.emit(
                    c,
                    "gpu.persistence",
                    base,
                    INFO,
                    ts,
                    value=0.0,
                    summary=f"persistence mode is off on GPU {gs.index}: enable it (nvidia-smi -pm 1)",
                    advice="Without persistence mode the driver tears down and re-initialises the GPU "
                    "between clients, which adds latency and hides state; enable it or run "
                    "nvidia-persistenced.",
                )
        gs.last, gs.last_ts, gs.stale = g, ts, False

    def _temperature(
        self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float
    ) -> None:
        t = g.temp_c
        if t is None:
            return
        cfg = self.cfg
        slow, shut = g.temp_slowdown_c, g.temp_shutdown_c
        if (
            t >= cfg.temp_critical_c
            or (slow is not None and t >= slow)
            or (shut is not None and t >= shut - cfg.temp_shutdown_margin_c)
        ):
            status = CRITICAL
        elif t >= cfg.temp_warning_c or (slow is not None and t >= slow - cfg.temp_slowdown_margin_c):
            status = WARNING
        else:
            em.emit(gs.checks, "gpu.temperature", base, HEALTHY, ts, value=t)
            return
        limits = f"warning {cfg.temp_warning_c:g} C, critical {cfg.temp_critical_c:g} C"
        if slow is not None:
            limits += f", NVML slowdown {slow:g} C"
        if shut is not None:
            limits += f", shutdown {shut:g} C"
        em.emit(
            gs.checks,
            "gpu.temperature",
            base,
            status,
            ts,
            value=t,
            summary=f"GPU {gs.index} at {t:g} C ({limits}): check cooling, fans and airflow",
            advice="The GPU is near or past its thermal limits: it will slow down, then shut down. "
            "Check the fans, inlet temperature and airflow; drain the node if it persists.",
        )

    def _ecc(
        self,
        em: Emitter,
        gs: GpuState,
        base: Mapping[str, str],
        g: GpuSample,
        prev: GpuSample | None,
        dt: float,
        ts: float,
    ) -> None:
        c = gs.checks
        dbe = g.ecc_dbe_volatile
        if dbe is not None:
            if dbe > 0:
                self.dbe(em, gs, base, ts, float(dbe))
            else:
                em.emit(c, "gpu.ecc_dbe", base, HEALTHY, ts, value=0.0)
        if prev is None:
            return
        d = _delta(g.ecc_sbe_volatile, prev.ecc_sbe_volatile)
        if d is None:
            return
        rate = d * 60.0 / dt
        if rate > self.cfg.ecc_sbe_rate_per_min:
            em.emit(
                c,
                "gpu.ecc_sbe_rate",
                base,
                WARNING,
                ts,
                value=rate,
                summary=f"GPU {gs.index}: {rate:.1f} single-bit ECC errors/min "
                f"(above {self.cfg.ecc_sbe_rate_per_min:g}): watch for retirements, plan a reset",
                advice="Corrected errors are absorbed, but a high rate often precedes page retirement, "
                "row remapping or double-bit errors. Track the trend; schedule a GPU reset.",
            )
        else:
            em.emit(c, "gpu.ecc_sbe_rate", base, HEALTHY, ts, value=rate)

    def dbe(self, em: Emitter, gs: GpuState, base: Mapping[str, str], ts: float, value: float) -> None:
        em.emit(
            gs.checks,
            "gpu.ecc_dbe",
            base,
            CRITICAL,
            ts,
            value=value,
            summary=f"GPU {gs.index}: uncorrectable (double-bit) ECC errors: drain and reset the GPU",
            advice="Volatile double-bit ECC errors > 0 (DCGM fails this). Data on the GPU may be "
            "corrupt: stop its jobs, reset the GPU; RMA if it recurs.",
            immediate=True,
        )

    def _memory_health(
        self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float
    ) -> None:
        cfg, c = self.cfg, gs.checks
        sbe, dbe, pending = g.retired_pages_sbe, g.retired_pages_dbe, g.retired_pages_pending
        if sbe is not None or dbe is not None or pending is not None:
            total = (sbe or 0) + (dbe or 0)
            if total >= cfg.retired_pages_critical:
                em.emit(
                    c,
                    "gpu.retired_pages",
                    base,
                    CRITICAL,
                    ts,
                    value=float(total),
                    summary=f"GPU {gs.index}: {total} retired pages (limit {cfg.retired_pages_critical}): "
                    "RMA it",
                    advice="The retired-page table is full or nearly so (DCGM fails at 63): the GPU can no "
                    "longer retire bad memory. Take it out of service and RMA it.",
                )
            elif pending:
                em.emit(
                    c,
                    "gpu.retired_pages",
                    base,
                    WARNING,
                    ts,
                    value=float(total),
                    summary=f"GPU {gs.index}: page retirement pending: reset the GPU to retire the pages",
                    advice="Pages are marked for retirement; they are retired at the next GPU reset or "
                    "reboot. Drain the GPU and reset it.",
                )
            else:
                em.emit(c, "gpu.retired_pages", base, HEALTHY, ts, value=float(total))
        fail, rpend, unc = g.remap_failure, g.remap_pending, g.remapped_rows_uncorrectable
        if fail is None and rpend is None and unc is None:
            return
        if fail:
            self.remap_failure(em, gs, base, ts)
        elif rpend:
            em.emit(
                c,
                "gpu.row_remap",
                base,
                WARNING,
                ts,
                value=float(unc or 0),
                summary=f"GPU {gs.index}: row remap pending: reset the GPU",
                advice="A memory row is waiting to be remapped; the remap takes effect at the next GPU "
                "reset. Drain the GPU and reset it.",
            )
        elif unc is not None and unc >= cfg.remapped_rows_unc_warning:
            em.emit(
                c,
                "gpu.row_remap",
                base,
                WARNING,
                ts,
                value=float(unc),
                summary=f"GPU {gs.index}: {unc} uncorrectable remapped rows: plan an RMA",
                advice="Many rows have been remapped for uncorrectable errors (DCGM warns at 512). "
                "Spare rows are running out; plan a replacement.",
            )
        else:
            em.emit(c, "gpu.row_remap", base, HEALTHY, ts, value=float(unc or 0))

    def remap_failure(self, em: Emitter, gs: GpuState, base: Mapping[str, str], ts: float) -> None:
        em.emit(
            gs.checks,
            "gpu.row_remap",
            base,
            CRITICAL,
            ts,
            value=1.0,
            summary=f"GPU {gs.index}: row remapping failed: take the GPU out of service and RMA it",
            advice="The GPU could not remap a failing memory row (DCGM fails this). Its memory can no "
            "longer be repaired in the field.",
            immediate=True,
        )

    def _clocks(
        self,
        em: Emitter,
        gs: GpuState,
        base: Mapping[str, str],
        g: GpuSample,
        prev: GpuSample | None,
        ts: float,
    ) -> None:
        cfg = self.cfg
        if em.superseded(gs.checks, "gpu.clock_events"):
            return  # read before a throttle event already judged: older news
        reasons = g.clock_event_reasons
        if reasons is None:
            if not gs.event_reasons:
                return
            reasons = gs.event_reasons
        active = reasons & cfg.clock_event_mask
        if active:
            self.clock_events(em, gs, base, active, ts)
            return
        gs.throttle_since = None
        thermal = _delta(g.throttle_thermal_ns, prev.throttle_thermal_ns if prev is not None else None)
        # violation time accrued by a throttle already reported (its reasons active at the last
        # sample, or its events since) is that throttle's, not a new one to warn about
        until, last = gs.throttle_until, gs.last_ts
        reported = until is not None and last is not None and until >= last
        if cfg.thermal_violation_warns and thermal and not reported:
            em.emit(
                gs.checks,
                "gpu.clock_events",
                base,
                WARNING,
                ts,
                value=thermal / 1e9,
                summary=f"GPU {gs.index} was thermally throttled for {thermal / 1e9:.1f} s: check cooling",
                advice="The thermal violation time grew since the last sample (DCGM warns on any "
                "thermal violation in the last minute). Check fans and airflow.",
            )
            return
        em.emit(gs.checks, "gpu.clock_events", base, HEALTHY, ts, value=0.0)

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
        em.emit(
            gs.checks,
            "gpu.clock_events",
            base,
            status,
            ts,
            value=float(active),
            summary=f"GPU {gs.index} throttled by {names} {what}: check power delivery and cooling",
            advice="Hardware slowdown, HW thermal slowdown or the power brake cut the clocks. "
            "Check the PSUs, power cabling and cooling; if it is sustained, drain the node.",
        )

    def _pcie(
        self,
        em: Emitter,
        gs: GpuState,
        base: Mapping[str, str],
        g: GpuSample,
        prev: GpuSample | None,
        dt: float,
        ts: float,
    ) -> None:
        if prev is None:
            return
        d = _delta(g.pcie_replay_count, prev.pcie_replay_count)
        if d is None:
            return
        expected = pcie_expected_per_min(g.pcie_link_gen, g.pcie_link_width, self.cfg.pcie_replay_factor)
        if expected is None:
            return
        rate = d * 60.0 / dt
        if rate > expected:
            em.emit(
                gs.checks,
                "gpu.pcie_replay",
                base,
                WARNING,
                ts,
                value=rate,
                summary=f"GPU {gs.index}: {rate:.1f} PCIe replays/min, above the {expected:g}/min expected "
                f"for Gen{g.pcie_link_gen} x{g.pcie_link_width}: reseat the GPU or check the riser",
                advice="The PCIe link retransmits more than its bit-error rate allows (DCGM warns above "
                "ceil(1e-12 x lane rate x 60 s x lanes)). Reseat the card, check risers and "
                "cables, update the firmware.",
            )
        else:
            em.emit(gs.checks, "gpu.pcie_replay", base, HEALTHY, ts, value=rate)

    def _nvlink(
        self,
        em: Emitter,
        gs: GpuState,
        base: Mapping[str, str],
        g: GpuSample,
        prev: GpuSample | None,
        dt: float,
        ts: float,
    ) -> None:
        total, up = g.nvlink_links_total, g.nvlink_links_up
        if not total:
            return
        down = total - up if up is not None else 0
        crc = rep = rec = None
        per_link: dict[int, list[str]] = {}
        if prev is not None:
            crc = _delta(g.nvlink_crc_errors, prev.nvlink_crc_errors)
            rep = _delta(g.nvlink_replay_errors, prev.nvlink_replay_errors)
            rec = _delta(g.nvlink_recovery_errors, prev.nvlink_recovery_errors)
            crc_l = _link_deltas(g.nvlink_crc_by_link, prev.nvlink_crc_by_link)
            rep_l = _link_deltas(g.nvlink_replay_by_link, prev.nvlink_replay_by_link)
            rec_l = _link_deltas(g.nvlink_recovery_by_link, prev.nvlink_recovery_by_link)
            crc = (
                sum(crc_l.values()) if crc is None and crc_l else crc
            )  # a driver with per-link counters only
            rep = sum(rep_l.values()) if rep is None and rep_l else rep
            rec = sum(rec_l.values()) if rec is None and rec_l else rec
            for name, deltas in (("CRC", crc_l), ("replay", rep_l), ("recovery", rec_l)):
                for link, d in deltas.items():
                    if d:
                        per_link.setdefault(link, []).append(f"{name} +{d}")
        where = "; ".join(f"link {k}: {', '.join(v)}" for k, v in sorted(per_link.items()))
        crc_rate = crc / dt if crc is not None else 0.0
        c = gs.checks
        if down > 0 or crc_rate >= self.cfg.nvlink_crc_critical_per_s:
            which = f" (link {', '.join(map(str, g.nvlink_down_links))})" if g.nvlink_down_links else ""
            what = f"{down} of {total} links down{which}" if down > 0 else f"{crc_rate:.0f} CRC errors/s"
            if down <= 0 and where:
                what += f" ({where})"
            em.emit(
                c,
                "gpu.nvlink",
                base,
                CRITICAL,
                ts,
                value=float(down) if down else crc_rate,
                summary=f"GPU {gs.index}: NVLink {what}: drain the node, reset the GPUs, check the NVLink "
                "bridge",
                advice="A link down or CRC errors at 100/s or more (DCGM fails both) break or slow "
                "multi-GPU jobs. Drain, reset the GPUs; if it recurs, service the baseboard.",
            )
        elif crc or rep or rec:
            em.emit(
                c,
                "gpu.nvlink",
                base,
                WARNING,
                ts,
                value=float((crc or 0) + (rep or 0) + (rec or 0)),
                summary=f"GPU {gs.index}: NVLink errors increased (CRC {crc or 0}, replay {rep or 0}, "
                f"recovery {rec or 0}{'; ' + where if where else ''}): watch the trend",
                advice="NVLink error counters grew (DCGM warns on any increase). Occasional errors are "
                "retried; a growing rate points at a failing link (the per-link counters name it).",
            )
        else:
            em.emit(c, "gpu.nvlink", base, HEALTHY, ts, value=0.0)

    def _power_memory(
        self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, ts: float
    ) -> None:
        cfg, c = self.cfg, gs.checks
        p, lim = g.power_w, g.power_limit_w
        if p is not None and lim:
            if p > lim * (1.0 + cfg.power_over_limit_pct / 100.0):
                em.emit(
                    c,
                    "gpu.power",
                    base,
                    WARNING,
                    ts,
                    value=p,
                    summary=f"GPU {gs.index} draws {p:.0f} W, over its {lim:.0f} W limit: check the power "
                    "cap",
                    advice="Power above the enforced limit means the limit is not holding (firmware or "
                    "sensor fault) or the limit changed. Check nvidia-smi -q -d POWER.",
                )
            else:
                em.emit(c, "gpu.power", base, HEALTHY, ts, value=p)
        used, total = g.mem_used_bytes, g.mem_total_bytes
        if used is not None and total:
            pct = used * 100.0 / total
            if pct >= cfg.memory_full_pct:
                em.emit(
                    c,
                    "gpu.memory_full",
                    base,
                    WARNING,
                    ts,
                    value=pct,
                    summary=f"GPU {gs.index} memory {pct:.0f}% full: expect out-of-memory errors in jobs",
                    advice="GPU memory is nearly exhausted; new allocations will fail. Look at the "
                    "processes on the GPU; a leaked or orphaned process may hold the memory.",
                )
            else:
                em.emit(c, "gpu.memory_full", base, HEALTHY, ts, value=pct)

    def recovery(self, em: Emitter, gs: GpuState, base: Mapping[str, str], code: int, ts: float) -> None:
        name, status = RECOVERY_ACTIONS.get(code, (f"ACTION_{code}", WARNING))
        if status == HEALTHY:
            em.emit(gs.checks, "gpu.recovery_action", base, HEALTHY, ts, value=0.0)
            return
        em.emit(
            gs.checks,
            "gpu.recovery_action",
            base,
            status,
            ts,
            value=float(code),
            summary=f"GPU {gs.index}: the driver requests {name}: drain the node and perform it",
            advice="The NVIDIA driver reported the recovery action it needs (NVML recovery action, "
            "XID 154). Until it is done the GPU may misbehave.",
            immediate=True,
        )

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
        em.emit(
            gs.checks,
            "gpu.xid",
            base,
            status,
            ts,
            value=float(rec.count),
            summary=f"GPU {gs.index} XID {info.code} ({info.mnemonic}): {info.summary}{detail}",
            advice=f"XID {info.code} {info.mnemonic}, seen {rec.count} time(s); "
            f"{'fatal' if info.fatal else 'non-fatal'}; action: {action}{detail}.",
            immediate=True,
            extra=(("xid", str(info.code)),),
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
        n = len(gs.fatal_xids)
        if gs.rma_until and ts >= gs.rma_until:
            gs.rma_until, gs.rma_summary, gs.rma_evidence = 0.0, "", ""
        if gs.rma_until:
            em.emit(
                gs.checks,
                "gpu.rma",
                base,
                CRITICAL,
                ts,
                value=float(max(n, 1)),
                summary=gs.rma_summary,
                advice=f"{RMA_ADVICE}. Evidence: {gs.rma_evidence}.",
                immediate=True,
            )
        elif n >= self.cfg.rma_fatal_xids:
            hours = self.cfg.rma_window / 3600
            em.emit(
                gs.checks,
                "gpu.rma",
                base,
                CRITICAL,
                ts,
                value=float(n),
                summary=f"GPU {gs.index}: {n} fatal XIDs within {hours:g} h: hardware inspection / RMA",
                advice=RMA_ADVICE,
                immediate=True,
            )
        else:
            cs = gs.checks.get("gpu.rma")
            if cs is not None and (cs.status != HEALTHY or cs.quiet < em.healthy_for):
                em.emit(gs.checks, "gpu.rma", base, HEALTHY, ts, value=float(n))
