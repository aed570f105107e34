"""GPU counter rates over ``rate_window``: a steady fault sampled unevenly is one alert (a
per-sample rate read a 0.3 s gap as no errors and resolved it), a GPU seen for less than the
window is judged only when over the limit, and the fast path keeps the full checks' verdicts
while the window still holds a burst that the last sample no longer shows."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from collector.alerts import AlertEngine, AlertState, Notification, alert_config_from
from collector.health import HealthEngine, HealthState, Observation
from collector.health.config import GpuThresholds, HealthConfig
from shared.frames import replace
from tests.support.gpu_fastpath import T0, dated_checks, frame, judge

START, END = 10.0, 40.0  # the fault: 2 single-bit errors/s (120/min, limit 10/min) in between
# an agent starved of CPU: samples bunched, then late (offsets in each 5 s; 0.2 s gaps in them)
OFFSETS = (0.0, 1.6, 2.0, 2.2, 4.0)
GAP = 2.0  # the longest gap between two samples


def sbe_at(t: float) -> int:
    return int(2 * (min(t, END) - START)) if t >= START else 0


def times(until: float) -> list[float]:
    return [k * 5 + off for k in range(int(until / 5) + 1) for off in OFFSETS]


def run(window: str) -> tuple[list[Observation], list[Notification]]:
    health = HealthEngine(HealthConfig(gpu=dataclasses.replace(GpuThresholds(), rate_window=_secs(window))))
    raw: dict[str, Any] = {
        "alerts": {"for": "2s"},
        "escalation": {"policy": [{"name": "all", "levels": [{"notify": ["ops"]}]}]},
    }
    alerts = AlertEngine(alert_config_from(raw, env={}))
    hs, st = HealthState(), AlertState()
    seen: list[Observation] = []
    notes: list[Notification] = []
    for seq, t in enumerate(times(END + 20)):
        now = T0 + t
        hs, obs = health.observe(hs, replace(frame(now, ecc_sbe_volatile=sbe_at(t)), seq=seq), now)
        seen += [o for o in obs if o.check == "gpu.ecc_sbe_rate"]
        st, _, out = alerts.evaluate(st, obs, now)
        notes += out
    return seen, notes


def _secs(text: str) -> float:
    return float(text.rstrip("s"))


def test_a_steady_rate_sampled_unevenly_is_one_alert() -> None:
    seen, notes = run("2s")
    assert [(n.kind, n.rule) for n in notes] == [
        ("firing", "gpu.ecc_sbe_rate"),
        ("resolved", "gpu.ecc_sbe_rate"),
    ]
    during = [o.status for o in seen if START + 2 < o.at - T0 <= END]
    assert during
    assert set(during) == {"warning"}
    resolved = notes[1].at - T0
    assert END < resolved <= END + 2 + GAP  # the window's last error gone, plus one gap


def test_per_sample_rates_read_a_short_gap_as_no_errors() -> None:
    """The behaviour the window replaces (``rate_window = "0s"``): the same fault reads healthy
    at the samples 0.2-0.3 s after the last, so it resolves and fires again."""
    seen, notes = run("0s")
    during = [o.status for o in seen if START + 2 < o.at - T0 <= END]
    assert "healthy" in during
    assert [n.kind for n in notes].count("firing") > 1


def test_a_gpu_seen_for_less_than_the_window_is_judged_only_over_the_limit() -> None:
    engine, state = HealthEngine(), HealthState()  # rate_window 30 s
    assert engine.config.gpu.rate_window == 30.0
    statuses = []
    for t, sbe in ((0, 0), (5, 0), (10, 0), (29, 0), (30, 0), (35, 100), (40, 100), (70, 100)):
        state, obs = engine.observe(state, frame(T0 + t, ecc_sbe_volatile=sbe), T0 + t)
        statuses.append((t, [o.status for o in obs if o.check == "gpu.ecc_sbe_rate"]))
    assert statuses == [
        (0, []),  # no rate from a first sample
        (5, []),  # 0/min over 5 s: not called healthy yet
        (10, []),
        (29, []),
        (30, ["healthy"]),  # a whole window
        (35, ["warning"]),  # 100 errors since 5 s (the newest kept sample 30 s before)
        (40, ["warning"]),  # the last sample shows no new error; the window does
        (70, ["healthy"]),  # the burst out of the window
    ]
    # a first rate over its limit needs no whole window
    engine, state = HealthEngine(), HealthState()
    state, _ = engine.observe(state, frame(T0, ecc_sbe_volatile=0), T0)
    state, obs = engine.observe(state, frame(T0 + 5, ecc_sbe_volatile=100), T0 + 5)
    assert [o.status for o in obs if o.check == "gpu.ecc_sbe_rate"] == ["warning"]


def test_a_duplicate_sample_starts_the_rates_again() -> None:
    engine, state = HealthEngine(), HealthState()
    for t in (0, 10, 20, 30, 40):
        state, _ = engine.observe(state, frame(T0 + t, ecc_sbe_volatile=0), T0 + t)
    gs = state.hosts["n"].gpus[0]
    assert len(gs.rate_marks) > 1
    same = replace(frame(T0 + 40, ecc_sbe_volatile=0), seq=int(T0) + 41)  # a new seq, the same time
    state, _ = engine.observe(state, same, T0 + 40)
    assert [m[0] for m in gs.rate_marks] == [T0 + 40]


# (readings of the quiet GPU, of the burst sample, kept from then on); samples 1 s apart
BURSTS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"ecc_sbe_volatile": 0}, {"ecc_sbe_volatile": 6}),  # 12/min over a 30 s window: over 10
    ({"ecc_sbe_volatile": 0}, {"ecc_sbe_volatile": 4}),  # 8/min: under
    ({"pcie_replay_count": 0}, {"pcie_replay_count": 40}),
    ({"nvlink_links_total": 18, "nvlink_links_up": 18, "nvlink_crc_errors": 0}, {"nvlink_crc_errors": 3}),
    (
        {"nvlink_links_total": 18, "nvlink_links_up": 18, "nvlink_crc_by_link": (0,) * 18},
        {"nvlink_crc_by_link": (0, 2) + (0,) * 16},
    ),
]


@pytest.mark.parametrize(("before", "burst"), BURSTS)
def test_the_fast_path_keeps_a_burst_the_window_still_holds(
    before: dict[str, Any], burst: dict[str, Any]
) -> None:
    results = []
    for full in (False, True):
        # quiet for 40 s, the burst at 40 s, its counters kept from then on
        out, gs, _ = judge([before] * 40 + [{**before, **burst}] * 60, full)
        results.append((out, dated_checks(gs), gs.rate_marks))
    assert results[0] == results[1]
