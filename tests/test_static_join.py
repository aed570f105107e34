"""Schema v2: static GPU facts travel in the inventory and the collector joins them into the
samples; a collector reads v1 and v2 frames alike (through a real NATS and PostgreSQL)."""

from __future__ import annotations

import time

import asyncpg
import nats

from agent.gpu.simulated import SimulatedBackend
from agent.sampler import InventorySchedule, Sequencer, build_inventory, build_sample
from agent.system import SimulatedSystem
from collector.health import HealthEngine
from collector.health.config import ProviderThresholds
from collector.health.live import LiveRollup
from collector.health.model import HealthState
from collector.ingest import Limits, check
from collector.metrics import FleetCollector
from collector.state import FleetState
from collector.static import StaticFacts
from collector.store.writer import Accepted
from gpuwarden.servers import NatsServer
from shared.frames import (
    STATIC_GPU_FIELDS,
    InventoryFrame,
    SampleFrame,
    decode,
    encode,
    encode_v1,
    replace,
    static_facts,
)
from shared.subjects import subject_for
from tests.support.ingest import config, running
from tests.support.wait import until

WIDE = Limits(max_bytes=1 << 20, oldest_ts=0.0, newest_ts=1e11)


def _host(name: str, seed: int = 3) -> tuple[Sequencer, SimulatedBackend, SimulatedSystem, InventorySchedule]:
    seqr = Sequencer(host=name, provider="prov-s")
    backend = SimulatedBackend(8, host=seqr.host, seed=seed)
    backend.open()
    system = SimulatedSystem(host=seqr.host, seed=seed)
    system.open()
    return seqr, backend, system, InventorySchedule()


def test_the_inventory_carries_what_the_samples_leave_out() -> None:
    seqr, backend, system, schedule = _host("st-1")
    gpus = backend.sample()
    full = schedule.due(backend.inventory(), gpus)
    assert full is not None
    inv = build_inventory(seqr, full, system.host_facts())
    sample = build_sample(seqr, interval_s=5.0, gpus=gpus, system=system.sample())
    wire = decode(encode(sample, static=False))
    assert isinstance(wire, SampleFrame)
    assert all(g.uuid == "" and g.temp_slowdown_c is None and g.power_limit_w is None for g in wire.gpus)
    static = StaticFacts()
    assert static.join(decode(encode(inv))) is not None
    joined = static.join(wire)
    assert joined == replace(sample, v=2)  # every GPU whole again, value for value
    assert static.unjoined == 0
    # an unchanged inventory is not sent again until the interval passes; a change is sent at once
    assert schedule.due(backend.inventory(), backend.sample()) is None
    hot = [replace(g, power_limit_w=500.0) if g.index == 3 else g for g in backend.sample()]
    again = schedule.due(backend.inventory(), hot)
    assert again is not None
    assert again.gpus[3].power_limit_w == 500.0
    clock = [0.0]
    timed = InventorySchedule(every=300.0, clock=lambda: clock[0])
    assert timed.due(backend.inventory(), gpus) is not None
    clock[0] = 299.0
    assert timed.due(backend.inventory(), gpus) is None
    clock[0] = 300.0
    assert timed.due(backend.inventory(), gpus) is not None  # every 5 minutes even unchanged


def test_a_sample_before_any_inventory_is_kept_with_what_it_carries() -> None:
    seqr, backend, system, _ = _host("st-2")
    sample = build_sample(seqr, interval_s=5.0, gpus=backend.sample(), system=system.sample())
    static = StaticFacts()
    r = check(subject_for("sample", seqr.provider, seqr.host), encode(sample, static=False), WIDE)
    assert type(r) is Accepted
    joined = static.join(r.frame)
    assert isinstance(joined, SampleFrame)
    assert static.unjoined == 1
    g = joined.gpus[0]
    assert (g.uuid, g.temp_slowdown_c) == ("", None)
    assert g.temp_c == sample.gpus[0].temp_c  # judged with what it carries
    # the health engine judges it (no threshold: the GPU is judged as one that reports none)
    hot = replace(joined, gpus=(replace(joined.gpus[0], temp_c=99.0), *joined.gpus[1:]))
    state, obs = HealthEngine().observe(HealthState(), hot, hot.ts)
    assert state.hosts[seqr.host].gpus[0].last is not None
    assert any(o.check == "gpu.temperature" and o.status != "ok" for o in obs)
    # a v1 sample carries its static facts: nothing to join, nothing missing
    v1 = decode(encode_v1(sample))
    assert static.join(v1) is v1
    assert static.unjoined == 1


