"""Alerts that must end, and state that must stay bounded (issue 9, items 5 and 7), on the
pure engines: a GPU replaced in its slot (new UUID) resolves its old alerts as ``replaced``, a
host moved to another provider as ``moved``, ``ForgetHost`` as ``forgotten``; an agent that
churns GPU indices, UUIDs, XID codes, mounts, NICs and targets on every frame leaves the
engines' structures (and the Python heap) flat; the per-host rate limit."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

from collector.alerts import AlertEngine, AlertState, Notification, Transition, alert_config_from
from collector.alerts.engine import MAX_ALERTS_PER_HOST
from collector.alerts.model import FIRING, RESOLVED, ForgetHost
from collector.health import HealthEngine, HealthState, Observation
from collector.health.engine import MAX_GPUS_PER_HOST, MAX_HOST_CHECKS, MAX_XID_CODES
from collector.health.history import MAX_HOST_BOARDS
from collector.ratelimit import HostRateLimit
from shared.frames import (
    CheckResult,
    DiskUsage,
    EventFrame,
    GpuSample,
    NicCounters,
    SampleFrame,
    SystemSample,
)
from tests.support.frame_fixtures import xid_frame

T0 = 1_700_000_000.0
ESCALATION = {"policy": [{"name": "all", "levels": [{"after": "0s", "notify": ["oncall"]}]}]}


def sample(
    ts: float,
    seq: int,
    *,
    host: str = "h1",
    provider: str = "p",
    uuids: tuple[str, ...] = ("GPU-A",),
    **kw: Any,
) -> SampleFrame:
    gpus = tuple(GpuSample(index=i, uuid=u, temp_c=50.0) for i, u in enumerate(uuids))
    return SampleFrame(
        host=host, provider=provider, boot_id="b1", seq=seq, ts=ts, interval_s=5.0, gpus=gpus, **kw
    )


def xid(
    ts: float,
    seq: int,
    *,
    code: int = 79,
    gpu: int = 0,
    uuid: str = "GPU-A",
    host: str = "h1",
    provider: str = "p",
) -> EventFrame:
    return xid_frame(host, seq, ts, provider, "b1", gpu_index=gpu, gpu_uuid=uuid, xid=code)


class Both:
    """The health engine feeding the alert engine, as the collector runs them."""

    def __init__(self, record: bool = True) -> None:
        self.record = record  # keep what the engines said (off where the heap is measured)
        self.health = HealthEngine()
        self.alerts = AlertEngine(alert_config_from({"escalation": ESCALATION}, env={}))
        self.hs = HealthState()
        self.st = AlertState()
        self.transitions: list[Transition] = []
        self.notes: list[Notification] = []

    def feed(self, frame: SampleFrame | EventFrame, now: float) -> list[Observation]:
        _, obs = self.health.observe(self.hs, frame, now)
        self.step(obs, now)
        return obs

    def step(self, obs: list[Observation], now: float, commands: tuple[Any, ...] = ()) -> None:
        out = self.alerts.evaluate(self.st, obs, now, commands, self.hs.provider_hosts())
        if self.record:
            self.transitions += out.transitions
            self.notes += out.notifications

    def firing(self) -> dict[str, Any]:
        return {a.key: a for a in self.st.alerts.values() if a.state == FIRING}


def test_a_gpu_replaced_in_its_slot_resolves_the_old_gpus_alerts_as_replaced() -> None:
    run = Both()
    run.feed(sample(T0, 1), T0)
    run.feed(xid(T0 + 1, 2), T0 + 1)  # XID 79 on GPU-A: critical, fires at once
    (old,) = run.firing().values()
    assert old.labels["uuid"] == "GPU-A"
    assert old.rule == "gpu.xid"
    run.feed(sample(T0 + 10, 3, uuids=("GPU-B",)), T0 + 10)  # the board was swapped (RMA)
    assert old.state == RESOLVED
    assert old.reason == "replaced"
    assert not run.firing()
    resolved = [t for t in run.transitions if t.fingerprint == old.fingerprint and t.kind == "resolved"]
    assert [t.reason for t in resolved] == ["replaced"]
    told = [n for n in run.notes if n.fingerprint == old.fingerprint and n.kind == "resolved"]
    assert [n.reason for n in told] == ["replaced"]
    # the new board starts clean, and a new XID on it is its own alert
    run.feed(xid(T0 + 20, 4, uuid="GPU-B"), T0 + 20)
    (new,) = run.firing().values()
    assert new.labels["uuid"] == "GPU-B"
    assert new.reason == ""


def test_a_flapping_alert_of_a_replaced_gpu_resolves_too() -> None:
    run = Both()
    t = T0
    for i in range(30):  # temperature over and under its limit every sample: flapping
        g = GpuSample(index=0, uuid="GPU-A", temp_c=95.0 if i % 2 else 50.0)
        f = SampleFrame(host="h1", provider="p", boot_id="b1", seq=i + 1, ts=t, interval_s=5.0, gpus=(g,))
        run.feed(f, t)
        t += 5
    (a,) = [a for a in run.st.alerts.values() if a.rule == "gpu.temperature"]
    assert a.flapping
    run.feed(sample(t, 100, uuids=("GPU-B",)), t)
    assert a.state == RESOLVED
    assert not a.flapping
    assert a.reason == "replaced"


def test_a_host_moved_to_another_provider_resolves_its_old_alerts_as_moved() -> None:
    run = Both()
    run.feed(sample(T0, 1), T0)
    run.feed(xid(T0 + 1, 2), T0 + 1)
    (old,) = run.firing().values()
    assert old.labels["provider"] == "p"
    run.feed(sample(T0 + 10, 3, provider="q"), T0 + 10)
    assert old.state == RESOLVED
    assert old.reason == "moved"
    assert "h1" not in run.st.hosts.get("p", {})
    assert "h1" in run.st.hosts["q"]
    assert [n.reason for n in run.notes if n.fingerprint == old.fingerprint and n.kind == "resolved"] == [
        "moved"
    ]


def test_forget_host_resolves_every_alert_of_the_host_and_stops_counting_it() -> None:
    run = Both()
    run.feed(sample(T0, 1), T0)
    run.feed(sample(T0, 1, host="h2"), T0)
    run.feed(xid(T0 + 1, 2), T0 + 1)
    run.feed(xid(T0 + 1, 2, host="h2"), T0 + 1)
    assert len(run.firing()) == 2
    assert run.health.forget(run.hs, "h1")
    assert not run.health.forget(run.hs, "h1")
    run.step([], T0 + 5, (ForgetHost("h1"),))
    (left,) = run.firing().values()
    assert left.labels["host"] == "h2"
    gone = [a for a in run.st.alerts.values() if a.labels["host"] == "h1"]
    assert gone
    assert all(a.state == RESOLVED and a.reason == "forgotten" for a in gone)
    assert "h1" not in run.st.hosts["p"]
    assert "h1" not in run.hs.hosts
    # it reports again: a new host, whose new XID fires a new episode with no reason
    run.feed(sample(T0 + 60, 1, host="h1"), T0 + 60)
    run.feed(xid(T0 + 61, 2, host="h1"), T0 + 61)
    (back,) = [a for a in run.firing().values() if a.labels["host"] == "h1"]
    assert back.reason == ""
    assert back.flap_n <= 2


def churn_frames(i: int, ts: float) -> list[SampleFrame | EventFrame]:
    """One round of a hostile agent: new GPU indices and UUIDs, a new XID code, new mounts,
    NICs and network targets, all failing, every frame."""
    gpus = tuple(
        GpuSample(index=(i * 4 + k) % 1024, uuid=f"GPU-{i}-{k}", temp_c=99.0, ecc_dbe_volatile=1)
        for k in range(4)
    )
    system = SystemSample(
        cpu_pct=10.0,
        disks=tuple(
            DiskUsage(mount=f"/m{i}-{k}", total_bytes=100, used_bytes=99, free_bytes=1) for k in range(3)
        ),
        nics=tuple(NicCounters(name=f"nic{i}-{k}", up=False) for k in range(3)),
    )
    checks = tuple(CheckResult(id=f"t{i}-{k}", ok=False, target="x", error="refused") for k in range(3))
    s = SampleFrame(
        host="evil",
        provider="p",
        boot_id="b1",
        seq=2 * i + 1,
        ts=ts,
        interval_s=5.0,
        gpus=gpus,
        system=system,
        checks=checks,
    )
    e = EventFrame(
        host="evil",
        provider="p",
        boot_id="b1",
        seq=2 * i + 2,
        ts=ts,
        type="xid",
        gpu_index=gpus[0].index,
        gpu_uuid=gpus[0].uuid,
        xid=1000 + i,
    )
    fatal = EventFrame(
        host="evil",
        provider="p",
        boot_id="b1",
        seq=2 * i + 2 + 10**6,
        ts=ts,
        type="xid",
        gpu_index=gpus[1].index,
        gpu_uuid=gpus[1].uuid,
        xid=79,
    )
    return [s, e, fatal]


def sizes(run: Both) -> dict[str, int]:
    hs = run.hs.hosts["evil"]
    return {
        "gpus": len(hs.gpus),
        "host_checks": len(hs.checks),
        "gpu_checks": sum(len(g.checks) for g in hs.gpus.values()),
        "xids": sum(len(g.xids) for g in hs.gpus.values()),
        "fatal_xids": sum(len(g.fatal_xids) for g in hs.gpus.values()),
        "recent_events": len(hs.recent_events),
        "alerts": len(run.st.alerts),
        "by_host": sum(len(k) for k in run.st.by_host.values()),
        "incidents": len(run.st.incidents),
        "incident_alerts": sum(len(i.alerts) for i in run.st.incidents.values()),
        "boards": len(run.hs.history.boards),
        "boards_by_uuid": len(run.hs.history.by_uuid),
    }


def test_a_churning_agent_leaves_the_engines_state_flat() -> None:
    """Every per-host, per-GPU and per-code structure stays at its documented cap, and the heap
    grows by less than 1 MB over the second 120 rounds (before: every new GPU index, UUID,
    XID code, mount, NIC and target was kept forever, and an open incident listed every alert
    that ever fired in it)."""
    run = Both(record=False)
    ts = T0

    def rounds(start: int, n: int) -> None:
        nonlocal ts
        for i in range(start, start + n):
            for f in churn_frames(i, ts):
                run.feed(f, ts)
            ts += 5.0

    tracemalloc.start()  # from the first frame, so that what is freed later is accounted
    try:
        rounds(0, 120)  # past every cap: 64 GPUs after 16 rounds, 1,000 alerts after about 50
        first = sizes(run)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        rounds(120, 120)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    second = sizes(run)
    assert first["gpus"] == second["gpus"] == MAX_GPUS_PER_HOST
    assert second["host_checks"] <= MAX_HOST_CHECKS
    assert second["xids"] <= MAX_GPUS_PER_HOST * MAX_XID_CODES
    assert second["alerts"] <= MAX_ALERTS_PER_HOST
    assert second["by_host"] <= MAX_ALERTS_PER_HOST
    assert second["incident_alerts"] <= MAX_ALERTS_PER_HOST
    assert second["boards"] == MAX_HOST_BOARDS  # one new board per round: 240 without the cap
    assert second["boards_by_uuid"] <= MAX_HOST_BOARDS
    for k in ("gpus", "host_checks", "gpu_checks", "xids", "alerts", "incident_alerts"):
        assert second[k] <= first[k] * 1.05 + 2, (k, first, second)
    assert grown < 1_000_000, f"heap grew by {grown} bytes over 120 churning rounds"


def test_xid_records_are_pruned_once_over_and_said() -> None:
    run = Both()
    run.feed(sample(T0, 1), T0)
    run.feed(xid(T0 + 1, 2, code=13), T0 + 1)  # non-fatal
    gs = run.hs.hosts["h1"].gpus[0]
    assert 13 in gs.xids
    t, seq = T0 + 5, 3
    while t < T0 + 1 + 2 * 86400:  # past xid_window and rma_window, healthy samples all along
        run.feed(sample(t, seq), t)
        t, seq = t + 600, seq + 1
    assert gs.xids == {}
    assert not any(k.startswith("gpu.xid") for k in gs.checks)
    assert not run.firing()


def test_host_rate_limit_is_a_token_bucket_per_host_that_forgets_idle_hosts() -> None:
    rl = HostRateLimit(rate=2.0, burst=10)
    assert [rl.allow("a", 100.0) for _ in range(12)].count(True) == 10  # the burst, then refused
    assert rl.allow("b", 100.0)  # another host is not affected
    assert not rl.allow("a", 100.2)
    assert rl.allow("a", 100.5)
    assert rl.allow("a", 1000.0)
    assert len(rl) == 1
    assert all(HostRateLimit(rate=0, burst=1).allow("a", 0.0) for _ in range(100))  # 0: no limit
