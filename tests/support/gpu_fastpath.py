"""A GPU sample near every threshold, and the GPU checks without their fast path, for the tests
that compare the health engine's GPU fast path with the full checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from collector.health import HealthEngine, HealthState, Observation
from collector.health.gpu import GpuChecks
from collector.health.model import GpuState
from shared.frames import GpuSample, SampleFrame, replace
from tests.support.frame_fixtures import judged_gpu

T0 = 1_700_000_000.0
# the temperature limits above the temperatures tried; the memory in units of 1 % (95: the threshold)
BASE = judged_gpu(
    0, "GPU-0", temp_slowdown_c=100.0, temp_shutdown_c=110.0, mem_used_bytes=10, mem_total_bytes=100
)


class FullOnly(GpuChecks):
    def quiet_sample(self, gs: Any, g: GpuSample, ts: float) -> bool:
        return False


def frame(ts: float, **kw: Any) -> SampleFrame:
    return SampleFrame(host="n", provider="p", boot_id="b", seq=int(ts), ts=ts, gpus=(replace(BASE, **kw),))


def judge(
    readings: Sequence[Mapping[str, Any]], full: bool
) -> tuple[list[list[Observation]], GpuState, list[bool]]:
    """Samples of ``readings``, one a second from T0, judged with the fast path or, with
    ``full``, the full checks only: each sample's observations, the GPU's state at the end, and
    whether the GPU was quiet (may take the fast path) after each sample."""
    engine, state = HealthEngine(), HealthState()
    if full:
        engine.gpu = FullOnly(engine.config.gpu)
    out, quiet = [], []
    for i, kw in enumerate(readings):
        state, obs = engine.observe(state, frame(T0 + i, **kw), T0 + i)
        out.append(obs)
        quiet.append(state.hosts["n"].gpus[0].quiet)
    return out, state.hosts["n"].gpus[0], quiet


def dated_checks(gs: GpuState) -> dict[str, tuple[Any, ...]]:
    """The GPU's checks as both paths must leave them (the fast path leaves its quiet checks
    undated: only the full path dates them, so ``at`` is left out)."""
    return {k: (c.status, c.since, c.quiet, c.summary) for k, c in gs.checks.items()}
