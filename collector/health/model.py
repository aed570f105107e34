"""Health statuses, observations and the engine's state (plain dataclasses).

An :class:`Observation` is what one check concluded about one subject (a GPU, a host, a
mount, an interface, a network target) at one time. It carries the check id, the labels
that name the subject, the status, the value it judged, a one-line summary that says what
to do and a longer advice. The alert engine turns observations into alerts.

The state is owned by the caller and updated in place by the engine; it holds only data
(previous counters for rates, XID history, the last status of each check) and round-trips
through :func:`collector.health.codec.health_snapshot` / ``state_from_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from collector.health.actions import action_for
from collector.health.advice import ADVICE
from collector.health.history import FleetHistory
from shared.frames import GpuSample, IbPort, SystemSample

CRITICAL: Final = "critical"
WARNING: Final = "warning"
UNKNOWN: Final = "unknown"
INFO: Final = "info"
HEALTHY: Final = "healthy"
STATUSES: Final = (CRITICAL, WARNING, UNKNOWN, INFO, HEALTHY)  # worst first
RANK: Final[dict[str, int]] = {HEALTHY: 0, INFO: 1, UNKNOWN: 2, WARNING: 3, CRITICAL: 4}

# Why a subject's conditions end without a healthy reading (``Observation.reason``, then the
# alert's resolution reason): its GPU was replaced in the slot (a new UUID), its host moved to
# another provider, the host was forgotten (``forget-host``), or the subject was evicted to
# keep the per-host state bounded (docs/health.md, "Bounds").
R_REPLACED: Final = "replaced"
R_MOVED: Final = "moved"
R_FORGOTTEN: Final = "forgotten"
R_EVICTED: Final = "evicted"
REASONS: Final = (R_REPLACED, R_MOVED, R_FORGOTTEN, R_EVICTED)


def worst(statuses: list[str] | tuple[str, ...]) -> str:
    """The worst status of ``statuses`` (``healthy`` when empty)."""
    best, rank = HEALTHY, 0
    for s in statuses:
        r = RANK[s]
        if r > rank:
            best, rank = s, r
    return best


def labels_key(check: str, labels: Mapping[str, str]) -> str:
    """The stable identity of ``check`` on the subject named by ``labels``."""
    inner = ",".join(f'{k}="{labels[k]}"' for k in sorted(labels))
    return f"{check}{{{inner}}}"


@dataclass(frozen=True, slots=True)
class Observation:
    """One check's conclusion about one subject at one time."""

    check: str  # check id, e.g. "gpu.temperature"
    status: str  # one of STATUSES
    labels: Mapping[str, str]  # provider, host, and gpu/uuid, mount, nic, target, xid as relevant
    key: str  # labels_key(check, labels): the alert engine's identity of the condition
    at: float  # Unix seconds
    value: float | None = None  # what was judged (temperature, rate, count, ...)
    summary: str = ""  # one line that says what to do
    advice: str = ""  # longer advice
    immediate: bool = False  # an event: an alert fires at once instead of waiting its `for`
    reason: str = ""  # set on a final healthy observation: the subject is gone (REASONS)
    # the host's time of the frame it concluded from (None: not from a frame, e.g. staleness):
    # a backlog judged in a burst keeps the time a condition held (AlertEngine, ``for``)
    seen: float | None = None

    @property
    def action(self) -> str:
        """What to do about it (``collector.health.actions``; ``none`` when healthy)."""
        return action_for(self.check, self.labels, self.value, self.status == HEALTHY)


def seen_at(observations: list[Observation], ts: float) -> list[Observation]:
    """``observations`` of one frame, dated with its time (``ts``, the host's clock) as well as
    with when they were judged: the alert engine counts ``for`` in either (a backlog judged in a
    burst keeps the time its conditions held)."""
    return [  # (the constructor, not dataclasses.replace: 1.3 against 2.8 us an observation)
        Observation(
            o.check, o.status, o.labels, o.key, o.at, o.value, o.summary, o.advice, o.immediate, o.reason, ts
        )
        for o in observations
    ]


@dataclass(slots=True)
class CheckStatus:
    """The last conclusion of one check on one subject."""

    check: str
    key: str
    labels: dict[str, str]
    status: str = HEALTHY
    since: float = 0.0  # when the status last changed
    at: float = 0.0  # when it was last evaluated
    quiet: int = 0  # consecutive healthy evaluations after a problem
    value: float | None = None
    summary: str = ""
    advice: str = ""
    # the newest event frame (agent run, seq) that concluded this check: a sample the agent
    # took before it (a lower seq of that run) is older news and does not change the check
    event_boot: str = ""
    event_seq: int = -1


