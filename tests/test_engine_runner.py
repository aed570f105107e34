"""The engine runner (collector.alerting.Alerting) without servers: an in-memory store, a
recording channel and a fixed clock, the way the pure engines are tested. Frames and ticks
go in; what the store is asked to write, what the channel is handed and what the live
stream publishes come out."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from typing import Any

import pytest

from collector.alerting import Alerting
from collector.alerts import Silence
from collector.api import views
from collector.config import CollectorConfig, load_collector_config
from collector.health import HealthState
from collector.health.codec import health_snapshot
from collector.health.history import BoardHistory
from collector.notify.outbox import Early, Landed, OutboxRow
from collector.notify.stream import Broadcaster
from collector.store.alerts import Changes, Restored
from tests.support.records import event
from tests.support.runner import CONFIG, Recorder, build_runner

T0 = 1_800_000_000.0


class MemoryStore:
    """The runner's store and the deliverer's outcome store, in memory; ``down`` makes every
    write fail as PostgreSQL does when it is unreachable."""

    def __init__(self) -> None:
        self.available = True
        self.down = False
        self.alerts: dict[str, dict[str, Any]] = {}
        self.transitions: list[tuple[str, str]] = []  # (rule, kind)
        self.outbox: dict[str, tuple[OutboxRow, str]] = {}  # key -> (row, status)
        self.health: dict[str, Any] | None = None
        self.silences: dict[str, Silence] = {}
        self.forgotten: set[str] = set()
        self.next_id = 1

    def _check(self) -> None:
        if self.down:
            raise OSError("connection refused")

    async def restore(self) -> Restored:
        pending = [row for row, status in self.outbox.values() if status == "pending"]
        return Restored({"alerts": list(self.alerts.values())}, self.health, pending, set(self.forgotten))

    async def save(
        self, ch: Changes, early: Early, landed: Landed = (), *, health: bool = False
    ) -> list[OutboxRow]:
        self._check()
        from collector.alerts.model import plain

        for fp, a in ch.alerts.items():
            self.alerts[fp] = plain(a)
        self.transitions += [(t.rule, t.kind) for t in ch.transitions]
        rows = []
        for channel, key, payload in ch.deliveries:
            if key in self.outbox:
                continue
            o = early.get(key)
            row = OutboxRow(0 if key in early else self.next_id, channel, key, payload)
            self.next_id += 1
            self.outbox[key] = (row, o.status if o is not None else "pending")
            if key not in early:
                rows.append(row)
        await self.record_early(landed)
        return rows

    async def record_early(self, done: Landed) -> None:
        self._check()
        for row, o in done:
            self.outbox[row.key] = (row, o.status)

    async def save_health(self, state: HealthState, healthy_for: int) -> None:
        self._check()
        self.health = health_snapshot(state, healthy_for)

    async def load_history(self) -> list[BoardHistory]:
        self._check()
        return []

    async def save_history(
        self, changed: Sequence[BoardHistory], gone: Sequence[tuple[str, float]], cutoff: float = 0.0
    ) -> list[BoardHistory]:
        self._check()
        return list(changed)

    async def save_silence(self, s: Silence) -> None:
        self._check()
        self.silences[s.id] = s

    async def expire_silence(self, sid: str) -> None:
        self._check()
        self.silences.pop(sid, None)

    async def mark_forgotten(self, host: str) -> None:
        self._check()
        self.forgotten.add(host)

    async def clear_forgotten(self, hosts: Collection[str]) -> None:
        self._check()
        self.forgotten -= set(hosts)

    async def forgotten_hosts(self) -> set[str]:
        self._check()
        return set(self.forgotten)

    async def mark_sent(self, row_id: int, attempts: int) -> None:
        self._mark(row_id, "sent")

    async def mark_failed(self, row: OutboxRow, attempts: int, error: str) -> None:
        self._mark(row.id, "failed")

    def _mark(self, row_id: int, status: str) -> None:
        for key, (row, _) in list(self.outbox.items()):
            if row.id == row_id:
                self.outbox[key] = (row, status)

    def statuses(self) -> list[str]:
        return sorted(status for _, status in self.outbox.values())


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def runner(
    tmp_path: Any, store: MemoryStore, clock: Clock, **extra: Any
) -> tuple[Alerting, Recorder, Broadcaster]:
    path = tmp_path / "collector.toml"
    path.write_text(CONFIG)
    cfg: CollectorConfig = load_collector_config(path, env={})
    return build_runner(cfg, store, clock=clock, monotonic=clock, **extra)


async def test_an_xid_fires_is_written_then_delivered_and_published(tmp_path: Any) -> None:
    store, clock = MemoryStore(), Clock(T0)
    al, channel, broadcaster = runner(tmp_path, store, clock)
    sub = broadcaster.subscribe()
    await al.start()
    try:
        await al.on_frames([event("r-01", 1, T0 - 1)])
        await asyncio.wait_for(al.deliverer.idle(), 10)
    finally:
        await al.stop()
    (a,) = al.list_alerts(state="firing")
    assert (a.rule, a.labels["host"], a.labels["xid"]) == ("gpu.xid", "r-01", "79")
    assert a.fired_at == T0  # the runner's clock, not the wall clock
    assert store.alerts[a.fingerprint]["state"] == "firing"
    assert ("gpu.xid", "firing") in store.transitions
    assert [p["fingerprint"] for p in channel.payloads] == [a.fingerprint]
    assert store.statuses() == ["sent"]  # handed over at once (event class), recorded as sent
    events = []
    while not sub.queue.empty():
        events.append(sub.queue.get_nowait())
    alert_events = [e for e in events if e["type"] == "alert"]
    assert alert_events
    assert alert_events[-1]["alert"] == views.alert_view(a)
    assert store.health is not None
    assert "r-01" in store.health["hosts"]  # saved at stop


class GatedStore(MemoryStore):
    """A store whose writes wait until ``gate`` is set (PostgreSQL slow to commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.writes = 0  # writes begun

    async def save(
        self, ch: Changes, early: Early, landed: Landed = (), *, health: bool = False
    ) -> list[OutboxRow]:
        self.writes += 1
        await self.gate.wait()
        return await super().save(ch, early, landed, health=health)


async def test_event_class_criticals_are_paged_before_their_step_is_written(tmp_path: Any) -> None:
    """An XID is handed to its channel as soon as it is judged, not after the write of its
    step, nor after the write of the step before it (an ingest batch's, still committing);
    a threshold alert's page still waits for its write. Each is recorded once, as sent."""
    from shared.frames import replace
    from tests.support.records import sample
    from tests.support.wait import until

    store, clock = GatedStore(), Clock(T0)
    al, channel, _ = runner(tmp_path, store, clock)
    await al.start()
    try:
        hot = sample("r-05", 1, T0 - 1, gpus=1)
        hot = replace(hot, gpus=(replace(hot.gpus[0], temp_c=99.0),))
        first = asyncio.create_task(al.on_frames([hot]))  # gpu.temperature fires (for = 0s)
        await until(lambda: store.writes == 1, what="the first step's write begun")
        second = asyncio.create_task(al.on_frames([event("r-04", 1, T0 - 1)]))
        await until(lambda: len(channel.payloads) == 1, what="the XID paged")
        assert channel.payloads[0]["rule"] == "gpu.xid"
        assert store.outbox == {}  # nothing written yet: the page waited for no write
        assert not first.done()
        assert not second.done()
        store.gate.set()
        await asyncio.gather(first, second)
        await asyncio.wait_for(al.deliverer.idle(), 10)
        assert sorted(p["rule"] for p in channel.payloads) == ["gpu.temperature", "gpu.xid"]
        clock.now += 1
        await al.tick(clock.now)  # (an outcome that landed after its step was written is recorded)
        assert store.statuses() == ["sent", "sent"]
        assert len(channel.payloads) == 2  # and nothing sent twice
    finally:
        store.gate.set()
        await al.stop()


async def test_an_event_is_judged_between_the_chunks_of_a_large_ingest_batch(tmp_path: Any) -> None:
    """An event on the fast path that arrives while a batch of 3 chunks' worth of samples is
    being judged is judged (and paged) after the chunk in progress, not after the batch."""
    from collector.alerting import JUDGE_CHUNK
    from tests.support.records import sample

    store, clock = MemoryStore(), Clock(T0)
    al, channel, _ = runner(tmp_path, store, clock)
    begun = asyncio.Event()
    al.on_judged = lambda frames, observed: begun.set()  # (told after each chunk judged)
    hosts_at_page: list[int] = []  # hosts judged when the XID's page was handed over
    submit = al.deliverer.submit

    def noting(rows: Sequence[OutboxRow]) -> None:
        if any(r.payload.get("rule") == "gpu.xid" for r in rows):
            hosts_at_page.append(len(al.health.hosts))
        submit(rows)

    al.deliverer.submit = noting  # type: ignore[method-assign]
    await al.start()
    try:
        n = 3 * JUDGE_CHUNK
        batch = [sample(f"b-{i:04d}", 1, T0 - 1, gpus=1) for i in range(n)]
        judged = asyncio.create_task(al.on_frames(batch))
        await begun.wait()  # the batch is being judged
        await al.judge_early(event("x-01", 1, T0 - 1))
        await judged
        await asyncio.wait_for(al.deliverer.idle(), 10)
    finally:
        await al.stop()
    assert [p["rule"] for p in channel.payloads] == ["gpu.xid"]
    assert len(al.health.hosts) == n + 1
    assert hosts_at_page == [JUDGE_CHUNK + 1]  # the first chunk's hosts and its own


async def test_while_the_store_is_down_pages_go_out_from_memory_and_land_later(tmp_path: Any) -> None:
    store, clock = MemoryStore(), Clock(T0)
    al, channel, _ = runner(tmp_path, store, clock)
    await al.start()
    try:
        store.down = True
        await al.on_frames([event("r-02", 1, T0 - 1)])
        await asyncio.wait_for(al.deliverer.idle(), 10)
        assert len(channel.payloads) == 1  # fail-open: delivered before it was written
        assert al.pg_down()
        assert al.persist_errors == 1
        assert store.outbox == {}
        store.down = False
        clock.now += al.settings.tick + 1  # the write is tried again on the next step
        await al.tick(clock.now)
        assert not al.pg_down()
        assert store.statuses() == ["sent"]  # the early delivery, recorded with its outcome
        assert len(channel.payloads) == 1  # and not sent twice
    finally:
        await al.stop()


async def test_time_driven_steps_run_at_the_given_now(tmp_path: Any) -> None:
    """Ticks take ``now``: a host that stops reporting goes unreachable when its frames are
    older than ``stale_after``, by the runner's clock, with no waiting."""
    from tests.support.records import sample

    store, clock = MemoryStore(), Clock(T0)
    al, _, _ = runner(tmp_path, store, clock)
    await al.start()
    try:
        await al.on_frames([sample("r-03", 1, T0)])
        assert al.list_alerts() == []
        stale_after = al.health_engine.config.health.stale_after
        clock.now = T0 + stale_after + 60
        await al.tick(clock.now)
        assert {a.rule for a in al.list_alerts(state="firing")} >= {"host.unreachable"}
    finally:
        await al.stop()


async def test_hosts_whose_frames_wait_in_a_lagging_ingest_are_not_stale(tmp_path: Any) -> None:
    """A 1 s host is stale after 3 s without a judged frame; an ingest lagging by more (frames
    waiting in the batch being written or judged, or in JetStream) is not the hosts' silence,
    well before ``[selfcheck] ingest_lag`` calls the pipeline impaired. Judged as of the oldest
    frame not judged yet, a host whose frames wait is not stale; once the ingest has caught up
    and nothing came from it, it is. (At 1,000 hosts on a loaded machine the lag made every
    host "unreachable": provider incidents, their GPU faults inhibited and never paged.)"""
    from collector.ingest import IngestStats
    from tests.support.records import sample

    stats = IngestStats()
    store, clock = MemoryStore(), Clock(T0)
    al, _, _ = runner(tmp_path, store, clock, ingest_stats=lambda: stats)
    await al.start()
    try:
        await al.on_frames([sample("r-06", 1, T0)])
        limit = al.health_engine.stale_limit(al.health.hosts["r-06"])
        clock.now = T0 + limit + 5
        stats.unjudged_since = T0 + 1  # its next frame is in the batch being written: lag limit + 4 s
        await al.tick(clock.now)
        assert al.list_alerts() == []
        stats.unjudged_since = None  # judged up to T0 + 1; JetStream holds more
        stats.consumer_pending, stats.last_commit_at, stats.last_newest_lag_s = 500, clock.now, limit + 4
        await al.tick(clock.now)
        assert al.list_alerts() == []
        stats.consumer_pending = 0  # caught up, and nothing more came from r-06
        await al.tick(clock.now)
        assert "host.unreachable" in {a.rule for a in al.list_alerts(state="firing")}
    finally:
        await al.stop()


async def test_a_host_silent_behind_a_lagging_ingest_is_still_stale(tmp_path: Any) -> None:
    """Behind a 10 s lag a host is judged by when its frames reached the stream, not by when they
    were judged: r-07, whose frames keep coming, is not stale; r-08, whose last frame was
    published at T0 + 12 (judged at T0 + 22), is stale once the stream is judged up to T0 + 18
    (6 s of silence), though that is shorter than the lag (judged by when its frames were judged,
    the lag hid the silence: an 8 s host_down went unreported)."""
    from collector.ingest import IngestStats
    from tests.support.records import sample

    stats = IngestStats()
    store, clock = MemoryStore(), Clock(T0)
    al, _, _ = runner(tmp_path, store, clock, ingest_stats=lambda: stats)
    await al.start()
    try:
        for i in range(19):  # every second, each frame judged 10 s after it was published
            clock.now = T0 + 10 + i
            stats.unjudged_since = stats.last_commit_at = clock.now  # its batch: being judged
            stats.last_newest_lag_s, stats.consumer_pending = 10.0, 900
            frames = [sample("r-07", 1 + i, T0 + i)] + ([sample("r-08", 1 + i, T0 + i)] if i <= 12 else [])
            await al.on_frames(frames)
            stats.unjudged_since = None
            await al.tick(clock.now)
        firing = {a.labels["host"] for a in al.list_alerts(state="firing") if a.rule == "host.unreachable"}
        assert firing == {"r-08"}
    finally:
        await al.stop()


@pytest.mark.parametrize("state", ["nonsense"])
def test_an_unknown_state_filter_is_refused(tmp_path: Any, state: str) -> None:
    from shared.errors import ConfigError

    al, _, _ = runner(tmp_path, MemoryStore(), Clock(T0))
    with pytest.raises(ConfigError, match="state"):
        al.list_alerts(state=state)
