"""The health engine's per-sample shortcuts give the verdicts of the plain code: the spelled-out
InfiniBand error sum and the one-label check key agree with their generic forms (hypothesis),
and a simulated host running every node fault gives the same observations, one by one, and the
same check dates, with the shortcuts (the InfiniBand quiet fast path included) and without."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.faults import FaultSchedule
from agent.gpu.simulated import SimulatedBackend
from agent.sampler import Sequencer, build_event, build_inventory, build_sample
from agent.system import SimulatedSystem
from collector.health import HealthEngine, HealthState, codec, model, node
from collector.health.config import HealthConfig, ProviderThresholds
from collector.health.live import LiveRollup
from collector.health.rollup import rollup
from shared.frames import Frame, IbPort, replace
from tests.support.node_run import FAULTS, T0, judge

COUNT = st.none() | st.integers(min_value=0, max_value=2**40)


def generic_ib_errors(p: IbPort) -> int:
    return sum(getattr(p, f) or 0 for f in node._IB_ERRORS)


def generic_check_key(check: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    return ":".join((check, *(v for _, v in extra))) if extra else check


def plain_ok(self: model.Verdicts, check: str, value: float | None, extra: model.Extra = ()) -> None:
    """Every healthy verdict through the emitter (no shortcut for a quiet healthy check)."""
    self.em.emit(self.checks, check, self.base, model.HEALTHY, self.at, value=value, extra=extra)


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


RUNS, SEQS = ("", "b1"), (-1, 1, 2)
FRAMES = (None, *itertools.product(RUNS, SEQS))  # em.event / em.sample: none, or (run, seq)
CHECKS = (None, *itertools.product(model.STATUSES, (0, 1, 2), RUNS, SEQS))  # the check before


def test_a_healthy_verdict_is_what_the_emitter_makes_of_it() -> None:
    """Verdicts.ok's shortcut for a quiet healthy check against Emitter.emit, over every case
    (check absent or of any status, quiet count and concluding event; judging an event, a
    sample, or neither): the same check table after it (status, dates, quiet count, value,
    event) and the same observations."""
    for check, event, sample, healthy_for, extra in itertools.product(
        CHECKS, FRAMES, FRAMES, (1, 2), ((), (("nic", "eth0"),))
    ):
        results = []
        for ok in (model.Verdicts.ok, plain_ok):
            checks = {}
            if check is not None:
                status, quiet, run, seq = check
                checks[model.check_key("host.nic", extra)] = model.CheckStatus(
                    "host.nic", "k", {}, status, 1.0, 2.0, quiet, 5.0, "s", "a", run, seq
                )
            em = model.Emitter(healthy_for)
            em.event, em.sample = event, sample
            ok(model.Verdicts(em, checks, {"host": "h"}, 3.0), "host.nic", 0.5, extra)
            results.append((checks, em.out))
        assert results[0] == results[1], (check, event, sample, healthy_for, extra)


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
    monkeypatch.setattr(model.Verdicts, "ok", plain_ok)
    plain, plain_state = judge()
    assert plain_state.hosts["n1"].ib_quiet is None
    assert fast == plain
    # the checks end alike, dates included (the fast path dates what the full path would)
    assert state.hosts["n1"].checks == plain_state.hosts["n1"].checks
    for index, gs in state.hosts["n1"].gpus.items():
        assert gs.checks == plain_state.hosts["n1"].gpus[index].checks, index
    problems: dict[str, Any] = {}
    for o in fast:
        if o.status != "healthy":
            problems.setdefault(o.check, o.status)
    # the schedule really trips the node checks (or the comparison would prove little)
    for check in (
        "host.ib_errors", "host.ib_flap", "host.ib_port", "host.sxid", "host.kmsg", "host.module",
        "gpu.ecc_dbe", "gpu.clock_events", "gpu.xid",
    ):  # fmt: skip
        assert check in problems, (check, sorted(problems))


def test_the_live_rollup_marks_what_a_judged_sample_changed() -> None:
    """LiveRollup.mark with the observed hosts (a sample marks its host only when observed or
    when its GPUs' identity, staleness or loss changed) keeps the rollup equal to a full one
    after every frame, over the fault schedule, a GPU left out of samples for a while and a
    second, healthy host without an inventory (its GPU goes stale and back unobserved)."""
    clock = [0.0]
    schedule = FaultSchedule.parse([f"n1:{f}" if not f.startswith("gpu") else f"n1/{f}" for f in FAULTS])
    sims = []
    for name, faults in (("n1", schedule), ("n2", None)):
        backend = SimulatedBackend(
            8, host=name, seed=3, faults=faults, clock=lambda: clock[0], wall=lambda: T0
        )
        system = SimulatedSystem(host=name, seed=3, faults=faults, clock=lambda: clock[0])
        backend.open()
        system.open()
        sims.append((Sequencer(host=name, provider="p"), backend, system))
    engine, state = HealthEngine(HealthConfig()), HealthState()
    live = LiveRollup(lambda: state, ProviderThresholds())
    marked = 0
    for t in range(150):
        clock[0] = float(t)
        for seqr, backend, system in sims:
            frames: list[Frame] = []
            if t == 0 and seqr.host == "n1":  # n2 sends none: no GPU count to miss GPU 7 against
                frames.append(build_inventory(seqr, backend.inventory(), system.host_facts(), T0))
            frames += [build_event(seqr, ev, 1) for ev in backend.poll_events()]
            sample = build_sample(
                seqr, interval_s=1.0, gpus=backend.sample(), system=system.sample(), ts=T0 + t
            )
            if 30 <= t < 40:  # GPU 7 missing from the samples (stale, unobserved on n2), then back
                sample = replace(sample, gpus=sample.gpus[:7])
            frames.append(sample)
            for f in frames:
                state, obs = engine.observe(state, f, T0 + t)
                before = len(live._dirty)
                live.mark([f], {o.labels.get("host", "") for o in obs})
                marked += len(live._dirty) - before
                assert live.current() == rollup(state, ProviderThresholds()), (t, f.kind)
        state, obs = engine.tick(state, T0 + t)
        live.mark([], {o.labels.get("host", "") for o in obs})
        live.scan()
    assert marked < 150, marked  # of 300 samples: most quiet ones mark nothing