@dataclass(slots=True)
class XidRecord:
    """The XIDs of one code on one GPU."""

    code: int
    count: int = 0  # total seen (the agent's running count when it sends one)
    first_at: float = 0.0
    last_at: float = 0.0


# (sample time, single-bit ECC volatile, PCIe replays, NVLink CRC, replay and recovery totals,
# then the per-link CRC, replay and recovery counters where the driver has no total, else ())
RateMark = tuple[
    float,
    int | None,
    int | None,
    int | None,
    int | None,
    int | None,
    tuple[int, ...],
    tuple[int, ...],
    tuple[int, ...],
]


@dataclass(slots=True)
class GpuState:
    """What the engine remembers about one GPU."""

    index: int
    uuid: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # provider, host, gpu, uuid
    last_ts: float | None = None  # sample time of ``last``
    last: GpuSample | None = None  # the last readings; stale when ``lost`` or the host is stale
    # the rate counters of the recent samples, oldest first: the first is the newest at least
    # ``rate_window`` before the last (:func:`collector.health.gpu.rate_base`); not persisted
    rate_marks: list[RateMark] = field(default_factory=list)
    rated: bool = False  # the rates were judged over a whole window (the fast path waits for it)
    lost: bool = False
    stale: bool = False
    quiet: bool = False  # every check healthy and quiet: the next sample may take the fast path
    throttle_since: float | None = None  # HW clock-event reasons active continuously since
    throttle_until: float | None = None  # a reported throttle (reasons or events) lasted until then
    event_reasons: int = 0  # reason bits from throttle_start/throttle_stop events
    memory_trend_at: float | None = None  # when a lifetime memory-error counter last grew
    memory_trend: str = ""  # what grew then (summary text)
    xids: dict[int, XidRecord] = field(default_factory=dict)
    fatal_xids: list[float] = field(default_factory=list)  # times of fatal XIDs in rma_window
    rma_until: float = 0.0  # the board's fault history asks for RMA until then (gpu.rma held)
    rma_summary: str = ""  # ... saying why, with the evidence in rma_evidence
    rma_evidence: str = ""
    checks: dict[str, CheckStatus] = field(default_factory=dict)


# (expected IB ports, expected rate, the ports judged, [(check key, status), ...])
IbMemo = tuple[int | None, float | None, tuple[IbPort, ...], list[tuple[str, "CheckStatus"]]]
# (the system sample judged last, the host's GPU model then, [(check key, status), ...]: every
# check its judging dated, all healthy and quiet)
SystemMemo = tuple[SystemSample, str | None, list[tuple[str, "CheckStatus"]]]


@dataclass(slots=True)
class HostState:
    """What the engine remembers about one host."""

    host: str
    provider: str
    labels: dict[str, str] = field(default_factory=dict)  # provider, host
    boot_id: str | None = None  # the agent run whose frames are being judged
    last_sample_seq: int = -1  # a sample of this boot at or below it is a duplicate or late
    recent_events: list[int] = field(default_factory=list)  # seqs of this boot's recent events
    boot_events: dict[str, list[int]] = field(default_factory=dict)  # earlier runs' (at most 4)
    boot_sample_seq: dict[str, int] = field(default_factory=dict)  # earlier runs' last sample seq
    last_frame_at: float | None = None  # when the last frame of this host was observed (``now``)
    interval_s: float | None = None
    first_expected_at: float | None = None  # when the inventory source first listed it
    expected_gpus: int | None = None  # from the inventory source
    inventory_gpus: int | None = None  # from the agent's inventory frame
    stale: bool = False
    gpus: dict[int, GpuState] = field(default_factory=dict)
    system_ts: float | None = None
    system: SystemSample | None = None  # previous system sample (for NIC and IB rates, log counts)
    nvml_error: str | None = None  # the agent's NVML cannot initialise (from its inventory)
    nats_failed_since: float | None = None  # sample time of the first failed NATS round trip in a row
    driver_version: str | None = None  # from the agent's inventory frame
    checks: dict[str, CheckStatus] = field(default_factory=dict)
    gpu_model: str | None = None  # from the inventory frame (expected InfiniBand ports and rate)
    ib_flaps: dict[str, float] = field(default_factory=dict)  # IB port -> when its last flap was seen
    log_hits: dict[str, list[list[float]]] = field(default_factory=dict)  # class -> [[ts, lines], ...]
    # The InfiniBand fast path's memo (collector.health.node): the expected port count and rate,
    # the ports of the last sample and its healthy, quiet IB checks (key, status). Derived, not
    # state: not saved (codec), not compared; without it the next sample takes the full path.
    ib_quiet: IbMemo | None = field(default=None, compare=False, repr=False, metadata={"derived": True})
    # The system sample's quiet fast path's memo (collector.health.host): derived like ib_quiet.
    system_quiet: SystemMemo | None = field(
        default=None, compare=False, repr=False, metadata={"derived": True}
    )


