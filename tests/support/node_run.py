"""One simulated 8-GPU host running every node fault, judged second by second by the health
engine (the fast event path first, each sample a second late as the ingest does): the
observations and the state, for tests that compare the engine's shortcuts with the plain code."""

from __future__ import annotations

from agent.faults import FaultSchedule
from agent.gpu.simulated import SimulatedBackend
from agent.sampler import Sequencer, build_event, build_inventory, build_sample
from agent.system import SimulatedSystem
from collector.health import HealthEngine, HealthState, Observation
from collector.health.config import HealthConfig, NodeThresholds

T0 = 1_700_000_000.0

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
    # GPU faults with events, which the lagging samples meet (Emitter.superseded)
    "gpu2:ecc_dbe@95s+10s",
    "gpu5:throttle=hw_slowdown@100s+10s",
    "gpu6:xid=79@110s+5s",
    "gpu4:lost@120s+10s",
]


def judge() -> tuple[list[Observation], HealthState]:
    """Every observation of one simulated 8-GPU host sampled every second for 150 s."""
    clock = [0.0]
    schedule = FaultSchedule.parse([f"n1:{f}" if not f.startswith("gpu") else f"n1/{f}" for f in FAULTS])
    backend = SimulatedBackend(8, host="n1", seed=3, faults=schedule, clock=lambda: clock[0], wall=lambda: T0)
    system = SimulatedSystem(host="n1", seed=3, faults=schedule, clock=lambda: clock[0])
    backend.open()
    system.open()
    seqr = Sequencer(host="n1", provider="p", boot_id="b00700000000000a")  # the same in both runs
    window = NodeThresholds(ib_flap_window=20.0, kmsg_window=20.0, sxid_window=20.0)
    engine, state = HealthEngine(HealthConfig(node=window)), HealthState()
    inventory = build_inventory(seqr, backend.inventory(), system.host_facts(), T0)
    state, out = engine.observe(state, inventory, T0)
    lagging = None
    for t in range(150):
        clock[0] = float(t)
        frame = build_sample(seqr, interval_s=1.0, gpus=backend.sample(), system=system.sample(), ts=T0 + t)
        for ev in backend.poll_events():  # the fast event path: judged before the sample taken before it
            state, obs = engine.observe(state, build_event(seqr, ev, 1), T0 + t)
            out += obs
        if lagging is not None:  # the ingest: each sample judged a second late
            state, obs = engine.observe(state, lagging, T0 + t)
            out += obs
        lagging = frame
        state, obs = engine.tick(state, T0 + t)
        out += obs
    return out, state
