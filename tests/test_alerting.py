"""Alerting inside the collector, against real nats-server, PostgreSQL and an HTTP receiver:
an XID event notifies at once (HMAC-signed webhook), a restart does not notify again,
acknowledgement stops escalation, a silence stops notification, state survives restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from collector.config import load_collector_config
from collector.notify.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from collector.service import CollectorService
from gpuwarden.servers import NatsServer
from shared.frames import Frame
from tests.support.collector import (
    SECRET,
    Receiver,
    collector,
    send,
    settled,
    webhook_toml,
    write_config,
)
from tests.support.records import event, sample
from tests.support.wait import until


async def test_xid_notifies_at_once_signed_and_restart_does_not_notify_again(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, nats_url, webhook_toml(rx.url))
        now = time.time()
        async with collector(cfg) as svc:
            await send(nats_url, [sample("x-01", 1, now), event("x-01", 2, now, xid=79)])
            await until(lambda: len(rx.received) >= 1)
            await until(lambda: svc.alerting.stats["outbox_backlog"] == 0)
        headers, body, _ = rx.received[0]
        ts = headers[TIMESTAMP_HEADER]
        assert abs(int(ts) - now) < 3600  # the time it was sent, within this test's run
        assert verify(SECRET.encode(), body, headers[SIGNATURE_HEADER], ts, now=int(ts))
        assert not verify(b"wrong", body, headers[SIGNATURE_HEADER], ts, now=int(ts))
        assert not verify(SECRET.encode(), body, headers[SIGNATURE_HEADER], ts, now=int(ts) + 3600)
        doc = json.loads(body)
        assert doc["version"] == "4"
        assert doc["status"] == "firing"
        assert doc["receiver"] == "hook"
        (a,) = doc["alerts"]
        assert a["labels"]["alertname"] == "gpu.xid"
        assert a["labels"]["severity"] == "critical"
        assert a["labels"]["host"] == "x-01"
        assert a["labels"]["xid"] == "79"
        assert "reboot" in (a["annotations"]["summary"] + a["annotations"].get("advice", "")).lower()
        assert a["endsAt"] == "0001-01-01T00:00:00Z"
        assert a["fingerprint"]
        # a restart restores the firing alert and sends nothing again
        async with collector(cfg) as svc2:
            fp = a["fingerprint"]
            assert svc2.alerting.get_alert(fp) is not None
            assert svc2.alerting.get_alert(fp).state == "firing"  # type: ignore[union-attr]
            await send(nats_url, [sample("x-01", 3, time.time())])
            hosts = svc2.alerting.health.hosts

            def judged() -> bool:
                h = hosts.get("x-01")
                return h is not None and h.last_sample_seq == 3

            await until(judged)
            await settled(svc2)
        assert len(rx.received) == 1
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch("SELECT channel, status FROM notification_outbox ORDER BY id")
            kinds = [r["kind"] for r in await conn.fetch("SELECT kind FROM alert_transitions")]
        finally:
            await conn.close()
        assert sorted((r["channel"], r["status"]) for r in rows) == [
            ("hook", "sent"),
            ("log", "sent"),
            ("nats", "sent"),
        ]
        assert kinds[:2] == ["pending", "firing"]


async def outbox_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("SELECT channel, status, attempts FROM notification_outbox ORDER BY id"))
    finally:
        await conn.close()


async def dead_letters(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(
            await conn.fetch("SELECT channel, attempts, error, payload FROM notification_dead_letter")
        )
    finally:
        await conn.close()


async def test_webhook_failing_twice_then_succeeding_gets_exactly_one_delivery(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    async with Receiver(fail=2) as rx:
        cfg = write_config(tmp_path, pg_dsn, nats_url, webhook_toml(rx.url, retries=3))
        async with collector(cfg) as svc:
            await send(nats_url, [event("r-01", 1, time.time())])
            await until(lambda: len(rx.received) >= 1)
            await settled(svc)
            st = svc.alerting.stats["channels"]["hook"]
        assert rx.attempts == 3
        assert len(rx.received) == 1
        assert st["sent"] == 1
        assert st["errors"] == 2
        assert st["failed"] == 0
        hook = [r for r in await outbox_rows(pg_dsn) if r["channel"] == "hook"]
        assert [(r["status"], r["attempts"]) for r in hook] == [("sent", 3)]
        # every attempt of one delivery carries the same delivery id
        assert len({h["X-Gpuwarden-Delivery"] for h, _, _ in rx.received}) == 1
        assert await dead_letters(pg_dsn) == []


async def test_webhook_always_failing_ends_in_the_dead_letter_table(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    async with Receiver(fail=-1) as rx:
        cfg = write_config(tmp_path, pg_dsn, nats_url, webhook_toml(rx.url, retries=2))
        async with collector(cfg) as svc:
            await send(nats_url, [event("d-01", 1, time.time())])
            await until(lambda: svc.alerting.stats["dead_letters"] == 1)
            st = svc.alerting.stats["channels"]["hook"]
        assert rx.attempts == 3
        assert rx.received == []
        assert st["failed"] == 1
        assert st["sent"] == 0
        (dl,) = await dead_letters(pg_dsn)
        assert dl["channel"] == "hook"
        assert dl["attempts"] == 3
        assert "HTTP 500" in dl["error"]
        assert json.loads(dl["payload"])["rule"] == "gpu.xid"
        hook = [r for r in await outbox_rows(pg_dsn) if r["channel"] == "hook"]
        assert [r["status"] for r in hook] == ["failed"]


ESCALATION = """
[[notify.webhook]]
name = "oncall"
url = "{u1}"
[[notify.webhook]]
name = "manager"
url = "{u2}"
[[escalation.policy]]
name = "critical"
match = {{ severity = "critical" }}
levels = [{{ after = "0s", notify = ["oncall"] }}, {{ after = "2s", notify = ["manager"] }}]
"""


async def test_unacknowledged_critical_escalates_on_time_and_ack_stops_it(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    async with Receiver() as oncall, Receiver() as manager:
        cfg = write_config(tmp_path, pg_dsn, nats_url, ESCALATION.format(u1=oncall.url, u2=manager.url))
        async with collector(cfg) as svc:
            t0 = time.time()
            await send(nats_url, [event("e-01", 1, t0), event("e-02", 1, t0)])
            await until(lambda: len(oncall.received) == 2)
            acked = next(a for a in svc.alerting.list_alerts(state="firing") if a.labels["host"] == "e-01")
            view = await svc.alerting.ack(acked.fingerprint, "alice", comment="on it")
            assert view["flags"]["acknowledged"]
            assert view["ack"]["by"] == "alice"
            with pytest.raises(KeyError):
                await svc.alerting.ack("no-such-alert", "alice")
            await until(lambda: len(manager.received) >= 1, timeout=10)
            escalated_at = manager.received[0][2]
            await settled(svc)  # e-01, acknowledged, was due with e-02: never escalated
            assert [a.labels["host"] for a in svc.alerting.list_alerts(state="acknowledged")] == ["e-01"]
        hosts = [b["alerts"][0]["labels"]["host"] for b in manager.bodies()]
        assert hosts == ["e-02"]
        assert manager.bodies()[0]["alerts"][0]["annotations"]["kind"] == "escalated"
        assert 2.0 <= escalated_at - t0 <= 4.0
        assert sorted(b["alerts"][0]["labels"]["host"] for b in oncall.bodies()) == ["e-01", "e-02"]


async def test_silence_stops_notification_until_it_is_expired(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, nats_url, webhook_toml(rx.url))
        async with collector(cfg) as svc:
            al = svc.alerting
            with pytest.raises(Exception, match=r"matchers\[1\]"):
                await al.add_silence(["host=s-01", "host=~("], None, time.time() + 60, "bob", "bad")
            sil = await al.add_silence(["host=~s-0[1]"], None, time.time() + 600, "bob", "maintenance")
            assert sil.active(time.time())
            assert [s.id for s in al.silences()[1]] == [sil.id]
            await send(nats_url, [event("s-01", 1, time.time()), event("s-02", 1, time.time())])
            await until(lambda: len(rx.received) >= 1)
            await settled(svc)
            assert [b["alerts"][0]["labels"]["host"] for b in rx.bodies()] == ["s-02"]
            (silenced,) = al.list_alerts(state="silenced")
            assert silenced.labels["host"] == "s-01"
            assert silenced.state == "firing"
            # the silence survives a restart of the engine's state
            conn = await asyncpg.connect(pg_dsn)
            try:
                assert await conn.fetchval("SELECT count(*) FROM silences WHERE expired_at IS NULL") == 1
            finally:
                await conn.close()
            assert await al.expire_silence(sil.id)
            assert not await al.expire_silence(sil.id)
            await until(lambda: len(rx.received) >= 2)
        assert sorted(b["alerts"][0]["labels"]["host"] for b in rx.bodies()) == ["s-01", "s-02"]


async def test_transitions_and_notifications_are_republished_on_nats(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    cfg = write_config(tmp_path, pg_dsn, nats_url, "")
    nc = await nats.connect(nats_url)
    got: list[tuple[str, dict[str, Any]]] = []

    async def on(msg: Any) -> None:
        got.append((msg.subject, json.loads(msg.data)))

    await nc.subscribe("gpuwarden.v1.alert.>", cb=on)
    try:
        async with collector(cfg) as svc:
            sub = svc.alerting.broadcaster.subscribe()
            await send(nats_url, [event("n-01", 1, time.time())])
            live: list[dict[str, Any]] = []

            def written() -> bool:  # the page goes out at once; the live stream tells the written step
                live.extend(sub.queue.get_nowait() for _ in range(sub.queue.qsize()))
                alerts = [e for e in live if e["type"] == "alert"]
                return len(alerts) >= 2 and any(e["type"] == "incident" for e in live)

            await until(lambda: any(m["type"] == "notification" for _, m in got) and written())
            sub.close()
    finally:
        await nc.drain()
    subjects = {s for s, _ in got}
    assert subjects == {"gpuwarden.v1.alert.prov-a.n-01"}
    kinds = [m["kind"] for _, m in got if m["type"] == "transition"]
    assert kinds[:2] == ["pending", "firing"]
    (note,) = [m for _, m in got if m["type"] == "notification"]
    assert note["rule"] == "gpu.xid"
    assert note["status"] == "firing"
    assert note["labels"]["host"] == "n-01"
    # the same transitions reach the live stream, with the alert's JSON view
    alert_events = [e for e in live if e["type"] == "alert"]
    assert [e["kind"] for e in alert_events][:2] == ["pending", "firing"]
    assert alert_events[1]["alert"]["state"] == "firing"
    assert alert_events[1]["severity"] == "critical"
    assert any(e["type"] == "health" and e["host"] == "n-01" for e in live)
    assert any(e["type"] == "incident" for e in live)


def test_broadcaster_detaches_a_client_that_falls_behind() -> None:
    from collector.notify.stream import Broadcaster

    b = Broadcaster()
    slow, fast = b.subscribe(maxsize=2), b.subscribe(maxsize=10)
    for i in range(3):
        b.publish({"type": "alert", "n": i})
    assert slow.overflowed
    assert not fast.overflowed
    assert b.subscribers == 1
    assert fast.queue.qsize() == 3
    fast.close()
    assert b.subscribers == 0
    b.publish({"type": "health"})  # nobody listening: nothing happens, nothing raises


async def test_notifications_pending_at_stop_are_delivered_after_the_restart(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    async with Receiver(hang=True) as stuck:
        cfg = write_config(
            tmp_path, pg_dsn, nats_url, webhook_toml(stuck.url, timeout="60s"), 'shutdown_delivery = "200ms"'
        )
        async with collector(cfg):
            await send(nats_url, [event("p-01", 1, time.time())])
            await until(lambda: stuck.attempts == 1)
    assert [(r["channel"], r["status"]) for r in await outbox_rows(pg_dsn) if r["channel"] == "hook"] == [
        ("hook", "pending")
    ]
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, nats_url, webhook_toml(rx.url))
        async with collector(cfg) as svc:
            await until(lambda: len(rx.received) == 1)
            await settled(svc)
    assert len(rx.received) == 1
    (a,) = rx.bodies()[0]["alerts"]
    assert a["labels"]["host"] == "p-01"
    assert a["status"] == "firing"
    hook = [(r["status"], r["attempts"]) for r in await outbox_rows(pg_dsn) if r["channel"] == "hook"]
    assert hook == [("sent", 1)]


async def test_host_down_before_a_restart_resolves_after_it(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    body = '[health]\nstale_after = "1s"\n' + webhook_toml("{url}")
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, nats_url, body.format(url=rx.url))
        async with collector(cfg) as svc:
            await send(nats_url, [sample("u-01", 1, time.time(), gpus=8)])
            await until(lambda: len(rx.received) == 1)  # silent for 1 s: unreachable
            await settled(svc)
        async with collector(cfg) as svc:
            (a,) = svc.alerting.list_alerts(state="firing")
            assert a.rule == "host.unreachable"
            h = svc.alerting.host_health("u-01")
            assert h is not None
            assert h.stale
            await send(nats_url, [sample("u-01", 2, time.time(), gpus=8)])
            await until(lambda: len(rx.received) == 2)
    assert rx.alerts() == [
        ("firing", "host.unreachable", "firing"),
        ("resolved", "host.unreachable", "resolved"),
    ]


async def test_a_partition_judges_only_its_own_expected_hosts() -> None:
    from collector.ingest import owner
    from collector.inventory import ExpectedHost as Expected

    cfg = load_collector_config(env={}, flags={"collector.partitions": 2, "collector.partition": 1})
    svc = CollectorService(cfg)  # not started: the engines run, nothing is persisted
    names = [f"exp-{i:02d}" for i in range(12)]
    svc.expected.hosts = [Expected(n, "prov-x", 8) for n in names]
    mine = {n for n in names if owner(n, 2) == 1}
    assert 0 < len(mine) < len(names)
    al = svc.alerting
    assert set(al.expected()) == mine
    t = time.time()
    await al.tick(t)
    assert al.list_alerts() == []  # never reported, but within never_reported_grace (1 m)
    await al.tick(t + 61)
    fired = al.list_alerts(state="firing")
    assert {a.labels["host"] for a in fired} == mine
    assert {a.rule for a in fired} == {"host.unreachable"}
    await svc.parts.live.refresh()  # the API's rollup, as its refresher keeps it
    assert {h for h, hh in svc.parts.live.current().hosts.items() if hh.status == "unknown"} == mine


async def test_firing_alerts_are_pushed_to_alertmanager_again_until_resolved(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    async with Receiver() as am:
        body = f'[[notify.alertmanager]]\nname = "am"\nurl = "http://127.0.0.1:{am.port}"\n'
        cfg = write_config(tmp_path, pg_dsn, private_nats.url, body, 'alertmanager_resend = "500ms"')
        async with collector(cfg):
            await send(private_nats.url, [event("rp-01", 1, time.time())])
            await until(lambda: len(am.received) >= 3)
    posts = [json.loads(b) for _, b, _ in am.received]
    assert all(isinstance(p, list) and len(p) == 1 for p in posts)
    assert {p[0]["labels"]["host"] for p in posts} == {"rp-01"}
    assert all("endsAt" not in p[0] for p in posts)  # still firing: no end
    assert len({p[0]["startsAt"] for p in posts}) == 1


async def test_escalation_continues_after_a_restart_without_repeating_level_0(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    nats_url = private_nats.url
    async with Receiver() as oncall, Receiver() as manager:
        body = ESCALATION.format(u1=oncall.url, u2=manager.url).replace('after = "2s"', 'after = "4s"')
        cfg = write_config(tmp_path, pg_dsn, nats_url, body)
        t0 = time.time()
        async with collector(cfg):
            await send(nats_url, [event("er-01", 1, t0)])
            await until(lambda: len(oncall.received) == 1)
        assert manager.received == []
        async with collector(cfg) as svc:
            await until(lambda: len(manager.received) == 1, timeout=15)
            (a,) = svc.alerting.list_alerts(state="firing")
            assert a.level == 1
            await settled(svc)
        assert len(oncall.received) == 1
        assert manager.received[0][2] - t0 >= 4.0
        assert manager.bodies()[0]["alerts"][0]["annotations"]["kind"] == "escalated"


async def test_a_flapping_alert_is_notified_once_as_flapping_then_held(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    from shared.frames import replace

    nats_url = private_nats.url
    body = '[alerts.for_rules]\n"gpu.temperature" = "0s"\n' + webhook_toml("{url}")
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, nats_url, body.format(url=rx.url))
        async with collector(cfg) as svc:
            t = time.time()
            frames: list[Frame] = []
            for seq in range(1, 41):  # GPU 0 at 95 °C every other sample
                f = sample("fl-01", seq, t + seq * 0.01, gpus=2)
                hot = replace(f.gpus[0], temp_c=95.0 if seq % 2 else 50.0)
                frames.append(replace(f, gpus=(hot, f.gpus[1])))
            await send(nats_url, frames)
            await until(lambda: svc.alerting.stats["observations"] >= 40)
            await settled(svc)
            others = {a.rule for a in svc.alerting.list_alerts() if a.rule != "gpu.temperature"}
            (a,) = [a for a in svc.alerting.list_alerts() if a.rule == "gpu.temperature"]
            assert a.flapping, others
    kinds = [k for _, name, k in rx.alerts() if name == "gpu.temperature"]
    assert kinds.count("flapping") == 1
    assert kinds[-1] == "flapping"  # held: nothing after it
    # the 40 samples may come in one batch (the ingest lingers for more, [collector] linger) and be
    # judged in one step: then the flapping notification is the first; never one per flip
    assert kinds.count("firing") < 10


async def test_a_fault_that_fires_and_clears_within_one_batch_is_paged_then_resolved(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    from shared.frames import replace

    body = '[alerts.for_rules]\n"gpu.temperature" = "0s"\n' + webhook_toml("{url}")
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, private_nats.url, body.format(url=rx.url))
        async with collector(cfg) as svc:
            t = time.time()
            frames = [sample("sb-01", seq, t + seq * 0.01, gpus=1) for seq in (1, 2, 3)]
            frames[1] = replace(frames[1], gpus=(replace(frames[1].gpus[0], temp_c=95.0),))
            await send(private_nats.url, frames)  # one batch (linger): hot, then cool again
            await until(lambda: svc.alerting.stats["observations"] >= 3)
            await settled(svc)
            (a,) = [a for a in svc.alerting.list_alerts() if a.rule == "gpu.temperature"]
            assert a.state == "resolved"
            await until(lambda: len([x for x in rx.alerts() if x[1] == "gpu.temperature"]) >= 2)
    assert [k for _, name, k in rx.alerts() if name == "gpu.temperature"] == ["firing", "resolved"]


async def test_an_event_is_judged_on_arrival_and_not_again_after_it_is_stored(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, private_nats.url, webhook_toml(rx.url))
        async with collector(cfg) as svc:
            await send(private_nats.url, [sample("fe-01", 1, time.time()), event("fe-01", 2, time.time())])
            await until(lambda: len(rx.received) == 1)
            await until(lambda: svc.ingest.stats.frames_stored >= 2)  # the stored copy came too
            await settled(svc)  # and was judged (or not) by the ingest hook
            assert svc.alerting.stats["fast_events"] == 1
            xids = svc.alerting.health.hosts["fe-01"].gpus[2].xids
            assert {code: x.count for code, x in xids.items()} == {79: 1}
    assert rx.alerts() == [("firing", "gpu.xid", "firing")]


def test_lean_health_snapshot_judges_the_next_frames_like_the_full_state() -> None:
    from collector.health import HealthEngine, HealthState
    from collector.health.codec import health_snapshot, state_from_dict
    from tests.support.health_dump import state_to_dict

    engine = HealthEngine()
    st = HealthState()
    t = 1_800_000_000.0
    for seq in range(1, 4):
        for h in range(6):
            engine.observe(st, sample(f"hs-{h}", seq, t + seq, gpus=4), t + seq)
    engine.observe(st, event("hs-1", 10, t + 3.5, xid=79), t + 3.5)
    engine.tick(st, t + 3.6)
    snap = json.loads(json.dumps(health_snapshot(st, engine.healthy_for)))
    assert len(json.dumps(snap)) < len(json.dumps(state_to_dict(st))) / 3
    restored = state_from_dict(snap)

    def problems(state: Any, frames: list[Frame], now: float) -> list[tuple[str, str, str]]:
        out = []
        for f in frames:
            _, obs = engine.observe(state, f, now)
            out += [(o.check, o.status, o.key) for o in obs if o.status != "healthy"]
        return sorted(out)

    def bad_checks(state: Any) -> set[tuple[str, str, str]]:
        return {
            (c.check, c.status, c.key)
            for hs in state.hosts.values()
            for checks in [hs.checks, *(g.checks for g in hs.gpus.values())]
            for c in checks.values()
            if c.status != "healthy"
        }

    assert bad_checks(restored) == bad_checks(st) != set()
    assert ("gpu.xid", "critical") in {(c, s) for c, s, _ in bad_checks(restored)}
    # rates need one sample after a restore (no last readings kept); from the next on, the same
    first = [sample(f"hs-{h}", 5, t + 5, gpus=4) for h in range(6)]
    problems(restored, first, t + 5)
    problems(st, first, t + 5)
    later = [sample(f"hs-{h}", 6, t + 6, gpus=4) for h in range(6)]
    assert problems(restored, later, t + 6) == problems(st, later, t + 6) != []
    # the redelivered XID is recognised in the restored state: not counted again
    engine.observe(restored, event("hs-1", 10, t + 3.5, xid=79), t + 6)
    assert restored.hosts["hs-1"].gpus[2].xids[79].count == 1