@dataclass(slots=True)
class HealthState:
    """The whole fleet, keyed by host name (host names are unique across providers)."""

    hosts: dict[str, HostState] = field(default_factory=dict)
    # per provider: hosts per driver version, and its majority (a cache rebuilt from ``hosts``)
    drivers: dict[str, dict[str, int]] = field(default_factory=dict)
    driver_majority: dict[str, str | None] = field(default_factory=dict)
    history: FleetHistory = field(default_factory=FleetHistory)  # fault history per physical GPU

    def provider_hosts(self) -> dict[str, int]:
        """How many hosts each provider has (for the alert engine's provider-wide incidents)."""
        counts: dict[str, int] = {}
        for h in self.hosts.values():
            counts[h.provider] = counts.get(h.provider, 0) + 1
        return counts


Extra = tuple[tuple[str, str], ...]  # the labels of a check with one subject per value (mount, nic...)


def check_key(check: str, extra: Extra = ()) -> str:
    """A check's key in its subject's ``checks``: the id, then the values of its extra labels."""
    if not extra:  # most checks (called for every check of every sample: kept cheap)
        return check
    if len(extra) == 1:  # one subject label (mount, NIC, port...): the same key, without a generator
        return check + ":" + extra[0][1]
    return ":".join((check, *(v for _, v in extra)))


class Emitter:
    """Records check conclusions and decides which become observations.

    A problem (any status but ``healthy``) is always emitted; a healthy conclusion is emitted
    the first time a check is evaluated and for ``emit_healthy_for`` evaluations after a
    problem clears (so the alert engine resolves it and its flap history decays), then the
    check goes quiet until its status changes.

    Events and samples judge some checks alike (GPU lost, double-bit ECC, clock events, row
    remap, recovery action). The fast event path judges an event as it arrives while the
    samples wait in the ingest, so a sample the agent took *before* an event is often judged
    *after* it: while ``event`` is set (judging an event frame: its agent run and seq) the
    checks concluded remember it; while ``sample`` is set (judging a sample's GPU readings)
    a check that an event of the same run with a higher seq concluded keeps that conclusion
    (:meth:`superseded`): the sample is older news, not a change.
    """

    __slots__ = ("event", "healthy_for", "out", "sample")

    def __init__(self, healthy_for: int) -> None:
        self.healthy_for = healthy_for
        self.out: list[Observation] = []
        self.event: tuple[str, int] | None = None  # (boot id, seq) of the event frame being judged
        self.sample: tuple[str, int] | None = None  # (boot id, seq) of the sample frame being judged

    def superseded(self, checks: Mapping[str, CheckStatus], local: str) -> bool:
        """The sample being judged was taken before the newest event that concluded ``local``."""
        s = self.sample
        if s is None:
            return False
        cs = checks.get(local)
        return cs is not None and cs.event_seq > s[1] and cs.event_boot == s[0]

    def emit(
        self,
        checks: dict[str, CheckStatus],
        check: str,
        base: Mapping[str, str],
        status: str,
        at: float,
        *,
        value: float | None = None,
        summary: str = "",
        advice: str = "",
        immediate: bool = False,
        extra: Extra = (),
    ) -> None:
        """Record ``check``'s verdict ``status`` at ``at`` in ``checks`` (the subject's table).

        ``base`` labels the subject (provider, host, GPU); ``extra`` adds the label of a check
        with one subject per value (``xid``, ``mount``, ``nic``...), whose key in ``checks`` is
        then :func:`check_key` (``host.disk:/data``); otherwise the key is the check id.
        """
        local = check_key(check, extra)
        cs = checks.get(local)
        ev = self.event
        if cs is None:
            labels = dict(base)
            labels.update(extra)
            cs = CheckStatus(check, labels_key(check, labels), labels, status, at, at)
            cs.quiet = self.healthy_for if status == HEALTHY else 0
            checks[local] = cs
            if ev is not None:
                cs.event_boot, cs.event_seq = ev
        else:
            s = self.sample
            if s is not None and cs.event_seq > s[1] and cs.event_boot == s[0]:
                return  # an event taken after this sample concluded the check (see the class)
            if ev is not None and (ev[0] != cs.event_boot or ev[1] > cs.event_seq):
                cs.event_boot, cs.event_seq = ev
            if status == HEALTHY:
                if cs.status == HEALTHY:
                    cs.at = at
                    if cs.quiet >= self.healthy_for:
                        return
                    cs.quiet += 1
                else:
                    cs.status, cs.since, cs.quiet = HEALTHY, at, 1
            else:
                if status != cs.status:
                    cs.status, cs.since = status, at
                cs.quiet = 0
            cs.at = at
        cs.value, cs.summary, cs.advice = value, summary, advice
        self.out.append(Observation(check, status, cs.labels, cs.key, at, value, summary, advice, immediate))


