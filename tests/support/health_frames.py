"""Sample frames for the health and self-check tests."""

from __future__ import annotations

from typing import Any

from shared.frames import GpuSample, SampleFrame


def sample(ts: float, host: str = "node-1", gpus: int = 2, provider: str = "acme", **kw: Any) -> SampleFrame:
    return SampleFrame(
        host=host,
        provider=provider,
        boot_id="b1",
        seq=int(ts),
        ts=ts,
        interval_s=5.0,
        gpus=tuple(GpuSample(index=i, uuid=f"GPU-{host}-{i}", temp_c=50.0, **kw) for i in range(gpus)),
    )
