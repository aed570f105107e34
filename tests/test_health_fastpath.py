"""The health engine's fast path (GPUs whose checks are all quiet and healthy) gives the same
verdicts as the full checks, on random samples around every threshold (hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from collector.health import HealthEngine, HealthState
from collector.health.model import HEALTHY
from tests.support.gpu_fastpath import T0, FullOnly, frame


def opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), s)


CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "temp_c": opt(st.one_of(st.floats(40, 100), st.sampled_from([79.0, 84.9, 85.0, 85.1, 90.0, 92.0]))),
        "temp_slowdown_c": opt(st.floats(80, 95)),
        "temp_shutdown_c": opt(st.floats(85, 100)),
        "power_w": opt(st.one_of(st.floats(600, 730), st.sampled_from([714.0, 714.01]))),
        "power_limit_w": opt(st.sampled_from([0.0, 700.0])),
        "mem_used_bytes": opt(st.integers(90, 100)),  # 95 is the threshold
        "clock_event_reasons": opt(st.sampled_from([0, 0x1, 0x4, 0x8, 0x20, 0x40, 0x80, 0xC1])),
        "throttle_thermal_ns": opt(st.integers(0, 2)),
        "ecc_dbe_volatile": opt(st.integers(0, 1)),
        "ecc_sbe_volatile": opt(st.integers(0, 30)),
        "retired_pages_sbe": opt(st.integers(0, 63)),
        "retired_pages_dbe": opt(st.integers(0, 10)),
        "retired_pages_pending": opt(st.booleans()),
        "remapped_rows_uncorrectable": opt(st.integers(500, 520)),
        "remap_pending": opt(st.booleans()),
        "remap_failure": opt(st.booleans()),
        "pcie_replay_count": opt(st.integers(0, 40)),
        "pcie_link_gen": opt(st.integers(1, 7)),
        "pcie_link_width": opt(st.sampled_from([0, 1, 8, 16])),
        "nvlink_links_total": opt(st.sampled_from([0, 18])),
        "nvlink_links_up": opt(st.integers(16, 18)),
        "nvlink_crc_errors": opt(st.integers(0, 3)),
        "nvlink_replay_errors": opt(st.integers(0, 2)),
        "nvlink_recovery_errors": opt(st.integers(0, 2)),
        "recovery_action": opt(st.integers(0, 8)),
        "persistence_mode": opt(st.booleans()),
        "lost": st.booleans(),
        "util_gpu_pct": opt(st.sampled_from([0.0, 49.9, 50.0, 100.0])),
        "pcie_link_gen_max": opt(st.integers(3, 5)),
        "pcie_link_width_max": opt(st.sampled_from([0, 8, 16])),
        "mem_temp_c": opt(st.sampled_from([60.0, 89.9, 90.0, 95.0, 99.0])),
        "temp_mem_max_c": opt(st.sampled_from([95.0, 105.0])),
        "ecc_dbe_aggregate": opt(st.integers(0, 1)),
        "clock_sm_mhz": opt(st.sampled_from([300, 989, 990, 1980])),
        "clock_sm_app_mhz": opt(st.sampled_from([0, 1980])),
        "fan_pct": opt(st.sampled_from([0.0, 30.0])),
        "fabric_state": opt(st.integers(0, 4)),
        "fabric_status": opt(st.sampled_from([0, 999])),
        "fabric_health_mask": opt(st.sampled_from([0, 1, 2, 0x10, 0xAA])),
        "nvlink_crc_by_link": st.sampled_from([(), (0, 0), (0, 4)]),
        "nvlink_replay_by_link": st.sampled_from([(), (0, 0), (1, 0)]),
    },
)


# each node signal alone at its threshold, so the two paths are compared on every one of them
NODE_SIGNALS: list[dict[str, Any]] = [
    {"pcie_link_width": 8},
    {"pcie_link_gen": 3},
    {"pcie_link_gen": 3, "util_gpu_pct": 0.0},
    {"mem_temp_c": 90.0},
    {"mem_temp_c": 95.0},
    {"ecc_dbe_aggregate": 1},
    {"retired_pages_dbe": 1},
    {"clock_sm_mhz": 989},
    {"fan_pct": 0.0, "temp_c": 60.0},
    {"fabric_state": 1},
    {"fabric_state": 2},
    {"fabric_status": 999},
    {"fabric_health_mask": 1},
    {"fabric_health_mask": 0xAA},
    {"nvlink_crc_errors": None, "nvlink_crc_by_link": (0, 4)},
]


def _with_examples(test: Any) -> Any:
    for changes in NODE_SIGNALS:
        test = example(changes=changes, dt=5.0)(test)
    return test


@settings(max_examples=400, deadline=None)
@_with_examples
@given(changes=CHANGES, dt=st.sampled_from([1.0, 5.0, 60.0]))
def test_fast_path_agrees_with_full_checks(changes: dict[str, Any], dt: float) -> None:
    fast, full = HealthEngine(), HealthEngine()
    full.gpu = FullOnly(full.config.gpu)
    fs, ls = HealthState(), HealthState()
    for i in range(3):  # healthy history: the GPU's checks become quiet
        fs, _ = fast.observe(fs, frame(T0 + i), T0 + i)
        ls, _ = full.observe(ls, frame(T0 + i), T0 + i)
    assert fs.hosts["n"].gpus[0].quiet
    t = T0 + 2 + dt
    fs, fobs = fast.observe(fs, frame(t, **changes), t)
    ls, lobs = full.observe(ls, frame(t, **changes), t)
    problems = [(o.check, o.status, o.value) for o in lobs if o.status != HEALTHY]
    assert [(o.check, o.status, o.value) for o in fobs if o.status != HEALTHY] == problems
    fast_checks = fs.hosts["n"].gpus[0].checks
    for local, cs in ls.hosts["n"].gpus[0].checks.items():
        got = fast_checks.get(local)
        assert (got.status if got is not None else HEALTHY) == cs.status, local
    if not problems:  # and the stored readings advanced the same way, for the next rates
        assert fs.hosts["n"].gpus[0].last == ls.hosts["n"].gpus[0].last