class Verdicts:
    """The verdicts of one subject's checks at one time: the emitter, the subject's check table,
    the labels that name it and the time, given once for all the checks that judge it.

    A problem's advice is the check's entry in :data:`collector.health.advice.ADVICE` unless
    the verdict gives its own.
    """

    __slots__ = ("at", "base", "checks", "em")

    def __init__(
        self, em: Emitter, checks: dict[str, CheckStatus], base: Mapping[str, str], at: float
    ) -> None:
        self.em, self.checks, self.base, self.at = em, checks, base, at

    def ok(self, check: str, value: float | None, extra: Extra = ()) -> None:
        """``check`` is healthy (judged ``value``).

        Most verdicts of a healthy fleet are this one on a check already healthy and quiet, for
        which :meth:`Emitter.emit` only dates the check; that case is done here, without the
        call (outside an event, and keeping a check an event concluded after this sample as
        emit does); every other goes to emit. A test holds the two to the same verdicts."""
        em = self.em
        cs = self.checks.get(check_key(check, extra))
        if cs is not None and cs.status == HEALTHY and cs.quiet >= em.healthy_for and em.event is None:
            s = em.sample
            if s is None or cs.event_seq <= s[1] or cs.event_boot != s[0]:
                cs.at = self.at
            return
        em.emit(self.checks, check, self.base, HEALTHY, self.at, value=value, extra=extra)

    def bad(
        self,
        check: str,
        status: str,
        value: float | None,
        summary: str,
        advice: str | None = None,
        *,
        immediate: bool = False,
        extra: Extra = (),
    ) -> None:
        """``check`` found a problem of ``status``; ``summary`` says what to do."""
        self.em.emit(
            self.checks,
            check,
            self.base,
            status,
            self.at,
            value=value,
            summary=summary,
            advice=ADVICE[check] if advice is None else advice,
            immediate=immediate,
            extra=extra,
        )


class GpuVerdicts(Verdicts):
    """The verdicts on one GPU sample: also the GPU's state, the sample, the previous sample
    (``None``: no rates from it) and the seconds between the two."""

    __slots__ = ("dt", "g", "gs", "prev")

    def __init__(self, em: Emitter, gs: GpuState, base: Mapping[str, str], g: GpuSample, at: float) -> None:
        super().__init__(em, gs.checks, base, at)
        self.gs, self.g = gs, g
        self.dt = (at - gs.last_ts) if gs.last_ts is not None else 0.0
        prev = gs.last
        self.prev = None if prev is not None and self.dt <= 0 else prev  # duplicate or out of order


class HostVerdicts(Verdicts):
    """The verdicts on one system sample: also the host's state, the sample, the host's
    previous sample (``None``: no rates from it) and the seconds between the two.

    ``judged`` (when not ``None``) lists the key of every healthy verdict, for the system
    sample's quiet fast path (:mod:`collector.health.host`); a problem, or a verdict that the
    next sample of the same shape would not repeat (a counter without a previous reading, a
    kernel-log class judged from its failing check), sets it to ``None``: no fast path then."""

    __slots__ = ("dt", "hs", "judged", "prev", "s")

    def __init__(
        self, em: Emitter, hs: HostState, base: Mapping[str, str], s: SystemSample, at: float
    ) -> None:
        super().__init__(em, hs.checks, base, at)
        self.hs, self.s, self.prev = hs, s, hs.system
        self.dt = at - hs.system_ts if hs.system_ts is not None else 0.0
        self.judged: list[str] | None = None

    def ok(self, check: str, value: float | None, extra: Extra = ()) -> None:
        Verdicts.ok(self, check, value, extra)
        j = self.judged
        if j is not None:
            j.append(check_key(check, extra))

    def bad(self, *args: Any, **kwargs: Any) -> None:  # (Verdicts.bad's arguments)
        self.judged = None
        Verdicts.bad(self, *args, **kwargs)
