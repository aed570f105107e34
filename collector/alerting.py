"""The engine runner: runs the pure health and alert engines inside the collector.

Inputs: every committed batch of frames (:meth:`Alerting.on_frames`, from the ingest), event
frames before they are stored (:meth:`Alerting.judge_early`, from :mod:`collector.fastpath`),
a timer (``[alerting] tick``, 1 s) and the API's commands (acknowledge, silence, forget).
A batch goes through ``HealthEngine.observe`` and the observations through
``AlertEngine.evaluate`` at once (an XID is judged when its event frame arrives); the timer
runs ``HealthEngine.tick`` (stale hosts, hosts the inventory expects that never reported) and
the alert engine's time-driven steps (``for``, escalation, repeats, silence and
acknowledgement expiry). Effects: each step's changes are written through the store
(:class:`AlertStore`, in PostgreSQL :class:`collector.store.alerts.PgAlertStore`) in one
transaction with its notifications, then handed to the deliverer
(:class:`collector.notify.outbox.Deliverer`) and published on the live stream; the first
notices of event-class criticals are handed to the deliverer as soon as they are judged and
written with their step (:meth:`Alerting._step`). Only this
partition's hosts are evaluated. Every dependency is given (:mod:`collector.wiring` builds
them), so the runner runs with an in-memory store and a fixed clock in tests. See
``docs/alerts.md`` ("In the collector").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Unpack

from collector.alerts import (
    Ack,
    AckIncident,
    AddSilence,
    Alert,
    AlertEngine,
    AlertState,
    ExpireSilence,
    Silence,
    parse_matcher,
)
from collector.alerts.correlate import Fleet
from collector.alerts.model import (
    ALERT_STATES,
    N_FIRING,
    N_PROVIDER,
    N_UPDATE,
    AlertQuery,
    Command,
    ForgetHost,
    Incident,
    Notification,
    Outcome,
    plain,
)
from collector.config import CollectorConfig
from collector.group.fence import FencedError
from collector.group.fleet import HANDOFF, FleetView
from collector.group.scope import Scope
from collector.group.store import Reload
from collector.health import ExpectedHost, HealthEngine, HealthState
from collector.health.codec import state_from_dict
from collector.health.history import BoardHistory, FleetHistory
from collector.health.model import Observation, seen_at
from collector.health.rollup import HostHealth, host_health
from collector.ingest import IngestStats, owner
from collector.inventory import ExpectedHost as ListedHost
from collector.notify import Channels
from collector.notify.base import delivery_key, payload_of
from collector.notify.config import NotifyConfig
from collector.notify.nats import NatsChannel
from collector.notify.outbox import Deliverer, Early, Landed, OutboxRow, Spool
from collector.notify.outbox import Outcome as DeliveryOutcome
from collector.notify.stream import Broadcaster
from collector.remediation.engine import AlertView
from collector.selfcheck import (
    NOTIFY,
    Heartbeat,
    Readings,
    SelfCheckConfig,
    SelfState,
    SelfStatus,
    behind,
    judge,
    observations,
)
from collector.state import FleetState
from collector.store import db
from collector.store.alerts import Changes, Restored
from shared.errors import ConfigError, SubjectError
from shared.frames import Frame
from shared.subjects import sanitize_token

log = logging.getLogger(__name__)
JUDGE_CHUNK = 32  # frames of an ingest batch judged per step (~250 GPU samples, ~4 ms of CPU)


class AlertStore(Protocol):
    """Where the runner keeps its state (:class:`collector.store.alerts.PgAlertStore`)."""

    @property
    def available(self) -> bool: ...  # False before the store is opened: nothing is written

    async def restore(self) -> Restored: ...

    async def save(
        self, ch: Changes, early: Early, landed: Landed = (), *, health: bool = False
    ) -> list[OutboxRow]: ...  # health: the snapshot written with ch (a collector group's)

    async def record_early(self, done: Landed) -> None: ...

    async def save_health(self, state: HealthState, healthy_for: int) -> None: ...

    async def load_history(self) -> list[BoardHistory]: ...

    async def save_history(
        self, changed: Sequence[BoardHistory], gone: Sequence[tuple[str, float]], cutoff: float = 0.0
    ) -> list[BoardHistory]: ...  # merged by event identity: the boards as written

    async def save_silence(self, s: Silence) -> None: ...

    async def expire_silence(self, sid: str) -> None: ...

    async def mark_forgotten(self, host: str) -> None: ...

    async def clear_forgotten(self, hosts: Collection[str]) -> None: ...

    async def forgotten_hosts(self) -> set[str]: ...  # forgotten and not reported since


class AlertViews(Protocol):
    """The JSON of alerts and incidents on the live stream and in command replies
    (:mod:`collector.api.views`)."""

    def alert_view(self, a: Alert) -> dict[str, Any]: ...

    def folded_view(self, a: Alert, folded: Sequence[Alert]) -> dict[str, Any]: ...

    def incident_view(self, inc: Incident, by_fp: Mapping[str, Alert]) -> dict[str, Any]: ...


Asked = Mapping[str, Mapping[str, str] | None]  # an incident's members: fingerprint -> labels, if known


class Remote(Protocol):
    """A collector group member's link to the others (:class:`collector.group.commands.GroupCommands`)."""

    async def notify(self) -> None: ...

    async def expire_silence(self, sid: str) -> bool: ...

    async def ack(self, fingerprint: str, by: str, until: float | None, comment: str) -> dict[str, Any]: ...

    async def ack_incident(self, iid: str, by: str, until: float | None, comment: str) -> dict[str, Any]: ...

    async def ack_members(
        self, iid: str, members: Asked, by: str, until: float | None, comment: str
    ) -> int: ...

    async def forget(self, host: str) -> dict[str, Any]: ...


class Remediation(Protocol):
    """What the runner asks of remediation (:class:`collector.remediation.service.Remediator`)."""

    @property
    def enabled(self) -> bool: ...

    def kick(self) -> None: ...

    def observations(self, now: float) -> list[Observation]: ...

    def stats(self) -> dict[str, Any]: ...


def _nothing_judged(_: Sequence[Frame], __: Collection[str]) -> None:
    return None


def _nothing(_: Any) -> None:
    return None


