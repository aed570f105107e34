"""The GPU fast path's shortcuts for counters (a counter equal to the last sample's is not turned
into a delta) and for the node signals (the SM clock and the fabric looked at only when they may
be wrong) give the full checks' verdicts: a quiet GPU whose counters start from non-zero values
and then move, or whose clock or fabric sits at the edge, judged with the fast path and without."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.gpu_fastpath import dated_checks, judge

# (the quiet GPU's readings, then the next sample's)
CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"retired_pages_sbe": 2}, {"retired_pages_sbe": 3}),
    ({"retired_pages_sbe": 2}, {"retired_pages_sbe": 2}),
    ({"retired_pages_dbe": 1}, {"retired_pages_dbe": 2}),
    ({"retired_pages_sbe": 2, "retired_pages_dbe": 1}, {"retired_pages_sbe": 1, "retired_pages_dbe": 3}),
    ({"retired_pages_sbe": 2, "retired_pages_dbe": 1}, {"retired_pages_sbe": 3, "retired_pages_dbe": 0}),
    ({"ecc_sbe_volatile": 5}, {"ecc_sbe_volatile": 5}),
    ({"ecc_sbe_volatile": 5}, {"ecc_sbe_volatile": 200}),
    ({"ecc_sbe_volatile": 5}, {"ecc_sbe_volatile": 2}),  # reset: the new count is the delta
    ({"pcie_replay_count": 7}, {"pcie_replay_count": 7}),
    ({"pcie_replay_count": 7}, {"pcie_replay_count": 5000}),
    ({"throttle_thermal_ns": 10}, {"throttle_thermal_ns": 10}),
    ({"throttle_thermal_ns": 10}, {"throttle_thermal_ns": 20}),
    ({"clock_sm_app_mhz": 1980, "clock_sm_mhz": 1980}, {"clock_sm_mhz": 990}),
    ({"clock_sm_app_mhz": 1980, "clock_sm_mhz": 1980}, {"clock_sm_mhz": 989}),
    ({"clock_sm_app_mhz": 1980, "clock_sm_mhz": 1980}, {"clock_sm_mhz": 989, "util_gpu_pct": 0.0}),
    ({"fabric_state": 3, "fabric_status": 0}, {"fabric_health_mask": 0}),
    ({"fabric_state": 3, "fabric_status": 0}, {"fabric_health_mask": 0x2}),  # a field saying FALSE
    ({"fabric_state": 3, "fabric_status": 0}, {"fabric_health_mask": 0x1}),
    ({"fabric_state": 3, "fabric_status": 0}, {"fabric_status": 999}),
    ({"fabric_state": 3, "fabric_status": 0}, {"fabric_state": 2}),
]


@pytest.mark.parametrize(("before", "after"), CASES)
def test_counters_and_signals_of_a_quiet_gpu_give_the_full_checks_verdicts(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    results = []
    for full in (False, True):
        # healthy history (the GPU's checks become quiet), the change, the same readings once more
        out, gs, quiet = judge([before] * 3 + [{**before, **after}] * 2, full)
        if not full:
            assert quiet[2], before
        results.append((out, dated_checks(gs), gs.last, gs.last_ts, gs.memory_trend_at, gs.throttle_since))
    assert results[0] == results[1]
