"""The collector's self-check (pure) and the health engine's suspended staleness: the
collector's own outage is one alert about itself, never a burst of host alerts."""

from __future__ import annotations

from collector.health import ExpectedHost, HealthEngine, HealthState
from collector.health.config import HealthConfig, HealthSection
from collector.health.model import HEALTHY
from collector.selfcheck import (
    NOTIFY,
    PIPELINE,
    Readings,
    SelfCheckConfig,
    SelfState,
    behind,
    judge,
    observations,
)
from tests.support.health_frames import sample

CFG = SelfCheckConfig(grace=5.0, ingest_lag=30.0, notify_backlog=100, channel_window=300.0)


def test_behind_is_the_age_of_the_oldest_frame_not_judged_yet() -> None:
    assert behind(Readings(now=100.0)) == 0.0  # nothing fetched waits: caught up
    # a batch being written or judged: its oldest frame's stream time
    assert behind(Readings(now=100.0, writing_since=96.0, unjudged_since=96.0, consumer_pending=9)) == 4.0
    # between batches, JetStream holding more: the newest frame judged (committed at 99, 3 s old)
    assert (
        behind(Readings(now=100.0, consumer_pending=500, last_commit_at=99.0, last_newest_lag_s=3.0)) == 4.0
    )
    # nothing waits: the last batch's lag does not count (a silent host is silent)
    assert behind(Readings(now=100.0, consumer_pending=0, last_commit_at=99.0, last_newest_lag_s=3.0)) == 0.0


def test_postgres_down_is_impaired_at_once_and_one_problem_after_grace() -> None:
    st = SelfState()
    s = judge(st, Readings(now=100.0, postgres_down_since=100.0, consumer_pending=42), CFG)
    assert s.impaired_since == 100.0
    assert s.problems == ()  # within grace: no alert yet, but staleness is already suspended
    s = judge(st, Readings(now=106.0, postgres_down_since=100.0, consumer_pending=300), CFG)
    (p,) = s.problems
    assert (p.check, p.cause, p.since) == (PIPELINE, "postgres", 100.0)
    assert p.summary.startswith("cannot store: PostgreSQL unreachable since ")
    assert "nothing lost so far, JetStream holds 300 frames" in p.summary


def test_several_causes_make_one_pipeline_problem_naming_the_first() -> None:
    st = SelfState()
    judge(st, Readings(now=0.0, nats_connected=False, postgres_down_since=0.0), CFG)
    s = judge(
        st,
        Readings(
            now=10.0, nats_connected=False, postgres_down_since=0.0, writing_since=-60.0, consumer_pending=5
        ),
        CFG,
    )
    assert [(p.check, p.cause) for p in s.problems] == [(PIPELINE, "nats")]


def test_impaired_until_the_backlog_drains_then_clear() -> None:
    st = SelfState()
    judge(st, Readings(now=0.0, postgres_down_since=0.0), CFG)
    # PostgreSQL is back: the batch in hand committed, its newest frame waited 40 s
    s = judge(st, Readings(now=41.0, last_commit_at=41.0, last_newest_lag_s=40.0, consumer_pending=0), CFG)
    assert s.impaired_since == 0.0  # the same impairment goes on while the backlog drains
    assert s.problems == ()  # the postgres alert resolves
    s = judge(st, Readings(now=44.0, last_commit_at=44.0, last_newest_lag_s=20.0, consumer_pending=5000), CFG)
    assert s.impaired_since == 0.0  # draining
    s = judge(st, Readings(now=46.0, last_commit_at=46.0, last_newest_lag_s=0.3, consumer_pending=0), CFG)
    assert s == type(s)()  # caught up, `grace` after the cause ended: nothing impaired, nothing to say


def test_an_idle_ingest_after_an_outage_counts_as_caught_up() -> None:
    st = SelfState()
    judge(st, Readings(now=0.0, nats_connected=False), CFG)
    s = judge(st, Readings(now=30.0, last_commit_at=-5.0, last_newest_lag_s=0.0), CFG)
    assert s.impaired_since == 0.0  # back, but not `grace` ago: fresh arrivals get their time
    s = judge(st, Readings(now=36.0, last_commit_at=-5.0, last_newest_lag_s=0.0), CFG)
    assert s.impaired_since is None  # nothing arrives at all: the hosts' own silence counts again


def test_notification_backlog_and_failing_channels() -> None:
    st = SelfState()
    judge(st, Readings(now=0.0, notify_backlog=500), CFG)
    s = judge(
        st,
        Readings(
            now=6.0,
            notify_backlog=500,
            channel_failed_at={"hook": 5.0, "ok": 1.0},
            channel_sent_at={"ok": 2.0},
        ),
        CFG,
    )
    (p,) = s.problems
    assert (p.check, p.channels, s.impaired_since) == (NOTIFY, ("hook",), None)
    assert "500 notifications waiting" in p.summary
    s = judge(st, Readings(now=7.0, channel_failed_at={"hook": 5.0}, channel_sent_at={"hook": 6.5}), CFG)
    assert s.problems == ()  # delivered since: no longer failing


def test_observations_resolve_what_is_gone() -> None:
    st = SelfState()
    judge(st, Readings(now=0.0, nats_connected=False), CFG)
    s = judge(st, Readings(now=9.0, nats_connected=False), CFG)
    obs = {o.check: o for o in observations(s, {"collector": "partition-0"}, 9.0)}
    assert obs[PIPELINE].status == "critical"
    assert obs[PIPELINE].immediate
    assert obs[NOTIFY].status == HEALTHY


def test_staleness_is_suspended_while_impaired_and_resumes_from_fresh_arrivals() -> None:
    engine = HealthEngine(HealthConfig(health=HealthSection(stale_after=10.0)))
    state = HealthState()
    expected = {"never": ExpectedHost("acme")}
    for h in ("a", "b"):
        engine.observe(state, sample(0.0, host=h), 0.0)
    engine.tick(state, 1.0, expected)
    # the collector's pipeline is impaired from t=2 to t=100: nobody is blamed meanwhile
    for t in (20.0, 61.0, 100.0):
        _, obs = engine.tick(state, t, expected, impaired_since=2.0)
        assert [o for o in obs if o.status != HEALTHY] == []
    engine.resume(state, 100.0)
    engine.observe(state, sample(101.0, host="a"), 101.0)  # a reports again; b does not
    _, obs = engine.tick(state, 109.0, expected)
    assert [o for o in obs if o.check == "host.unreachable"] == []  # within stale_after of the resume
    _, obs = engine.tick(state, 111.0, expected)
    assert {o.labels["host"] for o in obs if o.check == "host.unreachable"} == {"b"}


def test_after_an_outage_impaired_until_the_backlog_is_down_to_a_batch() -> None:
    st = SelfState()
    judge(st, Readings(now=0.0, postgres_down_since=0.0), CFG)
    # back after 14 s: the batch in hand was fetched before the outage (its pending count is old)
    s = judge(st, Readings(now=15.0, last_commit_at=15.0, last_newest_lag_s=14.0, drained_below=1000), CFG)
    assert s.impaired_since == 0.0
    r = Readings(
        now=21.0, last_commit_at=21.0, last_newest_lag_s=2.0, consumer_pending=2800, drained_below=1000
    )
    s = judge(st, r, CFG)
    assert s.impaired_since == 0.0
    r = Readings(
        now=23.0, last_commit_at=23.0, last_newest_lag_s=0.5, consumer_pending=300, drained_below=1000
    )
    s = judge(st, r, CFG)
    assert s.impaired_since is None