class Alerting:
    """The engine runner (see the module): frames, ticks and commands in; persisted
    decisions, deliveries and live events out."""

    def __init__(
        self,
        config: CollectorConfig,
        *,
        health_engine: HealthEngine,
        alert_engine: AlertEngine,
        notify: NotifyConfig,
        store: AlertStore,
        deliverer: Deliverer,
        channels: Channels,
        nats: NatsChannel,
        broadcaster: Broadcaster,
        views: AlertViews,
        fleet: FleetState,
        expected_hosts: Callable[[], Iterable[ListedHost]] = tuple,
        ingest_stats: Callable[[], IngestStats] = IngestStats,
        nats_connected: Callable[[], bool] = lambda: False,
        on_judged: Callable[[Sequence[Frame], Collection[str]], None] = _nothing_judged,
        on_forgotten: Callable[[str], None] = _nothing,
        remediation: Remediation | None = None,
        scope: Scope | None = None,
        on_fenced: Callable[[list[int]], None] = _nothing,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = config.alerting
        self.partition, self.partitions = config.collector.partition, config.collector.partitions
        self.batch = config.collector.batch
        self.health_engine = health_engine
        self.engine = alert_engine
        self.notify = notify
        self.store = store
        self.deliverer = deliverer
        deliverer.early = self._early_done
        self.channels = channels
        self.nats = nats
        self.broadcaster = broadcaster
        self.views = views
        self.fleet = fleet
        self.expected_hosts = expected_hosts
        self.ingest_stats = ingest_stats
        self.nats_connected = nats_connected
        # told the frames of each judged batch and the hosts it observed (the live rollup)
        self.on_judged = on_judged
        self.on_forgotten = on_forgotten  # told each host forgotten
        self.fleet_view: FleetView | None = None  # a group member's view of the others' buckets (reads)
        self.provider_totals: Callable[[], Mapping[str, int]] | None = None  # a group: the fleet's hosts
        # a group: the providers whose provider-wide incident it judges (their bucket held and
        # its state restored here: not judged with the state of a bucket not read back yet)
        self.judges: Callable[[str], bool] | None = None
        self.remediation = remediation
        self.scope = scope  # a collector group member: it judges and writes its buckets only
        # a collector group member: silences told to the others, acknowledgements of alerts
        # another member owns (collector.group.commands)
        self.remote: Remote | None = None
        self.on_fenced = on_fenced  # told the buckets a write found owned by another member
        self.clock = clock  # the time decisions are dated with
        self.monotonic = monotonic  # the time intervals (snapshots, re-pushes, write retries) are kept with
        self.health = HealthState()
        self.alerts_state = AlertState()
        self._lock = asyncio.Lock()  # one engine step at a time (judging: evaluate and collect)
        self._write_lock = asyncio.Lock()  # one write at a time; a step's write follows its judging
        self._unsaved = Changes()
        self._urgent: list[str] = []  # delivery keys of the step being collected to send at once
        self._saved_fps: set[str] = set()
        self._incident_sig: dict[str, tuple[Any, ...]] = {}
        # provider incident -> (covered, covered_at) as committed: what the fleet view publishes
        self._committed: dict[str, tuple[dict[str, str], dict[str, float]]] = {}
        self._engine_sig: tuple[Any, ...] = ()
        self._host_status: dict[str, str] = {}
        self._last_back = 0.0  # the last judged batch's newest frame: its age when judged (_batch_age)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._running = False
        self.counts = {
            "evaluations": 0,
            "observations": 0,
            "transitions": 0,
            "notifications": 0,
            "fast_events": 0,
            "fast_event_errors": 0,
            "early_deliveries": 0,  # sent from memory while PostgreSQL was down (fail-open)
        }
        self.forgotten: set[str] = set()  # hosts forgotten (forget-host) that have not reported since
        self.seconds = {"health": 0.0, "alerts": 0.0, "persist": 0.0}  # time spent, for /metrics
        self.persist_errors = 0
        # fail-open (PostgreSQL down): deliveries sent from memory before their step was written
        self._early: dict[str, DeliveryOutcome | None] = {}  # key -> outcome (None: in flight)
        self._early_landed: list[tuple[OutboxRow, DeliveryOutcome]] = []  # ended after the write
        self._early_open = 0  # early deliveries whose outcome PostgreSQL does not have yet
        self._persist_down_since: float | None = None
        self._persist_tried = 0.0
        spool = self.settings.spool
        self.spool = Spool(Path(spool) / f"notify-spool-{self.partition}.jsonl" if spool else None)
        sc = config.selfcheck
        self.selfcheck = SelfCheckConfig(sc.grace, sc.ingest_lag, sc.notify_backlog, sc.channel_window)
        self.self_state = SelfState()
        self.self_status = SelfStatus()  # the collector's own health, judged every tick
        self.self_labels = {"collector": f"partition-{self.partition}"}
        self._self_told: dict[str, tuple[str, str] | None] = {}  # check -> (status, summary) observed
        self.heartbeat = Heartbeat(
            sc.heartbeat_url.reveal() if sc.heartbeat_url else None,
            sc.heartbeat_interval,
            sc.heartbeat_timeout,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Restore the persisted state, record what was sent while PostgreSQL was down, start
        delivering (the outbox rows left pending first) and the timer."""
        saved = await self.store.restore()
        self.restore(saved.alerts, saved.health, self.clock())
        self.health.history = FleetHistory.of(saved.boards)  # fault history per physical GPU
        if saved.boards:
            log.info("GPU fault history restored: %d boards", len(saved.boards))
        self.forgotten = set(saved.forgotten)
        self._drop_forgotten()  # the fleet state is rebuilt from every host ever stored
        spooled = self.spool.read()  # sent while PostgreSQL was down, before a restart
        if spooled:
            await self.store.record_early(spooled)
            self.spool.clear()
            log.info("recorded %d notifications sent while PostgreSQL was down", len(spooled))
        self.deliverer.start()
        self.deliverer.submit(saved.pending)
        if saved.pending:
            log.info("delivering %d notifications left pending before the restart", len(saved.pending))
        self._stop.clear()
        self._task = asyncio.create_task(self._timer(), name="alerting")
        self._running = True

    async def regroup(self, reload: Reload) -> None:
        """Group mode, the buckets held changed: write what the engine holds (only for buckets
        still held: the fencing check refuses the rest), then hold exactly the state of the
        buckets held now, as saved in PostgreSQL (``reload``), and deliver what the gained
        buckets' previous owner committed but did not send. Alert state, health context and
        escalation timers of a bucket thus move with it (docs/operations.md), and the GPU fault
        history the other members wrote is taken in. The health
        snapshots of the buckets still held are written in the same transaction as the alert
        changes (:meth:`_flush`); a bucket just gained is not written before it is read back.

        What is no bucket's (the member's own alerts, the self-check's, and their incidents) is
        kept as it is: no other member holds or restores it, and ``reload`` reads only the
        buckets held. Dropped with the buckets, a firing self-alert
        was forgotten and its resolution never told (a group of one through a NATS outage)."""
        if not self.store.available:
            return
        assert self.scope is not None, "regroup: a collector group member's"
        async with self._lock, self._write_lock:
            try:
                await self._flush(health=True)
            except db.ERRORS + (FencedError,) as e:
                log.warning(
                    "alert state and health snapshot of buckets lost not written (their new owner has "
                    "them): %s", e,
                )  # fmt: skip
            self._unsaved = self._own_unsaved()
            own = self._own_state()
            saved, health, rows = await reload()
            saved = {
                **saved,
                "alerts": [*saved.get("alerts", ()), *own["alerts"]],
                "incidents": [*saved.get("incidents", ()), *own["incidents"]],
                "open_incidents": {**saved.get("open_incidents", {}), **own["open_incidents"]},
            }
            history = self.health.history
            # the fault history as the other members wrote it (a gained bucket's boards: the
            # fatal XIDs and boots its previous owner recorded count for the next decision)
            history.absorb(await self.store.load_history())
            self.health = HealthState()
            self._host_status = {}
            self.restore(saved, health, self.clock())
            self.health.history = history
            # hosts another member forgot since this one started (a tombstone missed, or the
            # forgetting owner gone before it told): not resurrected from the state read back
            self.forgotten = await self.store.forgotten_hosts()
            self._drop_forgotten()
        if rows:
            log.info("delivering %d notifications another member left pending", len(rows))
            self.deliverer.submit(rows)

    def _own_unsaved(self) -> Changes:
        """Of the changes not written, the member's own (written with the next step; the rest
        is the buckets' lost, whose new owner has their state). Deletions are not kept: they
        go by fingerprint in every partition, a lost bucket's included."""
        assert self.scope is not None
        own = self.scope.split(self._unsaved, self.alerts_state.incidents, ()).get(
            self.scope.local, Changes()
        )
        own.deleted = set()
        return own

    def _own_state(self) -> dict[str, Any]:
        """The alerts and incidents of no bucket (``AlertState.to_dict``'s keys), as held now."""
        assert self.scope is not None
        scope, st = self.scope, self.alerts_state
        incidents = {i.id: i for i in st.incidents.values() if scope.of_incident(i) is None}
        return {
            "alerts": [plain(a) for a in st.alerts.values() if scope.of_labels(a.labels) is None],
            "incidents": [plain(i) for i in incidents.values()],
            "open_incidents": {slot: i for slot, i in st.open_incidents.items() if i in incidents},
        }

    def _drop_forgotten(self) -> None:
        for name in self.forgotten:
            self.fleet.forget(name)
            self.health_engine.forget(self.health, name)
            if self.fleet_view is not None:
                self.fleet_view.forget(name)
            self.on_forgotten(name)

    def forgotten_elsewhere(self, host: str) -> None:
        """A collector group: the owner of ``host``'s bucket says it was forgotten (its
        summary's tombstone, :mod:`collector.group.fleet`): it leaves this member's fleet state
        (rebuilt at start from every stored host) and is not expected here if its bucket moves."""
        if self.mine(host):
            return  # judged here: this member's own word (a late tombstone of its previous owner)
        self.forgotten.add(host)
        if self.fleet.forget(host):
            self.on_forgotten(host)

    def restore(self, saved: dict[str, Any], health: dict[str, Any] | None, now: float) -> None:
        """Resume from the persisted state. Hosts that were not stale get a fresh
        ``stale_after`` (their frames come again), so a restart raises no false unreachable."""
        saved["next_due"] = 0.0
        self.alerts_state = self.engine.restore(saved)
        self._saved_fps = set(self.alerts_state.by_fp)
        self._incident_sig = {i.id: _sig(i) for i in self.alerts_state.incidents.values()}
        self._committed = self._told_now()  # (restored: committed)
        self._engine_sig = self._engine_signature()
        if health is not None:
            self.health = state_from_dict(health)
            for hs in self.health.hosts.values():
                if not hs.stale and hs.last_frame_at is not None:
                    hs.last_frame_at = max(hs.last_frame_at, now)
                self._host_status[hs.host] = host_health(hs).status
        log.info(
            "alert state restored: %d alerts, %d hosts", len(self.alerts_state.alerts), len(self.health.hosts)
        )

    async def stop(self) -> None:
        """Stop the timer, write what is unsaved, then give the deliverer
        ``[alerting] shutdown_delivery`` to finish before it closes the channels. A runner
        that did not finish starting writes nothing (its state was not restored)."""
        started, self._running = self._running, False
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            if started:
                async with self._lock, self._write_lock:
                    await self._flush()
                    await self._save_history()
                await self.save_health()
        except db.ERRORS as e:
            log.warning("alert state not saved at shutdown: %s", e)
        await self.heartbeat.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.deliverer.idle(), self.settings.shutdown_delivery)
        await self.deliverer.close()

    async def _timer(self) -> None:
        last_snapshot = self.monotonic()
        while not self._stop.is_set():
            # the tick, or sooner when the alert engine has something due (a `for` ending)
            wait = min(self.settings.tick, self.alerts_state.next_due - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(wait, 0.05))
            if self._stop.is_set():
                return
            try:
                await self.tick(self.clock())
                self.heartbeat.beat(self.self_status)  # the loop's progress, not a timer of its own
                mono = self.monotonic()
                pg_down = self.ingest_stats().db_down_since is not None  # a snapshot would only fail
                if not pg_down and mono - last_snapshot >= self.settings.health_snapshot:
                    last_snapshot = mono
                    await self.save_health()
            except db.ERRORS as e:
                self.persist_errors += 1
                log.warning("alert state not persisted, will retry: %s", str(e) or repr(e))

    # ------------------------------------------------------------------ evaluation

    def mine(self, host: str) -> bool:
        if self.scope is not None:
            return self.scope.mine(host)
        if self.partitions == 1:
            return True
        try:
            return owner(sanitize_token(host), self.partitions) == self.partition
        except SubjectError:
            return False

    def expected(self) -> dict[str, ExpectedHost]:
        return {
            e.host: ExpectedHost(e.provider, e.gpus or None)
            for e in self.expected_hosts()
            if self.mine(e.host) and e.host not in self.forgotten  # forgotten: until it reports
        }

    async def on_frames(self, frames: Sequence[Frame]) -> None:
        """Ingest hook: judge a committed batch now, persist, notify. A large batch is judged
        ``JUDGE_CHUNK`` frames per step, so an event on the fast path is judged in between
        rather than after the whole batch (each step's observations are evaluated before
        the next frames are observed: the order of judging is the order of observing). The
        frames are observed under the step lock, with the evaluation of what they concluded
        (:meth:`_step`)."""
        if self.scope is not None:  # a bucket lost meanwhile: no longer judged here
            frames = [f for f in frames if self.scope.mine(f.host)]
        if self.forgotten:
            await self._unforget(frames)
        for i in range(0, len(frames), JUDGE_CHUNK):
            part = frames[i : i + JUDGE_CHUNK] if len(frames) > JUDGE_CHUNK else frames
            if i:
                await asyncio.sleep(0)  # the loop's turn (the fast event path, the API)
            now = self.clock()
            await self._step([], now, observe=functools.partial(self._observe, part, now))

    def _observe(self, part: Sequence[Frame], now: float) -> list[Observation]:
        """The health engine's observations of ``part`` (the health state changes)."""
        if self.scope is not None:  # (a bucket lost while the step waited for the lock)
            part = [f for f in part if self.scope.mine(f.host)]
        observe, h = self.health_engine.observe, self.health
        t = time.perf_counter()
        back = self._last_back = self._batch_age(now)
        before = {f.host: hs.last_frame_at for f in part if (hs := h.hosts.get(f.host))} if back else {}
        obs: list[Observation] = []
        for f in part:
            _, o = observe(h, f, now)
            if o:  # dated by the frame too: `for` holds in the host's time through a backlog
                obs += seen_at(o, f.ts)
        if back:  # a host was last heard when its frame reached the stream, not when judged
            for f in part:
                hs = h.hosts.get(f.host)
                if hs is not None and hs.last_frame_at == now:
                    hs.last_frame_at = max(before.get(f.host) or 0.0, now - back)
        self.seconds["health"] += time.perf_counter() - t
        self.on_judged(part, {o.labels.get("host", "") for o in obs})
        return obs

    def _batch_age(self, now: float) -> float:
        """How long ago the newest frame of the ingest batch being judged reached the stream
        (0 when the ingest says nothing: a runner driven without one). Staleness compares a host's
        last frame with the stream time judged so far (:func:`collector.selfcheck.behind`), both
        in stream time: a host silent for 8 s is stale even behind a 10 s lag."""
        st = self.ingest_stats()
        if st.unjudged_since is None or st.last_commit_at <= 0:
            return 0.0
        if self.self_status.impaired_since is not None or self.pg_down():
            # no commit while PostgreSQL is down: last_commit_at stands still, and dating frames
            # by it would date every host back to the outage's start (host.unreachable blamed on
            # the fleet); an impaired pipeline suspends staleness as before
            return 0.0
        return max(0.0, now - (st.last_commit_at - st.last_newest_lag_s))

    async def judge_early(self, frame: Frame) -> None:
        """The fast event path's input (:mod:`collector.fastpath`): an event frame of this
        partition, judged before the ingest has stored it. The copy the ingest hands over after
        its commit is recognised (per-boot seq) and not judged twice."""
        self.counts["fast_events"] += 1
        try:
            await self.on_frames([frame])
        except Exception:  # noqa: BLE001 (the stored copy is judged by the ingest hook all the same)
            self.counts["fast_event_errors"] += 1
            log.exception("the fast event path failed on a frame of %s", frame.host)

    async def _unforget(self, frames: Sequence[Frame]) -> None:
        """A forgotten host reported again: it is a new host (its marker is cleared)."""
        back = {f.host for f in frames if f.host in self.forgotten}
        if not back or not self.store.available:
            return
        try:
            await self.store.clear_forgotten(back)
        except db.ERRORS as e:  # tried again with its next frame
            log.warning("could not clear the forgotten mark of %d hosts: %s", len(back), e)
            return
        self.forgotten -= back
        log.info("forgotten hosts report again, as new hosts: %s", ", ".join(sorted(back)))

    async def forget_host(self, host: str, *, forward: bool = True) -> dict[str, Any]:
        """Forget ``host`` (``forget-host``, ``DELETE /api/v1/hosts/{host}``): it leaves the fleet
        and health state and the hosts the alert engine counts, its alerts resolve with reason
        ``forgotten``; its history stays in PostgreSQL. Raises ``KeyError`` for a host this
        collector does not know, :class:`ConfigError` for one of another partition. In a
        collector group, a host of another member's bucket is forgotten by that member (a
        ``forget`` group command; not with ``forward`` false: the command being applied)."""
        st = self.alerts_state
        alerts = [k for (_, h), keys in st.by_host.items() if h == host for k in keys]
        known = host in self.health.hosts or self.fleet.host(host) is not None or bool(alerts)
        if not self.mine(host):
            if forward and self.remote is not None:
                seen = self.fleet_view is not None and self.fleet_view.host(host, True) is not None
                if not (known or seen):
                    raise KeyError(host)
                return await self.remote.forget(host)  # its owner forgets it
            if not known:
                raise KeyError(host)
            raise ConfigError("host", f"{host} belongs to another collector partition: ask that one")
        if not known:
            raise KeyError(host)
        await self.store.mark_forgotten(host)
        self.forgotten.add(host)
        firing = sum(1 for k in alerts if st.alerts[k].state != "resolved")
        hs, fs = self.health.hosts.get(host), self.fleet.host(host)
        provider = hs.provider if hs is not None else fs.provider if fs is not None else None
        self.health_engine.forget(self.health, host)
        self.fleet.forget(host)
        if self.fleet_view is not None:  # a group: its own last summary row, read when not judged
            self.fleet_view.forget(host)
        previous = self._host_status.pop(host, None)
        self.on_forgotten(host)
        await self._step([], self.clock(), [ForgetHost(host)])
        await self.save_health()
        self.broadcaster.publish(
            {"type": "health", "provider": provider, "host": host, "severity": None, "status": "forgotten",
             "previous": previous}
        )  # fmt: skip
        listed = any(e.host == host for e in self.expected_hosts())
        if listed:
            log.warning(
                "host %s forgotten but still listed by the inventory source: it is expected again", host
            )
        return {"host": host, "forgotten": True, "alerts_resolved": firing, "in_inventory": listed}

    async def tick(self, now: float) -> None:
        was = self.self_status.impaired_since
        lag = 0.0
        if self._running:  # (an engine driven without being started: no self-check)
            readings = self.readings(now)
            self.self_status = judge(self.self_state, readings, self.selfcheck)
            lag = max(behind(readings), self._last_back)
        status = self.self_status
        resumed = was is not None and status.impaired_since is None
        if resumed:
            log.info("collector pipeline recovered (impaired since %.0f): host staleness resumes", was)
        elif was is None and status.impaired_since is not None:
            log.warning("collector pipeline impaired: host staleness suspended")

        def observe() -> list[Observation]:  # under the step lock (_step)
            if resumed:
                self.health_engine.resume(self.health, now)  # staleness resumes from fresh arrivals
            # hosts are judged as of the oldest frame not judged yet, or as of the pipeline's delay
            # when caught up (a host's last frame is dated by when it reached the stream, _batch_age):
            # frames waiting in a lagging ingest are not silence (a 1 s host is stale after 3 s; the
            # ingest may lag more), and a silence shorter than the lag is still one
            _, obs = self.health_engine.tick(self.health, now - lag, self.expected(), status.impaired_since)
            for o in observations(status, self.self_labels, now) if self._running else ():
                told = (o.status, o.summary)
                if self._self_told.get(o.check, ("", "")) != told:  # changes only (and once at start)
                    self._self_told[o.check] = told
                    obs.append(o)
            if self.remediation is not None and self.remediation.enabled:
                obs += self.remediation.observations(now)  # remediation.breaker
            return obs

        await self._step([], now, observe=observe)

    def _failing_channels(self) -> set[str]:
        return {c for p in self.self_status.problems if p.check == NOTIFY for c in p.channels}

    def readings(self, now: float) -> Readings:
        """What the collector knows about its own pipeline and notifications now."""
        st, d = self.ingest_stats(), self.deliverer
        return Readings(
            now=now,
            nats_connected=self.nats_connected(),
            postgres_down_since=st.db_down_since,
            writing_since=st.writing_since,
            unjudged_since=st.unjudged_since,
            last_commit_lag_s=st.last_commit_lag_s,
            consumer_pending=st.consumer_pending,
            notify_backlog=d.backlog(),
            channel_failed_at={n: s.last_failed_at for n, s in d.stats.items() if s.last_failed_at},
            channel_sent_at={n: s.last_sent_at for n, s in d.stats.items() if s.last_sent_at},
            drained_below=self.batch,
            last_commit_at=st.last_commit_at,
            last_newest_lag_s=st.last_newest_lag_s,
        )

    async def _step(
        self,
        obs: list[Observation],
        now: float,
        commands: Sequence[Command] = (),
        observe: Callable[[], list[Observation]] | None = None,
    ) -> None:
        """Judge (under the step lock), then write (under the write lock): a step waits for
        the judging of the step before it, never for its write (an XID judged on the fast
        path while an ingest batch's changes are being written is paged at once). The first
        notices of event-class criticals are handed to their channels as soon as they are
        judged, under the delivery key of their outbox row, and written with their step
        (``sent``, ``failed`` or ``pending`` until the delivery ends), as fail-open sends
        them: a page never waits for PostgreSQL's commit.

        ``observe`` changes the health state and gives its observations: called under the step
        lock, so that the health state and the alert changes collected (:attr:`_unsaved`) always
        go together, without an await between them. A write (:meth:`_flush`) takes both at one
        point: a health snapshot written with its alert changes records as judged only frames
        whose alert changes are in that write or an earlier one (docs/operations.md)."""
        async with self._lock:
            if observe is not None:
                obs = observe()
            t = time.perf_counter()
            fleet = self._fleet()
            if fleet is not None and self.provider_totals is not None:
                totals: Mapping[str, int] | None = self.provider_totals()  # every member's hosts
            else:
                totals = self.health.provider_hosts() if obs else None
            out = self.engine.evaluate(self.alerts_state, obs, now, commands, totals, fleet)
            self.counts["evaluations"] += 1
            self.counts["observations"] += len(obs)
            self._collect(out, obs)
            if self._urgent:
                # not in a collector group: a page sent before the commit by a member that dies
                # would be judged again by the taker and sent under another delivery id
                if self.scope is None:
                    self._send_early(set(self._urgent))
                self._urgent.clear()
            self.seconds["alerts"] += time.perf_counter() - t
        async with self._write_lock:
            t1 = time.perf_counter()
            await self._persist(now)
            self.seconds["persist"] += time.perf_counter() - t1

    def _fleet(self) -> Fleet | None:
        """A group member's: the providers it judges provider-wide, the others' alerts and
        their open provider-wide incidents."""
        if self.scope is None or self.fleet_view is None:
            return None
        incidents = {
            i.provider: i for i in self.fleet_view.incidents() if i.host is None and i.closed_at is None
        }
        alerts = {a.fingerprint: a for a in self.fleet_view.alerts()}
        return Fleet(self.judges or self.scope.judges, alerts, incidents, HANDOFF)

    def _told_now(self) -> dict[str, tuple[dict[str, str], dict[str, float]]]:
        return {
            i.id: (dict(i.covered), dict(i.covered_at))
            for i in self.alerts_state.incidents.values()
            if i.host is None
        }

    def committed_incident(self, inc: Incident) -> Incident:
        """``inc`` as the fleet view publishes it: a provider incident says it told (covered)
        only what its committed notifications told (a member holding an alert for it marks it
        told on that word: a notification not committed could be lost with this member)."""
        if inc.host is not None:
            return inc
        covered, at = self._committed.get(inc.id, ({}, {}))
        return dataclasses.replace(inc, covered=dict(covered), covered_at=dict(at))

    def pg_down(self) -> bool:
        """PostgreSQL is known unreachable (an alerting write or the ingest failed, not since ok)."""
        return self._persist_down_since is not None or self.ingest_stats().db_down_since is not None

    async def _persist(self, now: float) -> None:
        """Write what changed, then deliver it. Fail-open: while PostgreSQL is down the step's
        deliveries go out at once from memory ("early", recorded in the spool) and the write is
        retried at most every tick, never holding up judging for long (``persist_timeout``).
        A step that changed nothing returns at once (no write task: an ingest batch is judged in
        many small steps, each otherwise a turn of the event loop more)."""
        down = self.pg_down()
        hist = self.health.history
        if (
            not down
            and self._unsaved.empty()
            and not self._early_landed
            and not hist.dirty
            and not hist.deleted
        ):
            return
        if down and self.monotonic() - self._persist_tried < self.settings.tick:
            self._send_early()
            return
        self._persist_tried = self.monotonic()
        try:
            await asyncio.wait_for(self._flush_all(), self.settings.persist_timeout)
        except FencedError as e:  # another member holds these buckets now: stop using them
            log.warning("%s: their changes are not written here", e)
            self.on_fenced(e.buckets)
            return
        except db.ERRORS + (TimeoutError,) as e:  # kept in memory, written by a later step
            self.persist_errors += 1
            if self._persist_down_since is None:
                self._persist_down_since = now
                log.warning(
                    "alert state not persisted, will retry; delivering from memory: %s", str(e) or repr(e)
                )
            self._send_early()
            return
        if self._persist_down_since is not None:
            log.info("alert state persisted again (PostgreSQL back)")
        self._persist_down_since = None

    async def _flush_all(self) -> None:
        await self._flush()
        await self._save_history()

    def _send_early(self, only: Collection[str] | None = None) -> None:
        """Hand the unsaved deliveries (``only`` those keys: event-class criticals) to their
        channels now, each once, recorded when the step is written (see outbox, fail-open)."""
        rows = []
        for channel, key, payload in self._unsaved.deliveries:
            if key not in self._early and (only is None or key in only):
                self._early[key] = None  # in flight
                self._early_open += 1
                rows.append(OutboxRow(0, channel, key, payload))
        if rows:
            if only is None:
                self.counts["early_deliveries"] += len(rows)
            self.deliverer.submit(rows)

    def _at_once(self, n: Notification, alert: Alert | None) -> bool:
        """The first notice of an event-class critical, on its own or in its incident's."""
        event_class = self.engine.corr.event_class
        if n.kind == N_FIRING:
            return alert is not None and event_class(alert)
        if n.kind in (N_PROVIDER, N_UPDATE):
            by_fp = self.alerts_state.by_fp
            return any(fp in by_fp and event_class(by_fp[fp]) for fp in n.alerts)
        return False

    def _early_done(self, row: OutboxRow, outcome: DeliveryOutcome) -> None:
        """An early delivery ended: kept (and spooled) until PostgreSQL has it."""
        self.spool.append(row, outcome)
        if row.key in self._early:
            self._early[row.key] = outcome
        else:  # its step was written meanwhile (as pending): update that row when possible
            self._early_landed.append((row, outcome))

    def _collect(self, out: Outcome, obs: Iterable[Observation]) -> None:
        st, ch = self.alerts_state, Changes()
        self.counts["transitions"] += len(out.transitions)
        if out.transitions and self.remediation is not None and self.remediation.enabled:
            self.remediation.kick()
        self.counts["notifications"] += len(out.notifications)
        fps = {t.fingerprint for t in out.transitions}
        fps.update(n.fingerprint for n in out.notifications if n.fingerprint)
        fps.update(fp for n in out.notifications for fp in n.alerts)  # told by an incident
        for fp in fps:
            a = st.by_fp.get(fp)
            if a is not None:
                ch.alerts[fp] = a
        by_fp = st.by_fp
        ch.deleted = {fp for fp in self._saved_fps if fp not in by_fp}  # retired after retention
        ch.transitions = list(out.transitions)
        by_name = {c.name: c for c in self.channels.all}
        failing = self._failing_channels()
        for n in out.notifications:
            alert = st.by_fp.get(n.fingerprint) if n.fingerprint else None
            at_once = self._at_once(n, alert)
            for name in n.channels:
                c = by_name.get(name)
                if c is None or (n.rule == NOTIFY and name in failing):
                    continue  # "channel X is failing" is told on the other channels
                p = payload_of(n, alert, name)
                if c.wants(p):
                    key = delivery_key(n, name)
                    ch.deliveries.append((name, key, p))
                    if at_once:
                        self._urgent.append(key)
        for inc in st.incidents.values():
            sig = _sig(inc)
            if self._incident_sig.get(inc.id) != sig:
                ch.incidents[inc.id] = inc
                for fp in inc.pending:  # marked as told by the incident's next notification
                    a = st.by_fp.get(fp)
                    if a is not None:
                        ch.alerts[fp] = a
        if len(self._incident_sig) > len(st.incidents):  # incidents the engine retired
            for iid in [i for i in self._incident_sig if i not in st.incidents]:
                del self._incident_sig[iid]
        sig = self._engine_signature()
        if sig != self._engine_sig:
            ch.engine = {
                "open_incidents": dict(st.open_incidents),
                "hosts": {p: list(h) for p, h in st.hosts.items()},
                "active_silences": list(st.active_silences),
            }
        self._unsaved.merge(ch)
        self._publish_health(obs)

    def _engine_signature(self) -> tuple[Any, ...]:
        st = self.alerts_state
        return (
            sum(len(h) for h in st.hosts.values()),
            tuple(sorted(st.open_incidents.items())),
            tuple(st.active_silences),
        )

    async def _flush(self, health: bool = False) -> None:
        """Write the changes collected (under the write lock). ``ch`` and, in a collector group,
        the health snapshot written with it are taken at one point, with no step judged halfway
        (:meth:`_step`): the store takes the snapshot before its first await. With ``health``
        (a group's snapshot) the health snapshots of every bucket held are written with them."""
        ch = self._unsaved
        if (ch.empty() and not self._early_landed and not health) or not self.store.available:
            return
        self._unsaved = Changes()  # steps judged while this is written collect their own
        told = self._told_now() if self.scope is not None else {}  # (taken with ch: no await between)
        early = dict(self._early)
        landed, self._early_landed = self._early_landed, []
        try:
            rows = await self.store.save(ch, early, landed, health=health)
        except BaseException:
            self._early_landed[:0] = landed
            ch.merge(self._unsaved)  # kept, with what was judged meanwhile after it
            self._unsaved = ch
            raise
        self._committed.update(told)
        if len(self._committed) > len(self.alerts_state.incidents):
            for iid in [i for i in self._committed if i not in self.alerts_state.incidents]:
                del self._committed[iid]
        self._early_open -= sum(1 for o in early.values() if o is not None) + len(landed)
        for key, outcome in early.items():
            now_known = self._early.pop(key, None)
            if outcome is None and now_known is not None:  # ended while the row was being written
                self._early_landed.append((_early_row(ch, key), now_known))
        if self._early_open <= 0 and not self._early_landed:
            self._early_open = 0
            self.spool.clear()  # PostgreSQL has every early delivery and its outcome
        self._saved_fps |= set(ch.alerts)
        self._saved_fps -= ch.deleted
        self._engine_sig = self._engine_signature()
        for inc in ch.incidents.values():
            opened = inc.id not in self._incident_sig
            self._incident_sig[inc.id] = _sig(inc)
            change = "opened" if opened else "closed" if inc.closed_at is not None else "updated"
            self.broadcaster.publish(
                {
                    "type": "incident",
                    "change": change,
                    "provider": inc.provider,
                    "host": inc.host,
                    "incident": self.views.incident_view(inc, self.alerts_state.by_fp),
                }
            )
        self.deliverer.submit(rows)
        for t in ch.transitions:
            a = self.alerts_state.by_fp.get(t.fingerprint)
            self.broadcaster.publish(
                {
                    "type": "alert",
                    "kind": t.kind,
                    "provider": t.labels.get("provider"),
                    "host": t.labels.get("host"),
                    "severity": t.severity,
                    "alert": self.views.alert_view(a) if a is not None else None,
                }
            )
            if self.notify.nats:
                await self.nats.publish_transition(t)

    async def _save_history(self) -> None:
        """Write the GPU fault history the health engine changed (rare: inventories of tracked
        boards, fatal XIDs, expiry), merged with what other writers stored (a collector group's
        members each hold the fleet's history), and take their fatal XIDs of those boards in;
        on failure the changes are kept for the next step."""
        hist = self.health.history
        if (not hist.dirty and not hist.deleted) or not self.store.available:
            return
        changed, gone = hist.take_changes()
        try:
            written = await self.store.save_history(
                changed, gone, self.clock() - self.health_engine.config.gpu.rma_history
            )
        except BaseException:
            for b in changed:
                hist.dirty.setdefault(b.board, None)
            for name, known in gone:
                hist.deleted.setdefault(name, known)
            raise
        hist.absorb(written)  # what another writer (a group member) recorded counts here too

    def _publish_health(self, obs: Iterable[Observation]) -> None:
        hosts = {o.labels.get("host", "") for o in obs}
        for name in hosts:
            hs = self.health.hosts.get(name)
            if hs is None:
                continue
            status = host_health(hs).status
            old = self._host_status.get(name)
            if status != old:
                self._host_status[name] = status
                self.broadcaster.publish(
                    {"type": "health", "provider": hs.provider, "host": name, "severity": status,
                     "status": status, "previous": old}
                )  # fmt: skip

    async def save_health(self) -> None:
        """Write the health snapshot. In a collector group, with the alert changes not written
        yet, in one transaction behind the fencing check (:meth:`_flush`): a snapshot never
        records a frame as judged while the alert changes it caused are not written (a taker
        restoring it would not judge the frame's copy again: an XID never paged)."""
        if not self.store.available:
            return
        if self.scope is None:
            await self.store.save_health(self.health, self.health_engine.healthy_for)
            return
        async with self._write_lock:  # (bounded as a step's write: steps wait for this lock)
            try:
                await asyncio.wait_for(self._flush(health=True), self.settings.persist_timeout)
            except FencedError as e:  # another member holds these buckets now: stop using them
                log.warning("%s: their changes and health are not written here", e)
                self.on_fenced(e.buckets)

    # ------------------------------------------------------------------ reads and commands (the API)

    def host_health(self, host: str) -> HostHealth | None:
        if self.fleet_view is not None and (hh := self.fleet_view.host(host)) is not None:
            return hh
        hs = self.health.hosts.get(host)
        return host_health(hs) if hs is not None else None

    def list_alerts(self, **query: Unpack[AlertQuery]) -> list[Alert]:
        """Newest first; ``state`` one of :data:`collector.alerts.model.ALERT_STATES`."""
        state, provider = query.get("state"), query.get("provider")
        host, severity = query.get("host"), query.get("severity")
        if state is not None and state not in ALERT_STATES:
            raise ConfigError("state", f"expected one of {', '.join(ALERT_STATES)}, got {state!r}")
        out = []
        for a in self._all_alerts():
            if provider is not None and a.labels.get("provider") != provider:
                continue
            if host is not None and a.labels.get("host") != host:
                continue
            if severity is not None and a.severity != severity:
                continue
            if state is not None and not _in_state(a, state):
                continue
            out.append(a)
        out.sort(key=lambda a: max(a.started_at, a.resolved_at or 0.0), reverse=True)
        return out

    def open_alerts(self) -> list[AlertView]:
        """The alerts not resolved, as remediation plans over them."""
        return [
            AlertView(a.fingerprint, a.episode, a.rule, a.labels, a.severity, a.action, a.state)
            for a in self.alerts_state.by_fp.values()
            if a.state != "resolved"
        ]

    def _all_alerts(self) -> Iterable[Alert]:
        """This collector's alerts, and in a group those of the other members' buckets."""
        yield from self.alerts_state.alerts.values()
        if self.fleet_view is not None:
            yield from self.fleet_view.alerts()

    def _by_fp(self) -> Mapping[str, Alert]:
        if self.fleet_view is None:
            return self.alerts_state.by_fp
        return {**{a.fingerprint: a for a in self.fleet_view.alerts()}, **self.alerts_state.by_fp}

    def get_alert(self, fingerprint: str) -> Alert | None:
        a = self.alerts_state.by_fp.get(fingerprint)
        if a is None and self.fleet_view is not None:
            a = self.fleet_view.alert(fingerprint)
        return a

    def inhibited_by_root(self) -> dict[str, list[Alert]]:
        """Root fingerprint -> the pending or firing alerts it inhibits."""
        out: dict[str, list[Alert]] = {}
        for a in self._all_alerts():
            if a.inhibited_by is not None and a.state != "resolved":
                out.setdefault(a.inhibited_by, []).append(a)
        return out

    def incidents(self, *, open_only: bool = False) -> list[Incident]:
        """Newest first."""
        every = list(self.alerts_state.incidents.values())
        if self.fleet_view is not None:
            every += self.fleet_view.incidents()
        incs = [i for i in every if not open_only or i.closed_at is None]
        incs.sort(key=lambda i: i.opened_at, reverse=True)
        return incs

    def list_incidents(self, *, open_only: bool = False) -> list[dict[str, Any]]:
        by_fp = self._by_fp()
        return [self.views.incident_view(i, by_fp) for i in self.incidents(open_only=open_only)]

    def get_incident(self, iid: str) -> dict[str, Any] | None:
        inc = self.alerts_state.incidents.get(iid)
        if inc is None and self.fleet_view is not None:
            inc = self.fleet_view.incident(iid)
        return self.views.incident_view(inc, self._by_fp()) if inc is not None else None

    def silences(self) -> tuple[list[Silence], list[Silence]]:
        """The configured silences and those added through the API."""
        return list(self.engine.config.silences), list(self.alerts_state.silences.values())

    async def ack_incident(
        self, iid: str, by: str, until: float | None = None, comment: str = ""
    ) -> dict[str, Any]:
        """Acknowledge an open incident and its members; ``KeyError`` if unknown or closed."""
        inc = self.alerts_state.incidents.get(iid)
        if (inc is None or inc.closed_at is not None) and self.remote is not None:
            return await self.remote.ack_incident(iid, by, until, comment)  # another member's
        if inc is None or inc.closed_at is not None:
            raise KeyError(iid)
        await self._step([], self.clock(), [AckIncident(iid, by, until, comment)])
        await self._ack_members(AckIncident(iid, by, until, comment))
        return self.views.incident_view(inc, self.alerts_state.by_fp)

    async def _ack_members(self, cmd: AckIncident) -> None:
        """A collector group: the incident acknowledged here (its holder) asks the owners of its
        members on the other members' hosts (the alerts it folded, known from the fleet view) to
        acknowledge them as its members, as one collector acknowledges every member at once."""
        inc = self.alerts_state.incidents.get(cmd.incident)
        if self.remote is None or self.fleet_view is None or inc is None or inc.closed_at is not None:
            return
        members: dict[str, Mapping[str, str] | None] = {}
        for fp in inc.alerts:
            if fp in self.alerts_state.by_fp:
                continue  # its own: acknowledged by the command
            a = self.fleet_view.alert(fp)
            if a is None:
                members[fp] = None  # (not in the view now: its labels are read from PostgreSQL)
            elif a.state != "resolved" and a.ack_by is None:
                members[fp] = a.labels
        if members:
            await self.remote.ack_members(inc.id, members, cmd.by, cmd.until, cmd.comment)

    async def ack(
        self, fingerprint: str, by: str, until: float | None = None, comment: str = ""
    ) -> dict[str, Any]:
        """Acknowledge (stops escalation) the alert and the alerts it inhibits (folded under
        it: one Acknowledge for the group); raises ``KeyError`` for an unknown fingerprint."""
        if fingerprint not in self.alerts_state.by_fp:
            if self.remote is not None:  # a collector group: another member owns its host
                return await self.remote.ack(fingerprint, by, until, comment)
            raise KeyError(fingerprint)
        folded = self.inhibited_by_root().get(fingerprint, [])
        cmds = [Ack(x, by, until, comment) for x in (fingerprint, *(f.fingerprint for f in folded))]
        await self._step([], self.clock(), cmds)
        a = self.alerts_state.by_fp[fingerprint]
        return self.views.folded_view(a, self.inhibited_by_root().get(fingerprint, []))

    async def add_silence(
        self, matchers: list[str], starts_at: float | None, ends_at: float, author: str, comment: str
    ) -> Silence:
        """Raises :class:`ConfigError` naming the bad matcher (``matchers[i]``)."""
        if not matchers:
            raise ConfigError("matchers", "a silence needs at least one matcher")
        parsed = tuple(parse_matcher(m, f"matchers[{i}]") for i, m in enumerate(matchers))
        starts = self.clock() if starts_at is None else starts_at
        if ends_at <= starts:
            raise ConfigError("ends_at", "must be after starts_at")
        s = Silence(f"api-{uuid.uuid4().hex[:12]}", parsed, starts, ends_at, author, comment)
        await self.store.save_silence(s)
        await self._step([], self.clock(), [AddSilence(s)])
        if self.remote is not None:
            await self.remote.notify()  # every member of the group applies it now
        return s

    async def expire_silence(self, silence_id: str) -> bool:
        if silence_id not in self.alerts_state.silences:
            return self.remote is not None and await self.remote.expire_silence(silence_id)
        await self.store.expire_silence(silence_id)
        await self._step([], self.clock(), [ExpireSilence(silence_id)])
        if self.remote is not None:
            await self.remote.notify()
        return True

    async def apply(self, commands: Sequence[Command]) -> bool:
        """A collector group's commands (silences, acknowledgements received by another member,
        :mod:`collector.group.commands`): applied in one step; True when the step is written."""
        await self._step([], self.clock(), commands)
        for cmd in commands:  # an incident's: its members on the others' hosts (before it is done)
            if isinstance(cmd, AckIncident):
                await self._ack_members(cmd)
        return self._unsaved.empty() and not self.pg_down()

    def answer(self, kind: str, target: str) -> dict[str, Any] | None:
        """What the API answers for an acknowledgement applied here for another member."""
        if kind == "ack":
            a = self.alerts_state.by_fp.get(target)
            return (
                self.views.folded_view(a, self.inhibited_by_root().get(target, [])) if a is not None else None
            )
        inc = self.alerts_state.incidents.get(target)
        return self.views.incident_view(inc, self.alerts_state.by_fp) if inc is not None else None

    def self_report(self) -> dict[str, Any]:
        """The collector's own health for ``/readyz``: problems, backlog, heartbeat."""
        own = self.self_status.as_dict()
        own["notify_backlog"] = self.deliverer.backlog()
        hb = self.heartbeat
        own["heartbeat"] = {"configured": hb.url is not None, "sent": hb.sent, "failures": hb.failures,
                            "last_sent_at": hb.last_sent_at}  # fmt: skip
        return own

    @property
    def stats(self) -> dict[str, Any]:
        """Figures for ``/metrics``: engine counts, alerts by state/severity, channels."""
        by: dict[str, int] = {}
        for a in self.alerts_state.alerts.values():
            k = f"{a.state}/{a.severity}"
            by[k] = by.get(k, 0) + 1
        d = self.deliverer
        return {
            **self.counts,
            "seconds": dict(self.seconds),
            "alerts": by,
            "channels": {n: s.as_dict() for n, s in d.stats.items()},
            "outbox_backlog": d.backlog(),
            "dead_letters": d.dead_letters,
            "persist_errors": self.persist_errors,
            "nats_transition_errors": self.nats.errors,
            "stream_subscribers": self.broadcaster.subscribers,
            "self": self.self_status.as_dict(),
            "heartbeats_sent": self.heartbeat.sent,
            "heartbeat_failures": self.heartbeat.failures,
            "remediation": self.remediation.stats() if self.remediation is not None else {},
        }


def _early_row(ch: Changes, key: str) -> OutboxRow:
    for channel, k, payload in ch.deliveries:
        if k == key:
            return OutboxRow(0, channel, k, payload)
    raise KeyError(key)


def _sig(inc: Incident) -> tuple[Any, ...]:
    return (
        inc.last_activity, inc.closed_at, len(inc.alerts), len(inc.hosts), inc.notified, len(inc.told),
        inc.updates, len(inc.pending), inc.update_due, len(inc.covered), inc.ack_by,
    )  # fmt: skip


def _in_state(a: Alert, state: str) -> bool:
    if state == "acknowledged":
        return a.ack_by is not None
    if state == "silenced":
        return bool(a.silenced_by)
    if state == "inhibited":
        return a.inhibited_by is not None
    return a.state == state
