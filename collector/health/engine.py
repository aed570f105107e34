"""The health engine: decoded frames and the current time in, observations out.

Pure: no clock, no logging, no I/O. The caller owns the :class:`HealthState` and passes it
to every call; the engine updates it in place and returns it with the observations::

    engine = HealthEngine(health_config_from(raw))
    state = HealthState()
    state, observations = engine.observe(state, frame, now)      # on every frame
    state, observations = engine.tick(state, now, expected)      # on a timer (staleness)

Sample frames are judged against the previous sample of the same GPU (rates); event frames
(XID, GPU lost, ECC double-bit, throttle, recovery action) are judged when they arrive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from collector.health import drivers
from collector.health.config import HealthConfig
from collector.health.gpu import GpuChecks
from collector.health.history import BoardHistory, RmaDecision, decide
from collector.health.host import HostChecks
from collector.health.model import (
    CRITICAL,
    HEALTHY,
    INFO,
    R_EVICTED,
    R_REPLACED,
    UNKNOWN,
    WARNING,
    CheckStatus,
    Emitter,
    GpuState,
    HealthState,
    HostState,
    Observation,
    XidRecord,
)
from shared import xid74
from shared.frames import EventFrame, Frame, GpuSample, InventoryFrame, SampleFrame
from shared.xid import XidInfo, catalog, lookup


@dataclass(frozen=True, slots=True)
class ExpectedHost:
    """A host the inventory source (GPU discovery service) says should exist."""

    provider: str
    gpus: int | None = None  # how many GPUs it should report


class HealthEngine:
    """Evaluates frames against the configured thresholds."""

    def __init__(self, config: HealthConfig | None = None, xids: Mapping[int, XidInfo] | None = None) -> None:
        self.config = config or HealthConfig()
        self.xids = dict(xids) if xids is not None else catalog()
        self.gpu = GpuChecks(self.config.gpu)
        self.host = HostChecks(self.config.host, self.config.network, self.config.node)
        self.healthy_for = self.config.health.emit_healthy_for
        self.max_skew = self.config.health.max_clock_skew

    def observe(self, state: HealthState, frame: Frame, now: float) -> tuple[HealthState, list[Observation]]:
        """Dispatch one decoded frame to the sample, event or inventory path."""
        if isinstance(frame, SampleFrame):
            state, obs = self.observe_sample(state, frame, now)
        elif isinstance(frame, EventFrame):
            state, obs = self.observe_event(state, frame, now)
        else:
            state, obs = self.observe_inventory(state, frame, now)
        hs = state.hosts.get(frame.host)
        if hs is not None and (frame.ts - now > self.max_skew or "host.clock_skew" in hs.checks):
            em = Emitter(self.healthy_for)
            self.clock_skew(em, hs, frame.ts, now)
            obs = obs + em.out if obs else em.out
        return state, obs

    def clock_skew(self, em: Emitter, hs: HostState, ts: float, now: float) -> None:
        """``host.clock_skew``: the host's frames are dated ahead of the collector's clock by more
        than ``max_clock_skew`` (they are stored, but do not replace its current readings)."""
        ahead = ts - now
        if ahead > self.max_skew:
            em.emit(
                hs.checks,
                "host.clock_skew",
                hs.labels,
                WARNING,
                now,
                value=round(ahead, 3),
                summary=f"{hs.host}'s clock is {ahead:.0f} s ahead: its readings are not shown as current",
                advice="The host's frames are dated ahead of the collector's clock by more than "
                "[health] max_clock_skew: they are stored, but the live view keeps its last "
                "readings dated within the allowance. Fix the host's time sync (chronyc "
                "tracking, timedatectl) and the collector's.",
            )
        else:
            em.emit(hs.checks, "host.clock_skew", hs.labels, HEALTHY, now, value=round(ahead, 3))

    # ------------------------------------------------------------------ hosts and GPUs

    def _host(self, state: HealthState, host: str, provider: str, em: Emitter, now: float) -> HostState:
        hs = state.hosts.get(host)
        if hs is None or hs.provider != provider:
            old = hs
            if old is not None:  # moved to another provider: both providers' driver counts change
                state.drivers.pop(old.provider, None)
                state.drivers.pop(provider, None)
            hs = HostState(host, provider, {"provider": provider, "host": host})
            if old is not None:
                hs.expected_gpus, hs.first_expected_at = old.expected_gpus, old.first_expected_at
            state.hosts[host] = hs
        hs.last_frame_at = now
        if hs.stale:
            hs.stale = False
            em.emit(hs.checks, "host.unreachable", hs.labels, HEALTHY, now, value=0.0)
            for gs in hs.gpus.values():
                if "gpu.stale" in gs.checks:
                    em.emit(gs.checks, "gpu.stale", gs.labels, HEALTHY, now, value=0.0)
                    gs.checks["gpu.stale"].quiet = self.healthy_for  # said once: fresh data again
        return hs

    @staticmethod
    def _seen(state: HealthState, frame: SampleFrame | EventFrame, sample: bool) -> bool:
        """A frame judged already (JetStream redelivers unacknowledged frames) or a sample
        older than one judged: ignored, so XIDs are not counted twice and rates stay sane."""
        hs = state.hosts.get(frame.host)
        if hs is None:
            return False
        if hs.boot_id == frame.boot_id:
            if sample:
                return frame.seq <= hs.last_sample_seq
            return frame.seq in hs.recent_events
        # an earlier agent run: its frames may still come (the ingest drains a backlog while
        # the fast event path already saw the new run), judged once all the same
        if sample:
            return frame.seq <= hs.boot_sample_seq.get(frame.boot_id, -1)
        return frame.seq in hs.boot_events.get(frame.boot_id, ())

    @staticmethod
    def _boot(hs: HostState, boot_id: str) -> None:
        if boot_id == hs.boot_id:
            return
        if hs.boot_id is not None:  # keep what this run judged, for its late frames
            hs.boot_events[hs.boot_id] = hs.recent_events
            hs.boot_sample_seq[hs.boot_id] = hs.last_sample_seq
            for remembered in (hs.boot_events, hs.boot_sample_seq):
                while len(remembered) > _BOOTS:
                    del remembered[next(iter(remembered))]  # the oldest
        hs.boot_id = boot_id  # another agent run: its seqs start again
        hs.recent_events = hs.boot_events.pop(boot_id, [])
        hs.last_sample_seq = hs.boot_sample_seq.pop(boot_id, -1)

    def _gpu(self, em: Emitter, hs: HostState, index: int, uuid: str | None, now: float) -> GpuState:
        gs = hs.gpus.get(index)
        if gs is None or (uuid and gs.uuid and gs.uuid != uuid):  # new, or another GPU in that slot
            if gs is not None:  # a board swapped (RMA): the old GPU's conditions end with it
                retire(em, gs.checks, now, R_REPLACED)
            elif len(hs.gpus) >= MAX_GPUS_PER_HOST:  # the least recently sampled GPU makes room
                old = min(hs.gpus.values(), key=lambda g: g.last_ts if g.last_ts is not None else -1.0)
                retire(em, hs.gpus.pop(old.index).checks, now, R_EVICTED)
            u = uuid or ""
            labels = {"provider": hs.provider, "host": hs.host, "gpu": str(index), "uuid": u}
            gs = GpuState(index, u, labels)
            hs.gpus[index] = gs
        elif uuid and not gs.uuid:
            gs.uuid = uuid
        return gs

    def _find_gpu(self, em: Emitter, hs: HostState, frame: EventFrame, now: float) -> GpuState | None:
        if frame.gpu_index is not None:
            return self._gpu(em, hs, frame.gpu_index, frame.gpu_uuid, now)
        if frame.gpu_uuid:
            for gs in hs.gpus.values():
                if gs.uuid == frame.gpu_uuid:
                    return gs
        return None

    # ------------------------------------------------------------------ frames

    def observe_sample(
        self, state: HealthState, frame: SampleFrame, now: float
    ) -> tuple[HealthState, list[Observation]]:
        """Judge every GPU, the system metrics and the network checks of one sample."""
        em = Emitter(self.healthy_for)
        if self._seen(state, frame, sample=True):
            return state, em.out
        hs = self._host(state, frame.host, frame.provider, em, now)
        self._boot(hs, frame.boot_id)
        hs.last_sample_seq = frame.seq
        if frame.interval_s:
            hs.interval_s = frame.interval_s
        ts = frame.ts or now
        gpu_checks, gpus, quiet = self.gpu, hs.gpus, self.gpu.quiet_sample
        order = (frame.boot_id, frame.seq)  # its readings are older than this run's later events
        for g in frame.gpus:
            gs = gpus.get(g.index)  # (the GPU known in that slot: _gpu does nothing more)
            if gs is None or (g.uuid and gs.uuid != g.uuid):
                gs = self._gpu(em, hs, g.index, g.uuid, now)
            if gs.xids or gs.fatal_xids or gs.rma_until:
                em.sample = None
                n = len(em.out)
                gpu_checks.expire(em, gs, gs.labels, now)
                if len(em.out) != n:
                    gs.quiet = False
            elif gs.quiet and quiet(gs, g, ts):  # what GpuChecks.sample does first, without the call
                continue
            em.sample = order
            gpu_checks.sample(em, gs, gs.labels, g, ts)
        em.sample = None
        if frame.gpus and len(hs.gpus) > len(frame.gpus):
            present = {g.index for g in frame.gpus}
            for index, gs in hs.gpus.items():
                if index not in present:
                    gs.stale, gs.quiet = True, False
        self._missing(em, hs, len(frame.gpus), now)
        if frame.system is not None:
            self.host.system(em, hs, hs.labels, frame.system, ts)
        for c in frame.checks:
            self.host.network(em, hs, hs.labels, c, ts)
        if len(hs.checks) > MAX_HOST_CHECKS:  # mounts, NICs, targets: the least recently judged go
            drop = sorted(hs.checks.items(), key=lambda kv: kv[1].at)[: len(hs.checks) - MAX_HOST_CHECKS]
            for local, _ in drop:
                retire(em, {local: hs.checks.pop(local)}, now, R_EVICTED)
        return state, em.out

    def _missing(self, em: Emitter, hs: HostState, count: int, now: float) -> None:
        expected = max(hs.expected_gpus or 0, hs.inventory_gpus or 0)
        if not expected or hs.nvml_error is not None:  # no NVML: unknown, not missing (host.gpu_driver)
            return
        if count < expected:
            em.emit(
                hs.checks,
                "host.gpu_missing",
                hs.labels,
                CRITICAL,
                now,
                value=float(expected - count),
                summary=f"{hs.host} reports {count} of {expected} GPUs: find the missing GPU (lspci, "
                "nvidia-smi)",
                advice="Fewer GPUs than the inventory expects: a GPU fell off the bus, was not "
                "initialised by the driver, or the host was rebuilt. Check lspci and dmesg; "
                "reboot or reseat; RMA if it stays missing.",
            )
        else:
            em.emit(hs.checks, "host.gpu_missing", hs.labels, HEALTHY, now, value=0.0)

    def observe_event(
        self, state: HealthState, frame: EventFrame, now: float
    ) -> tuple[HealthState, list[Observation]]:
        """Judge one event at once (XIDs, GPU lost, ECC double-bit, throttle, recovery action)."""
        em = Emitter(self.healthy_for)
        if self._seen(state, frame, sample=False):
            return state, em.out
        hs = self._host(state, frame.host, frame.provider, em, now)
        self._boot(hs, frame.boot_id)
        em.event = (frame.boot_id, frame.seq)  # samples taken before it do not undo what it concludes
        hs.recent_events.append(frame.seq)
        if len(hs.recent_events) > _RECENT_EVENTS:
            del hs.recent_events[: len(hs.recent_events) - _RECENT_EVENTS]
        gs = self._find_gpu(em, hs, frame, now)
        if gs is None:
            return state, em.out
        gs.quiet = False
        t, base, checks = frame.type, gs.labels, self.gpu
        if t == "xid" and frame.xid is not None:
            info = lookup(frame.xid, self.xids)
            rec = gs.xids.get(info.code)
            if rec is None:
                if len(gs.xids) >= MAX_XID_CODES:  # the code seen least recently makes room
                    old = min(gs.xids.values(), key=lambda r: r.last_at)
                    del gs.xids[old.code]
                    cs = gs.checks.pop(f"gpu.xid:{old.code}", None)
                    if cs is not None:
                        retire(em, {cs.key: cs}, now, R_EVICTED)
                rec = gs.xids[info.code] = XidRecord(info.code, 0, now, now)
            rec.count += 1
            rec.last_at = now
            checks.xid(em, gs, base, info, now, frame.message)
            nvl = xid74.decode(frame.message) if info.code == 74 else None
            if info.fatal and not (nvl is not None and nvl.benign):
                gs.fatal_xids.append(now)
                cap = max(MAX_FATAL_XIDS, self.config.gpu.rma_fatal_xids)
                if len(gs.fatal_xids) > cap:
                    del gs.fatal_xids[: len(gs.fatal_xids) - cap]
                self._history(state, hs, gs, info.code, frame, now)
                checks.expire(em, gs, base, now)
        elif t == "gpu_lost":
            gs.lost = True
            checks.sample(em, gs, base, _LOST, frame.ts or now)
        elif t == "gpu_recovered":
            gs.lost = False
            em.emit(gs.checks, "gpu.lost", base, HEALTHY, now, value=0.0)
        elif t == "ecc_dbe":
            checks.dbe(em, gs, base, now, float(frame.count or frame.value or 1))
        elif t == "throttle_start" or t == "throttle_stop":
            gs.event_reasons = frame.value or 0
            active = gs.event_reasons & self.config.gpu.clock_event_mask
            if active:
                checks.clock_events(em, gs, base, active, frame.ts or now)
            elif t == "throttle_stop":
                gs.throttle_since = None
                gs.throttle_until = frame.ts or now  # the violation time it accrued was reported
                em.emit(gs.checks, "gpu.clock_events", base, HEALTHY, now, value=0.0)
        elif t == "recovery_action" and frame.value is not None:
            checks.recovery(em, gs, base, frame.value, now)
        elif t == "page_retirement" and frame.value == 1:
            checks.remap_failure(em, gs, base, now)
        return state, em.out

    def observe_inventory(
        self, state: HealthState, frame: InventoryFrame, now: float
    ) -> tuple[HealthState, list[Observation]]:
        """Record what the host says it has (its GPU count feeds ``host.gpu_missing``)."""
        em = Emitter(self.healthy_for)
        hs = self._host(state, frame.host, frame.provider, em, now)
        hs.nvml_error = frame.nvml_error
        facts = frame.host_facts
        resolved = state.history.inventory(
            hs.host,
            hs.provider,
            frame.boot_id,
            facts.kernel_boot_id if facts is not None else None,
            ((g.index, g.uuid, g.serial) for g in frame.gpus),
            frame.ts or now,
        )
        for board in resolved:  # fatal XIDs judged before this inventory named their boot
            gs = hs.gpus.get(board.gpu)
            if gs is not None and (not board.uuid or not gs.uuid or gs.uuid == board.uuid):
                self._hold_rma(gs, board, decide(board, now, self.config.gpu), now)
                self.gpu.expire(em, gs, gs.labels, now)
        if frame.nvml_error is not None:
            self._driver(em, hs, frame.nvml_error, now)
            return state, em.out
        if "host.gpu_driver" in hs.checks:
            em.emit(hs.checks, "host.gpu_driver", hs.labels, HEALTHY, now, value=0.0)
        hs.inventory_gpus = len(frame.gpus)
        hs.gpu_model = next((g.name for g in frame.gpus if g.name), None)
        for info in frame.gpus:
            self._gpu(em, hs, info.index, info.uuid, now)
        self._driver_drift(state, em, hs, frame.driver_version, now)
        return state, em.out

    def _history(
        self, state: HealthState, hs: HostState, gs: GpuState, code: int, frame: EventFrame, now: float
    ) -> None:
        """Record a fatal XID in its board's history across boots; hold ``gpu.rma`` when the
        history asks for it (:func:`collector.health.history.decide`)."""
        got = state.history.fatal_xid(
            hs.host, hs.provider, gs.index, gs.uuid, code, frame.ts or now, frame.boot_id, self.config.gpu
        )
        if got is not None:
            self._hold_rma(gs, got[0], got[1], now)

    @staticmethod
    def _hold_rma(gs: GpuState, board: BoardHistory, decision: RmaDecision | None, now: float) -> None:
        if decision is not None and decision.until > now:
            gs.rma_until = max(gs.rma_until, decision.until)
            gs.rma_summary = decision.summary(gs.index, board.board)
            gs.rma_evidence = decision.evidence_text()

    @staticmethod
    def _driver(em: Emitter, hs: HostState, error: str, now: float) -> None:
        """NVML cannot initialise: the host is up (it reports) but its GPUs are unknown. One
        driver alert, not ``host.unreachable`` and not ``host.gpu_missing``."""
        for gs in hs.gpus.values():
            gs.stale, gs.quiet = True, False
        em.emit(
            hs.checks,
            "host.gpu_driver",
            hs.labels,
            CRITICAL,
            now,
            value=None,
            summary=f"{hs.host}: NVML cannot initialise: {error}; check the driver and library versions; "
            "reboot if a driver update is pending",
            advice="The agent runs and reports the host, but NVML does not start, so no GPU is "
            "monitored. Usual causes: a driver update without a reboot (NVML/RM version "
            "mismatch), the nvidia kernel module not loaded, a GPU lost at boot. Compare "
            "nvidia-smi with the loaded module (cat /proc/driver/nvidia/version), check dmesg, "
            "reboot if an update is pending. The agent retries NVML with backoff.",
        )

    def _driver_drift(
        self, state: HealthState, em: Emitter, hs: HostState, version: str | None, now: float
    ) -> None:
        """Record the host's driver; judge ``host.driver_drift`` for it, or for every host of
        its provider when the provider's majority version changed."""
        provider = hs.provider
        counts = state.drivers.get(provider)
        if counts is None:  # first use, or restored state: count once from the hosts
            counts = state.drivers[provider] = {}
            for h in state.hosts.values():
                if h.provider == provider and h.driver_version and h is not hs:
                    counts[h.driver_version] = counts.get(h.driver_version, 0) + 1
        elif hs.driver_version:
            left = counts.get(hs.driver_version, 0) - 1
            if left > 0:
                counts[hs.driver_version] = left
            else:
                counts.pop(hs.driver_version, None)
        hs.driver_version = version or None
        if hs.driver_version:
            counts[hs.driver_version] = counts.get(hs.driver_version, 0) + 1
        top = drivers.majority(counts)
        changed = provider not in state.driver_majority or state.driver_majority[provider] != top
        state.driver_majority[provider] = top
        n = sum(counts.values())
        for h in state.hosts.values() if changed else (hs,):
            if h.provider != provider or not h.driver_version:
                continue
            if top is None or h.driver_version == top:
                em.emit(h.checks, "host.driver_drift", h.labels, HEALTHY, now, value=0.0)
                continue
            em.emit(
                h.checks,
                "host.driver_drift",
                h.labels,
                INFO,
                now,
                value=1.0,
                summary=f"{h.host} runs NVIDIA driver {h.driver_version}, {provider} mostly {top} "
                f"({counts.get(top, 0)} of {n} hosts): align the driver",
                advice="This host's driver differs from the version most hosts of its provider run (a "
                "rollout that did not reach it, or an image out of date). Jobs may behave "
                "differently here; update or roll back its driver and reboot.",
            )

    @staticmethod
    def forget(state: HealthState, host: str) -> bool:
        """Drop ``host`` from the state (``forget-host``): it is no longer expected to report,
        and if it reports again it starts as a new host. ``False`` when it was not there. The
        alert engine resolves its alerts (``ForgetHost``)."""
        hs = state.hosts.pop(host, None)
        if hs is None:
            return False
        state.drivers.pop(hs.provider, None)  # its driver left the provider's count: recounted
        state.history.forget_host(host)  # its boards keep their history (they may turn up elsewhere)
        return True

    # ------------------------------------------------------------------ time

    def stale_limit(self, hs: HostState) -> float:
        """Seconds without a frame after which ``hs`` is stale."""
        h = self.config.health
        if h.stale_after > 0:
            return h.stale_after
        return h.stale_factor * (hs.interval_s or h.default_interval)

    def tick(
        self,
        state: HealthState,
        now: float,
        expected: Mapping[str, ExpectedHost] | None = None,
        impaired_since: float | None = None,
    ) -> tuple[HealthState, list[Observation]]:
        """Advance time: stale hosts, hosts that never reported, XID windows.

        ``expected`` (host name -> :class:`ExpectedHost`) is the inventory source's view;
        hosts it lists that never reported are ``unknown`` and, after ``never_reported_grace``,
        unreachable. ``impaired_since``: the collector's own pipeline is impaired since then
        (its NATS connection, PostgreSQL, ingest lag): it cannot see its hosts, so no host turns
        stale or unreachable meanwhile; call :meth:`resume` when it recovers.
        """
        em = Emitter(self.healthy_for)
        if expected:
            for name, exp in expected.items():
                hs = state.hosts.get(name)
                if hs is None:
                    hs = HostState(name, exp.provider, {"provider": exp.provider, "host": name})
                    hs.first_expected_at = now
                    state.hosts[name] = hs
                hs.expected_gpus = exp.gpus
        grace = self.config.health.never_reported_grace
        if state.history.boards:
            state.history.expire(now, self.config.gpu)
        for hs in state.hosts.values():
            for gs in hs.gpus.values():
                if gs.xids or gs.fatal_xids or gs.rma_until:
                    n = len(em.out)
                    self.gpu.expire(em, gs, gs.labels, now)
                    if len(em.out) != n:
                        gs.quiet = False
            if hs.stale or impaired_since is not None:
                continue
            if hs.last_frame_at is None:
                if hs.first_expected_at is not None and now - hs.first_expected_at >= grace:
                    self._stale(em, hs, now, "never reported")
                continue
            silent = now - hs.last_frame_at
            if silent > self.stale_limit(hs):
                self._stale(em, hs, now, f"no data for {silent:.0f} s")
        return state, em.out

    def resume(self, state: HealthState, now: float) -> None:
        """The collector's own pipeline works again at ``now`` (after ``tick(impaired_since=...)``):
        staleness resumes from fresh arrivals. Every host that was not stale gets a full
        ``stale_after`` from now (its frames waited in JetStream, not on the host), and hosts
        expected but never seen a full ``never_reported_grace``: no burst of false alerts."""
        for hs in state.hosts.values():
            if hs.stale:
                continue
            if hs.last_frame_at is not None:
                hs.last_frame_at = max(hs.last_frame_at, now)
            elif hs.first_expected_at is not None:
                hs.first_expected_at = max(hs.first_expected_at, now)

    def _stale(self, em: Emitter, hs: HostState, now: float, why: str) -> None:
        hs.stale = True
        em.emit(
            hs.checks,
            "host.unreachable",
            hs.labels,
            CRITICAL,
            now,
            value=hs.last_frame_at,
            summary=f"{hs.host} unreachable ({why}): check the host, its agent and its network",
            advice="No frame from this host within stale_after: the host is down, the agent stopped, "
            "or the network to NATS is broken. Its GPUs' last values are stale.",
            immediate=True,
        )
        for gs in hs.gpus.values():
            gs.stale, gs.quiet = True, False
            em.emit(
                gs.checks,
                "gpu.stale",
                gs.labels,
                UNKNOWN,
                now,
                value=None,
                summary=f"GPU {gs.index} on {hs.host}: no current data ({why})",
                advice="The host stopped reporting; this GPU's health is unknown until it does.",
            )


def retire(em: Emitter, checks: Mapping[str, CheckStatus], now: float, reason: str) -> None:
    """Final healthy observations for checks whose subject is gone (replaced, evicted): every
    alert they raised resolves with ``reason``, flapping or not."""
    for cs in checks.values():
        em.out.append(Observation(cs.check, HEALTHY, cs.labels, cs.key, now, None, reason=reason))


_LOST = GpuSample(lost=True)
# Bounds on what one agent can make the engine remember (docs/health.md, "Bounds").
_RECENT_EVENTS = 512  # event seqs remembered per host (and agent run) for de-duplication
_BOOTS = 4  # earlier agent runs remembered per host
MAX_GPUS_PER_HOST = 64  # GPU slots per host; a new index beyond it evicts the least recently sampled
MAX_XID_CODES = 32  # XID codes remembered per GPU; a new code beyond it evicts the least recent
MAX_FATAL_XIDS = 256  # fatal XID times kept per GPU for the RMA count (at least rma_fatal_xids)
MAX_HOST_CHECKS = 256  # host checks (system, per mount, NIC, network target); least recent go
