"""Where the collector's parts are built and connected: the only module that knows them all.

:func:`build` makes every part from the configuration, in the order they depend on each
other, and hands each one only what it needs (a store, a deliverer, a clock, a callable);
:attr:`Parts.lifecycle` lists the parts that start and stop, in start order (they stop in
the reverse order). :class:`collector.service.CollectorService` runs that list. To add a
part: build it here, after what it needs, and put it in ``lifecycle`` where it must start.

The data path, as wired here: NATS (JetStream) -> :class:`collector.ingest.Ingest` ->
PostgreSQL (:class:`collector.store.writer.Writer`) -> :meth:`Parts.on_batch` (the fleet
state, then the engine runner :class:`collector.alerting.Alerting`) -> the store
(:class:`collector.store.alerts.PgAlertStore`) -> the deliverer
(:class:`collector.notify.outbox.Deliverer`) -> the channels. The fast event path
(:class:`collector.fastpath.FastEvents`) is the runner's second input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from nats.aio.client import Client as NatsClient

from collector.alerting import Alerting
from collector.alerts import AlertEngine, alert_config_from
from collector.api import views
from collector.api.app import ApiServer
from collector.api.deps import ApiDeps
from collector.config import CollectorConfig
from collector.fastpath import FastEvents
from collector.group.commands import GroupCommands
from collector.group.fleet import FleetView
from collector.group.member import GroupMember, member_name
from collector.group.scope import Scope
from collector.group.share import FleetShare
from collector.group.store import GroupAlertStore, ScopeGate
from collector.health import HealthEngine, health_config_from
from collector.health.live import LiveRollup
from collector.ingest import Ingest
from collector.inventory import ExpectedInventory
from collector.links import Nats, Postgres
from collector.metrics import FleetCollector
from collector.notify import build_channels
from collector.notify.config import notify_config_from, with_channels
from collector.notify.nats import NatsChannel
from collector.notify.outbox import Deliverer, Spool
from collector.notify.repush import AlertmanagerRepush
from collector.notify.stream import Broadcaster
from collector.ratelimit import HostRateLimit
from collector.remediation.config import remediation_config_from
from collector.remediation.service import Remediator
from collector.state import FleetState, load_state
from collector.store.alerts import PgAlertStore
from collector.store.writer import Writer
from shared.frames import Frame
from shared.tasks import cancel_all


class Part(Protocol):
    """Something with a lifecycle: started in order, stopped in reverse order."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class Step:
    """A part made of two callables (for parts whose own API is not start/stop)."""

    name: str
    on_start: Callable[[], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None

    async def start(self) -> None:
        if self.on_start is not None:
            await self.on_start()

    async def stop(self) -> None:
        if self.on_stop is not None:
            await self.on_stop()


class InventoryRefresh:
    """Loads the expected inventory at start, then reloads it every ``[inventory] refresh``."""

    def __init__(self, expected: ExpectedInventory) -> None:
        self.expected = expected
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.expected.reload()
        self._stop.clear()
        self._task = asyncio.create_task(self.expected.run(self._stop), name="inventory")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None


@dataclass(slots=True)
class Parts:
    config: CollectorConfig
    state: FleetState
    postgres: Postgres
    nats: Nats
    writer: Writer
    ingest: Ingest
    expected: ExpectedInventory
    broadcaster: Broadcaster
    live: LiveRollup
    alerting: Alerting
    repush: AlertmanagerRepush
    fast_events: FastEvents
    remediation: Remediator
    api_deps: ApiDeps
    api: ApiServer | None
    lifecycle: list[Part] = field(default_factory=list)  # in start order
    group: GroupMember | None = None  # a collector group member's part (docs/operations.md)
    share: FleetShare | None = None  # a group member's fleet view of the others' buckets

    async def on_batch(self, frames: Sequence[Frame]) -> None:
        """Each committed batch of new frames: into the fleet state, then judged."""
        self.state.apply(frames)
        await self.alerting.on_frames(frames)


def build(config: CollectorConfig, *, api: bool = False) -> Parts:
    """Every part of a collector; ``api``: serve the HTTP API on ``[collector] listen``."""
    raw = config.raw
    health_cfg = health_config_from(raw)
    notify_cfg = notify_config_from(raw)
    c = config.collector

    # connections and the data path
    state = FleetState(health_cfg.health.max_clock_skew)
    # a group member's transactions hold its buckets' fencing rows FOR SHARE: one left open by a
    # stopped process is ended after 3 leases (the takers' raises do not wait for it meanwhile)
    postgres = Postgres(config.postgres, state, idle_in_transaction=3 * c.lease if c.group else None)
    nats = Nats(config)
    writer = Writer(config.postgres, max_skew=state.max_skew)
    ingest = Ingest(config, writer)
    expected = ExpectedInventory(config.inventory.source, config.inventory.refresh, config.inventory.timeout)

    # the engines, their store, the channels and the deliverer
    health_engine = HealthEngine(health_cfg)
    alert_engine = AlertEngine(with_channels(alert_config_from(raw), notify_cfg))
    # a collector group member judges, writes and sends for the buckets it holds only
    member: GroupMember | None = None
    commands: GroupCommands | None = None
    share: FleetShare | None = None
    scope = Scope(c.buckets, lambda b: member is not None and member.owns(b), lambda: _tokens(member))
    store: PgAlertStore = (
        GroupAlertStore(lambda: postgres.pool, scope, c.group_kv)
        if c.group
        else PgAlertStore(lambda: postgres.pool, c.partition)
    )
    nats_channel = NatsChannel(lambda: nats.nc)
    channels = build_channels(notify_cfg, nats_channel)
    deliverer = Deliverer(store, channels.all)
    broadcaster = Broadcaster()

    # the engine runner, and what listens to it
    runner: Alerting  # remediation reads the runner's alerts: bound below
    live = LiveRollup(lambda: runner.health, health_cfg.provider)
    remediation = Remediator(
        lambda: postgres.pool,
        remediation_config_from(raw),
        lambda: runner.open_alerts(),
        lambda fp: views.alert_view(a) if (a := runner.get_alert(fp)) is not None else None,
        lambda: runner.health.provider_hosts(),
    )
    runner = Alerting(
        config,
        health_engine=health_engine,
        alert_engine=alert_engine,
        notify=notify_cfg,
        store=store,
        deliverer=deliverer,
        channels=channels,
        nats=nats_channel,
        broadcaster=broadcaster,
        views=views,
        fleet=state,
        expected_hosts=lambda: expected.hosts,
        ingest_stats=lambda: ingest.stats,
        nats_connected=lambda: nats.connected,
        on_judged=live.mark,
        on_forgotten=live.forget,
        remediation=remediation,
        scope=scope if c.group else None,
        on_fenced=lambda buckets: member.fenced(buckets) if member is not None else None,
    )
    store.health = lambda: (runner.health, runner.health_engine.healthy_for)
    repush = AlertmanagerRepush(
        channels.alertmanagers,
        lambda: runner.alerts_state.alerts.values(),
        config.alerting.alertmanager_resend,
        notify_cfg.external_url,
    )
    if c.group:
        name = member_name(config)
        assert isinstance(store, GroupAlertStore)
        store.member = name  # its outbox rows are claimed as it writes them

        async def gained_hosts(buckets: frozenset[int]) -> None:
            """The GPUs' static facts of the hosts gained (v2 samples leave them out), from
            their newest stored inventories: their frames were another member's until now."""
            pool = postgres.pool
            if pool is None:
                return
            async with pool.acquire() as conn:
                stored = await load_state(conn, max_skew=state.max_skew)
            ingest.static.seed(
                h.inventory for h in stored if h.inventory is not None and scope.bucket(h.host) in buckets
            )

        member = GroupMember(
            config, name, lambda: nats.nc, lambda: postgres.pool, store, runner, lambda: ingest.source,
            gained_hosts,
        )  # fmt: skip
        commands = GroupCommands(member, scope, runner, alert_view=views.alert_view)
        runner.remote = commands  # silences and acknowledgements group-wide, at once
        member.on_regrouped = commands.kick
        store.incidents = lambda: runner.alerts_state.incidents
        deliverer.gate = ScopeGate(scope, lambda: postgres.pool, name, c.group_kv)
        nats.name = f"gpuwarden-collector-{name}"
        runner.self_labels = {"collector": name}
        spool = config.alerting.spool
        runner.spool = Spool(Path(spool) / f"notify-spool-{name}.jsonl" if spool else None)
        # the others' buckets, from their summaries: the API, the rollup and the live stream read it
        # (a bucket is read from the engines once its state is restored here: ``settled``)
        view = FleetView(3 * c.group_refresh, lambda b: b in member.settled and scope.owns(b), scope.bucket)
        share = FleetShare(
            name, c.group_kv, c.group_refresh, lambda: nats.nc, member, scope, view, live,
            lambda: runner.alerts_state, state, broadcaster, runner.committed_incident,
            lambda: runner.forgotten,
        )  # fmt: skip
        view.on_forgotten = runner.forgotten_elsewhere  # the owner's tombstones
        live.remote = runner.fleet_view = view
        # provider-wide incidents are judged over the whole provider (by its bucket's holder)
        runner.provider_totals = lambda: {p: ph.hosts for p, ph in live.current().providers.items()}
        runner.judges = lambda p: scope.judges(p) and scope.bucket(p) in member.settled
    events_nats = Nats(config, "events")  # not queued behind the ingest's fetches (collector.fastpath)
    events_nats.name = f"{nats.name}-events"  # (a group member's name, as the ingest's connection)
    fast_events = FastEvents(
        nats,
        ingest.limits,
        runner.mine,
        runner.judge_early,
        HostRateLimit(c.host_rate, c.host_burst),  # the fast path's own buckets and clock
        enabled=config.alerting.fast_events,
        own=events_nats,
    )

    # the HTTP API
    metrics = FleetCollector(state, live, lambda: runner.health, lambda: ingest.stats, lambda: runner.stats)
    api_deps = ApiDeps(
        config=config,
        fleet=state,
        live=live,
        alerts=runner,
        broadcaster=broadcaster,
        remediation=remediation,
        metrics=metrics,
        ingest_stats=runner.ingest_stats,
        nats_connected=runner.nats_connected,
        pool=store.pool,
        collectors=(share,) if share is not None else (),
    )
    server = ApiServer(api_deps) if api else None

    parts = Parts(
        config, state, postgres, nats, writer, ingest, expected, broadcaster, live, runner, repush,
        fast_events, remediation, api_deps, server, group=member, share=share,
    )  # fmt: skip
    ingest.on_batch = parts.on_batch
    group_setup = (lambda nc: ingest.setup_group(nc, c.buckets, scope.tokens)) if c.group else None
    parts.lifecycle = [
        postgres,  # pool, migrations, partitions; the fleet state rebuilt
        Step("writer", on_stop=writer.close),
        nats,
        Step(
            "ingest", on_start=lambda: _start_ingest(ingest, state, nats, group_setup), on_stop=ingest.close
        ),
        InventoryRefresh(expected),
        runner,  # restores the alert and health state, starts delivering and its timer
        repush,  # stops before the runner closes the channels
        fast_events,  # after the runner: judged frames need its restored state
        remediation,  # after the runner: it plans over restored alerts
    ]
    if member is not None:  # takes buckets (restored by the runner, then consumed); stops first
        parts.lifecycle.append(member)
    if commands is not None:
        parts.lifecycle.append(commands)
    if share is not None:  # publishes the buckets held, keeps the view of the others'
        parts.lifecycle.append(share)
    if server is not None:
        parts.lifecycle.append(server)  # last: requests see a started collector
    return parts


async def _start_ingest(
    ingest: Ingest, state: FleetState, nats: Nats, group: Callable[[NatsClient], Awaitable[None]] | None
) -> None:
    # the GPUs' static facts that v2 samples leave out, from each host's newest stored inventory
    ingest.static.seed(h.inventory for h in state if h.inventory is not None)
    if group is not None:  # a collector group member: the buckets' consumers follow its leases
        await group(_required(nats))
    else:
        await ingest.setup(_required(nats))


def _tokens(member: GroupMember | None) -> dict[int, int]:
    return member.tokens() if member is not None else {}


def _required(nats: Nats) -> NatsClient:
    assert nats.nc is not None, "NATS starts before the ingest"
    return nats.nc
