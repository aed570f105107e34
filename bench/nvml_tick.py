"""Python cost of one NvmlBackend.sample() tick for 8 GPUs, against the recorded pynvml fake.

The fake answers from memory with the binding's real ctypes structures, so the figure is the
backend's own overhead plus the fake's (an upper bound for the Python part around NVML; the
driver's own time on real GPUs comes on top). Processes are read from a temporary /proc.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from agent.gpu.nvml import NvmlBackend
from tests.support.fake_pynvml import FakeNvml

GPUS = 8
TICKS = 400
GOAL_US = 5000.0  # 5 ms per tick = 0.1% of one core at the default 5 s interval


def _proc_root(root: Path) -> str:
    pid = root / "4242"
    pid.mkdir()
    (pid / "comm").write_text("python3\n")
    (pid / "cgroup").write_text("0::/system.slice/docker-" + "ab" * 32 + ".scope\n")
    return str(root)


def measure(ticks: int = TICKS) -> tuple[list[float], int]:
    """Per-tick wall times in microseconds, and NVML calls per tick (a field batch is one call)."""
    fake = FakeNvml.load(gpus=GPUS, cache_fields=True)
    with tempfile.TemporaryDirectory() as tmp:
        backend = NvmlBackend(fake.module, proc_root=_proc_root(Path(tmp)), events=False)
        backend.open()
        for _ in range(20):  # warm up: not-supported caches settle
            backend.sample()
        before = sum(fake.calls.values())
        times = []
        for _ in range(ticks):
            t0 = time.perf_counter_ns()
            backend.sample()
            times.append((time.perf_counter_ns() - t0) / 1000.0)
        calls = (sum(fake.calls.values()) - before) // ticks
        backend.close()
    return times, calls


def run() -> list[tuple[str, str, str]]:
    times, calls = measure()
    times.sort()
    median = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return [
        ("nvml tick, 8 GPUs, median (fake NVML)", f"{median:.0f} us", f"< {GOAL_US:.0f} us"),
        ("nvml tick, 8 GPUs, p99 (fake NVML)", f"{p99:.0f} us", f"< {2 * GOAL_US:.0f} us"),
        ("nvml tick, per GPU, median", f"{median / GPUS:.0f} us", f"< {GOAL_US / GPUS:.0f} us"),
        ("nvml calls per tick, 8 GPUs", str(calls), "info"),
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
