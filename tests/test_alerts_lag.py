"""Both engines as the collector drives them on a loaded machine: the fast event path judges
an event frame as it arrives, while sample frames wait in the ingest (stored, then judged in
batches), so a sample taken *before* an event is often judged *after* it.

The frames come from the agent's own simulator (:class:`SimulatedBackend`, one
:class:`Sequencer` for samples and events, as ``agent.fleet`` sends them); only the time at
which the collector judges each frame is chosen here. Whatever the ingest lag and its
jitter, every fault is notified once when it fires and once when it resolves (the end-to-end
run ``tests/test_e2e_alerts.py`` saw ``throttle=hw_slowdown``, ``ecc_dbe`` notified
firing/resolved twice)."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import pytest

from agent.faults import FaultSchedule
from agent.gpu.simulated import SimulatedBackend
from agent.sampler import Sequencer, build_event, build_sample
from collector.alerts import AlertEngine, AlertState, alert_config_from
from collector.health import HealthEngine, HealthState
from collector.health.config import GpuThresholds, HealthConfig, HealthSection
from collector.health.model import seen_at
from shared.frames import Frame

T0 = 1_700_000_000.0
INTERVAL, OFFSET, POLL = 1.0, 0.3, 0.1  # samples at k + 0.3 s, events polled every 0.1 s
START, LENGTH, RUN = 4.0, 8.0, 22.0
FAST = 0.02  # the fast event path: an event is judged this long after it happened
FOR = 2.0
BURST = 17.0
# fault -> the alert it raises on GPU 2 (every fault kind whose events are judged on the fast path
# while its samples judge the same check)
FAULTS = {
    "throttle=hw_slowdown": "gpu.clock_events",
    "throttle=hw_thermal": "gpu.clock_events",
    "throttle=sw_thermal": "gpu.clock_events",
    "temp=95": "gpu.temperature",
    "ecc_dbe": "gpu.ecc_dbe",
    "lost": "gpu.lost",
    "row_remap_fail": "gpu.row_remap",
    "recovery_action=2": "gpu.recovery_action",
    "xid=79": "gpu.xid",
}
# ingest lag of the k-th sample (seconds): constant, growing, and jittering between batches
LAGS: dict[str, Any] = {
    "none": lambda k: 0.05,
    "0.5s": lambda k: 0.5,
    "1s": lambda k: 1.0,
    "1.5s": lambda k: 1.5,
    "2.5s": lambda k: 2.5,
    "jitter": lambda k: (0.2, 1.4, 0.6, 2.1, 0.9)[k % 5],
    "jitter-slow": lambda k: (0.8, 2.6, 1.2, 3.0)[k % 4],
    # a backlog: every sample up to 17 s (the whole fault) judged in one burst at 17 s, 10 ms
    # apart (after an outage of the collector's own, or replayed by a group member taking over
    # the host's bucket): the fault held its `for` in the host's time, not in the burst's
    "backlog": lambda k: max(0.05, BURST - (k * INTERVAL + OFFSET) + 0.01 * k),
}


def run(fault: str, lag: Any) -> list[tuple[str, str]]:
    """The notifications (rule, kind) of one run; frames judged in the order the lag gives."""
    clock = [0.0]
    sim = SimulatedBackend(
        4,
        host="h1",
        faults=FaultSchedule.parse([f"h1/gpu2:{fault}@{START:g}s+{LENGTH:g}s"]),
        clock=lambda: clock[0],
        wall=lambda: T0,
    )
    sim.open()
    seqr = Sequencer(host="h1", provider="p")
    judged: list[tuple[float, int, Frame]] = []  # (when the collector judges it, order, frame)
    order = itertools.count()
    k = 0
    for step in range(int(RUN / POLL)):
        t = round(step * POLL, 6)
        clock[0] = t
        for ev in sim.poll_events():  # published at once, judged on the fast path
            heapq.heappush(judged, (t + FAST, next(order), build_event(seqr, ev, 1)))
        if abs(t - (k * INTERVAL + OFFSET)) < 1e-6:
            frame = build_sample(seqr, interval_s=INTERVAL, gpus=sim.sample(), ts=T0 + t)
            heapq.heappush(judged, (t + lag(k), next(order), frame))
            k += 1
    health = HealthEngine(
        HealthConfig(
            health=HealthSection(stale_after=10.0),
            gpu=GpuThresholds(xid_window=6.0, clock_event_sustained=3600.0),
        )
    )
    raw: dict[str, Any] = {
        "alerts": {"for": f"{FOR:g}s"},
        "escalation": {"policy": [{"name": "all", "levels": [{"notify": ["ops"]}]}]},
    }
    alerts = AlertEngine(alert_config_from(raw, env={}))
    hs, st = HealthState(), AlertState()
    notes: list[tuple[str, str]] = []
    tick = 0.0
    while judged or tick < RUN + 10:
        if judged and judged[0][0] <= tick:
            at, _, frame = heapq.heappop(judged)
            now = T0 + at
            hs, obs = health.observe(hs, frame, now)
            obs = seen_at(obs, frame.ts)  # as the collector dates them (Alerting._observe)
        else:  # the collector's timer (`for`, expiry), every 0.1 s
            now = T0 + tick
            hs, obs = health.tick(hs, now)
            tick = round(tick + POLL, 6)
        st, _, out = alerts.evaluate(st, obs, now)
        notes += [(n.rule, n.kind) for n in out if n.labels.get("gpu") == "2"]
    return notes


# A known gap (docs/alerts.md, "Known gap"): the software-thermal throttle is warned about from
# the samples' accrued violation time only; its end event, judged at once on the fast path,
# makes the backlog's older samples "older news" (collector/health/gpu.py, _clocks), so a
# throttle whose samples all wait behind its end event is not told. Strict: fixed, it fails.
GAPS = {("throttle=sw_thermal", "backlog")}
GAP = pytest.mark.xfail(strict=True, reason="its samples are superseded by its end event, judged first")


@pytest.mark.parametrize(
    ("fault", "lag"),
    [
        pytest.param(f, lag, id=f"{f}-{lag}", marks=[GAP] if (f, lag) in GAPS else [])
        for f in FAULTS
        for lag in LAGS
    ],
)
def test_a_fault_is_notified_once_whatever_the_ingest_lag(fault: str, lag: str) -> None:
    rule = FAULTS[fault]
    notes = [n for n in run(fault, LAGS[lag]) if n[0] == rule]
    assert notes == [(rule, "firing"), (rule, "resolved")]
