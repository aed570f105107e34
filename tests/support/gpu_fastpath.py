"""A GPU sample near every threshold, and the GPU checks without their fast path, for the tests
that compare the health engine's GPU fast path with the full checks."""

from __future__ import annotations

from typing import Any

from collector.health.gpu import GpuChecks
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
