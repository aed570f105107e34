"""The health engine's per-sample shortcuts give the verdicts of the plain code: the spelled-out
InfiniBand error sum and the one-label check key agree with their generic forms (hypothesis),
and a simulated host running every node fault gives the same observations, one by one, and the
same check dates, with the shortcuts (the InfiniBand quiet fast path included) and without."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.faults import FaultSchedule
from agent.gpu.simulated import SimulatedBackend
from agent.sampler import Sequencer, build_inventory, build_sample
from agent.system import SimulatedSystem
from collector.health import HealthEngine, HealthState, Observation, codec, model, node
from collector.health.config import HealthConfig, NodeThresholds
from shared.frames import IbPort

T0 = 1_700_000_000.0
COUNT = st.none() | st.integers(min_value=0, max_value=2**40)


def generic_ib_errors(p: IbPort) -> int:
    return sum(getattr(p, f) or 0 for f in node._IB_ERRORS)


def generic_check_key(check: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    return ":".join((check, *(v for _, v in extra))) if extra else check


@given(st.lists(COUNT, min_size=len(node._IB_ERRORS), max_size=len(node._IB_ERRORS)))
def test_ib_error_sum_is_the_sum_of_every_error_counter(values: list[int | None]) -> None:
    p = IbPort(device="mlx5_0", **dict(zip(node._IB_ERRORS, values, strict=True)))
    assert node._ib_errors(p) == generic_ib_errors(p)


@given(
    st.text(min_size=1, max_size=20),
    st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=3).map(tuple),
)
def test_check_key_matches_the_generic_join(check: str, extra: tuple[tuple[str, str], ...]) -> None:
    assert model.check_key(check, extra) == generic_check_key(check, extra)


# every node fault kind, staggered and overlapping, each ending so its check clears again
FAULTS = [
    "ib_errors=600@10s+30s",
    "ib_flap@20s+5s",
    "ib_down=2@35s+20s",
    "ib_rate=200@50s+15s",
    "sxid=12028@40s+10s",
    "kmsg=oom_kill@45s+10s",
    "module_missing=nvidia_peermem@60s+15s",
    "service_down=nvidia-fabricmanager@65s+10s",
    "clock_skew=2@70s+10s",
    "fs_readonly@75s+10s",
    "dstate=40@80s+10s",
    "disk_full@85s+10s",
    "cpu=99@90s+10s",
    "gpu1:temp=95@30s+20s",
    "gpu3:pcie_replay=5000@55s+15s",
]


def judge() -> tuple[list[Observation], HealthState]:
    """Every observation of one simulated 8-GPU host sampled every second for 150 s."""
    clock = [0.0]
    schedule = FaultSchedule.parse([f"n1:{f}" if not f.startswith("gpu") else f"n1/{f}" for f in FAULTS])
    backend = SimulatedBackend(8, host="n1", seed=3, faults=schedule, clock=lambda: clock[0], wall=lambda: T0)
    system = SimulatedSystem(host="n1", seed=3, faults=schedule, clock=lambda: clock[0])
    backend.open()
    system.open()
    seqr = Sequencer(host="n1", provider="p")
    window = NodeThresholds(ib_flap_window=20.0, kmsg_window=20.0, sxid_window=20.0)
    engine, state = HealthEngine(HealthConfig(node=window)), HealthState()
    inventory = build_inventory(seqr, backend.inventory(), system.host_facts(), T0)
    state, out = engine.observe(state, inventory, T0)
    for t in range(150):
        clock[0] = float(t)
        frame = build_sample(seqr, interval_s=1.0, gpus=backend.sample(), system=system.sample(), ts=T0 + t)
        state, obs = engine.observe(state, frame, T0 + t)
        out += obs
        state, obs = engine.tick(state, T0 + t)
        out += obs
    return out, state


def test_node_fault_schedule_gives_the_same_verdicts_as_the_generic_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast, state = judge()
    # healthy again at the end: the InfiniBand fast path is armed (so it ran on the quiet stretches)
    assert state.hosts["n1"].ib_quiet is not None
    assert "ib_quiet" not in codec.health_snapshot(state, 0)["hosts"]["n1"]  # a memo, not saved
    monkeypatch.setattr(node.NodeChecks, "fast", False)
    monkeypatch.setattr(node, "_ib_errors", generic_ib_errors)
    monkeypatch.setattr(model, "check_key", generic_check_key)
    plain, plain_state = judge()
    assert plain_state.hosts["n1"].ib_quiet is None
    assert fast == plain
    # the checks end alike, dates included (the fast path dates what the full path would)
    assert state.hosts["n1"].checks == plain_state.hosts["n1"].checks
    problems: dict[str, Any] = {}
    for o in fast:
        if o.status != "healthy":
            problems.setdefault(o.check, o.status)
    # the schedule really trips the node checks (or the comparison would prove little)
    for check in ("host.ib_errors", "host.ib_flap", "host.ib_port", "host.sxid", "host.kmsg", "host.module"):
        assert check in problems, (check, sorted(problems))
