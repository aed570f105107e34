"""Frame size and decode cost: the sample of a simulated 8-GPU host in schema v1 (what agents of
the previous release send: every record a map, every field in every sample) and v2 (tables,
static GPU facts in the inventory), as ``gpuwarden fleet`` builds them.

Bytes per GPU-sample is the sample frame's bytes / 8 (mean over hosts and ticks); the v2 figure
is also given with the inventory's share (sent every 5 minutes: at a 5 s interval, 1/60 of an
inventory per sample). Decode is ``shared.frames.decode`` per frame (msgspec), v2 with the
collector's join of the static facts (``collector.static.StaticFacts``) added (the decoder this
replaced, hand-written checks with generated code, took ~60 us of CPU per v1 frame of an
8-GPU simulated host on the 2-core development machine); and encode per
frame, the agent's side. Times are CPU time of this process, best of 5.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from agent.gpu.simulated import SimulatedBackend
from agent.sampler import INVENTORY_EVERY_S, InventorySchedule, Sequencer, build_inventory, build_sample
from agent.system import SimulatedSystem
from collector.static import StaticFacts
from shared.frames import SampleFrame, decode, encode, encode_v1

HOSTS = int(os.environ.get("BENCH_FRAME_HOSTS", "40"))
TICKS = 3
GPUS = 8
INTERVAL_S = 5.0
DECODE_ROUNDS = int(os.environ.get("BENCH_FRAME_ROUNDS", "2000"))


def frames() -> tuple[list[bytes], list[bytes], list[bytes]]:
    v1: list[bytes] = []
    v2: list[bytes] = []
    inv: list[bytes] = []
    for i in range(HOSTS):
        seqr = Sequencer(host=f"host-{i:04d}", provider=f"provider-{i % 4}")
        backend = SimulatedBackend(GPUS, host=seqr.host, seed=i)
        backend.open()
        system = SimulatedSystem(host=seqr.host, seed=i)
        system.open()
        schedule = InventorySchedule()
        for _ in range(TICKS):
            gpus = backend.sample()
            full = schedule.due(backend.inventory(), gpus)
            if full is not None:
                inv.append(encode(build_inventory(seqr, full, system.host_facts())))
            f = build_sample(seqr, interval_s=INTERVAL_S, gpus=gpus, system=system.sample())
            v1.append(encode_v1(f))
            v2.append(encode(f, static=False))
    return v1, v2, inv


def _per_frame_us(fn: Any, data: list[bytes]) -> float:
    """CPU time (this process's, so that other load on the machine does not count), best of 5."""
    best = float("inf")
    for _ in range(5):
        n = 0
        t0 = time.process_time()
        while n < DECODE_ROUNDS // 5:
            for d in data:
                fn(d)
                n += 1
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def run() -> list[tuple[str, str, str]]:
    v1, v2, inv = frames()
    b1 = statistics.mean(len(d) for d in v1) / GPUS
    b2 = statistics.mean(len(d) for d in v2) / GPUS
    per_sample_inv = statistics.mean(len(d) for d in inv) / (INVENTORY_EVERY_S / INTERVAL_S) / GPUS
    static = StaticFacts()
    for d in inv:
        static.join(decode(d))
    us1 = _per_frame_us(decode, v1)
    us2 = _per_frame_us(decode, v2)
    us2j = _per_frame_us(lambda d: static.join(decode(d)), v2)
    sample = decode(v1[0])
    assert isinstance(sample, SampleFrame)
    enc1 = _per_frame_us(lambda _: encode_v1(sample), v1[:1])
    enc2 = _per_frame_us(lambda _: encode(sample, static=False), v1[:1])
    return [
        ("wire: bytes per GPU-sample, v1 (8-GPU simulated host)", f"{b1:,.0f}", "(before)"),
        ("wire: bytes per GPU-sample, v2", f"{b2:,.0f}", "<= 350"),
        ("wire: v2 + inventory every 5 min (5 s interval)", f"{b2 + per_sample_inv:,.0f}", "<= 350"),
        ("decode: us per v1 sample frame (8 GPUs; the old decoder took ~60)", f"{us1:.1f}", "(old layout)"),
        ("decode: us per v2 sample frame (8 GPUs)", f"{us2:.1f}", "<= 60 (old decoder, v1)"),
        ("decode: us per v2 sample frame + static join", f"{us2j:.1f}", "<= 60 (old decoder, v1)"),
        ("encode: us per v1 sample frame (agent)", f"{enc1:.1f}", "(before)"),
        ("encode: us per v2 sample frame (agent)", f"{enc2:.1f}", "< 1000 (5 ms tick budget)"),
    ]


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))