def test_a_newer_inventory_wins_and_an_older_one_redelivered_does_not() -> None:
    seqr, backend, system, schedule = _host("st-3")
    gpus = backend.sample()
    full = schedule.due(backend.inventory(), gpus)
    assert full is not None
    new = build_inventory(seqr, full, ts=2000.0)
    old = replace(new, ts=1000.0, gpus=tuple(replace(i, temp_slowdown_c=50.0) for i in new.gpus))
    static = StaticFacts()
    static.join(new)
    static.join(old)
    sample = decode(encode(build_sample(seqr, interval_s=5.0, gpus=gpus, ts=2001.0), static=False))
    joined = static.join(sample)
    assert isinstance(joined, SampleFrame)
    assert [static_facts(g) for g in joined.gpus] == [static_facts(g) for g in gpus]


async def test_a_collector_stores_v1_and_v2_frames_alike(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    """Frames of an agent of the previous release (v1) and of this one (v2: inventory with
    the static facts, compact samples) land as rows of exactly what each sent."""
    cfg = config(pg_dsn, private_nats.url)
    now = time.time()
    sent: dict[str, list[SampleFrame]] = {}
    async with running(cfg) as ingest:
        nc = await nats.connect(private_nats.url)
        js = nc.jetstream()
        for name, version in (("old-1", 1), ("new-2", 2)):
            seqr, backend, system, schedule = _host(name, seed=5)
            gpus = backend.sample()
            full = schedule.due(backend.inventory(), gpus)
            assert full is not None
            inv: InventoryFrame = build_inventory(seqr, full, system.host_facts(), ts=now)
            samples = [build_sample(seqr, interval_s=1.0, gpus=gpus, system=system.sample(), ts=now + 1)]
            samples.append(
                build_sample(seqr, interval_s=1.0, gpus=backend.sample(), system=system.sample(), ts=now + 2)
            )
            sent[name] = samples
            enc = (lambda f: encode_v1(f)) if version == 1 else (lambda f: encode(f, static=False))
            await js.publish(
                subject_for("inventory", seqr.provider, seqr.host),
                encode_v1(inv) if version == 1 else encode(inv),
            )
            for s in samples:
                await js.publish(subject_for("sample", seqr.provider, seqr.host), enc(s))
        await until(lambda: ingest.stats.frames_stored >= 6, timeout=60)
        await nc.close()
        assert ingest.stats.rejected == {}
        assert ingest.static.unjoined == 0
    names = ["gpu_index", "temp_c", "power_w", *STATIC_GPU_FIELDS]
    for host, samples in sent.items():
        rows = await conn.fetch(
            f"SELECT {', '.join('g.' + n for n in names)} FROM gpu_readings g"  # noqa: S608
            " JOIN hosts h ON h.id = g.host_id WHERE h.name = $1 ORDER BY g.ts, g.gpu_index",
            host,
        )
        want = [(g.index, *(getattr(g, n) for n in names[1:])) for s in samples for g in s.gpus]
        assert [tuple(r) for r in rows] == want, host  # v1 and v2: the readings and the static facts
    uuids = await conn.fetch(
        "SELECT g.uuid FROM gpus g JOIN hosts h ON h.id = g.host_id WHERE h.name = 'new-2' ORDER BY g.idx"
    )
    assert [u["uuid"] for u in uuids] == [g.uuid for g in sent["new-2"][0].gpus]
    assert await conn.fetchval("SELECT count(*) FROM gpus WHERE uuid = ''") == 0


async def test_samples_before_their_hosts_inventory_are_counted_and_exported(
    pg_dsn: str, conn: asyncpg.Connection, private_nats: NatsServer
) -> None:
    """A compact sample that arrives before any inventory of its host is stored without its
    static facts and counted (``gpuwarden_collector_samples_unjoined_total``); once the
    inventory has passed, the host's samples are joined and no longer counted."""
    seqr, backend, system, schedule = _host("st-9", seed=9)
    now = time.time()
    gpus = backend.sample()
    full = schedule.due(backend.inventory(), gpus)
    assert full is not None
    early = build_sample(seqr, interval_s=1.0, gpus=gpus, system=system.sample(), ts=now)
    inv = build_inventory(seqr, full, system.host_facts(), ts=now + 1)
    late = build_sample(seqr, interval_s=1.0, gpus=backend.sample(), system=system.sample(), ts=now + 2)
    async with running(config(pg_dsn, private_nats.url)) as ingest:
        nc = await nats.connect(private_nats.url)
        js = nc.jetstream()
        await js.publish(subject_for("sample", seqr.provider, seqr.host), encode(early, static=False))
        await js.publish(subject_for("inventory", seqr.provider, seqr.host), encode(inv))
        await js.publish(subject_for("sample", seqr.provider, seqr.host), encode(late, static=False))
        await until(lambda: ingest.stats.frames_stored >= 3, timeout=60)
        await nc.close()
        assert ingest.stats.samples_unjoined == 1
        exported = FleetCollector(
            FleetState(),
            LiveRollup(HealthState, ProviderThresholds()),
            HealthState,
            lambda: ingest.stats,
            dict,
        ).render()
    assert b"gpuwarden_collector_samples_unjoined_total 1.0" in exported
