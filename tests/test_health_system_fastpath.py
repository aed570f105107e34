"""The system sample's quiet fast path (``HostChecks._quiet``: a host whose system checks all
ended healthy and quiet, sampled again in the same shape and within every threshold, has its
checks only dated) gives the verdicts of the full checks: over random sequences of system
samples around every threshold, shape change and time step (hypothesis), and over the
simulated host's node fault schedule, the same observations one by one and the same checks,
dates included, with the fast path and without."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.health import HealthEngine, HealthState, Observation, host
from collector.health.config import HealthConfig, HealthSection, NodeThresholds
from shared import frames as fr
from shared.frames import replace
from tests.support.health_dump import state_to_dict
from tests.support.node_run import judge

T0 = 1_700_000_000.0
PORT = fr.IbPort(
    device="mlx5_0", port=1, state="ACTIVE", phys_state="LinkUp", rate_gbps=400.0, link_layer="InfiniBand",
    symbol_error=0, link_downed=0,
)  # fmt: skip
BASE = fr.SystemSample(
    cpu_pct=10.0, cpu_count=8, load_5=1.0, mem_total_bytes=100, mem_available_bytes=50,
    swap_total_bytes=100, swap_used_bytes=10, fds_open=10, fds_max=100,
    disks=(fr.DiskUsage("/", 100, 10, 90, False, 100, 10), fr.DiskUsage("/data", 100, 10, 90, None, 0, None)),
    nics=(fr.NicCounters("eth0", True), fr.NicCounters("eth1", None)),
    ib_ports=(PORT, replace(PORT, port=2)),
    modules=(fr.ModuleState("nvidia", True),),
    services=(fr.ServiceState("nvidia-fabricmanager", "loaded", "active", "running"),),
    clock=fr.ClockSync(True, 0.001), dstate_procs=0,
)  # fmt: skip


def opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), s)


PCT = st.one_of(st.integers(0, 100), st.sampled_from([49, 50, 51, 84, 85, 89, 90, 94, 95, 96, 97]))
DISK = st.builds(
    fr.DiskUsage,
    st.sampled_from(["/", "/data"]),
    st.sampled_from([0, 100]),
    PCT,
    st.just(0),
    opt(st.booleans()),
    st.sampled_from([None, 0, 100]),
    opt(PCT),
)
NIC = st.builds(
    fr.NicCounters,
    st.sampled_from(["eth0", "eth1"]),
    opt(st.booleans()),
    st.just(None),
    st.just(0),
    st.just(0),
    st.sampled_from([0, 1, 20]),  # errors (10/min warns)
    st.just(0),
    st.sampled_from([0, 1, 5000]),  # drops (1000/min warns)
)
PORT_VARIANTS = (
    (),
    BASE.ib_ports,
    (PORT,),
    (PORT, PORT),  # named twice
    (replace(PORT, state="DOWN"), replace(PORT, port=2)),
    (replace(PORT, rate_gbps=200.0), replace(PORT, port=2)),
    (replace(PORT, symbol_error=5), replace(PORT, port=2)),
    (replace(PORT, symbol_error=1000), replace(PORT, port=2)),
    (replace(PORT, link_downed=1), replace(PORT, port=2)),
)
PORTS = st.sampled_from(PORT_VARIANTS)
LOG_VARIANTS = (
    (),
    (fr.KernelLogCount("oom_kill", None, 1),),
    (fr.KernelLogCount("oom_kill", None, 2),),
    (fr.KernelLogCount("aer_corrected", None, 3),),
    (fr.KernelLogCount("sxid", 12028, 1, False),),
    (fr.KernelLogCount("oom_kill", None, 1), fr.KernelLogCount("oom_kill", None, 0)),  # named twice
)
LOG = st.sampled_from(LOG_VARIANTS)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "cpu_pct": opt(st.one_of(PCT.map(float), st.just(math.nan))),
    "cpu_count": st.sampled_from([None, 0, 8]),
    "load_5": opt(st.sampled_from([0.0, 15.9, 16.0, 31.9, 32.0, 40.0])),
    "mem_total_bytes": st.sampled_from([None, 0, 100]),
    "mem_available_bytes": opt(PCT),
    "swap_used_bytes": opt(PCT),
    "fds_open": opt(PCT),
    "fds_max": st.sampled_from([None, 0, 100]),
    "disks": st.lists(DISK, max_size=3).map(tuple),
    "nics": st.lists(NIC, max_size=3).map(tuple),
    "ib_ports": PORTS,
    "kernel_log": LOG,
    "modules": st.sampled_from([(), BASE.modules, (fr.ModuleState("nvidia", False),)]),
    "services": st.sampled_from(
        [(), BASE.services, (fr.ServiceState("nvidia-fabricmanager", "loaded", "failed", "failed"),)]
    ),
    "clock": opt(
        st.builds(fr.ClockSync, opt(st.booleans()), opt(st.sampled_from([0.0, -0.09, 0.1, -0.5, 1.0, 3.0])))
    ),
    "dstate_procs": opt(st.sampled_from([0, 1, 10, 40])),
    # one field of one mount or interface (the same shape: the fast path still applies)
    "disk": st.tuples(
        st.integers(0, 2),
        st.one_of(
            st.tuples(st.sampled_from(["used_bytes", "inodes_used"]), PCT),
            st.tuples(st.just("readonly"), opt(st.booleans())),
        ),
    ),
    "nic": st.tuples(
        st.integers(0, 2),
        st.one_of(
            st.tuples(st.sampled_from(["rx_errors", "tx_errors"]), st.sampled_from([0, 1, 10, 11, 20])),
            st.tuples(st.sampled_from(["rx_drops", "tx_drops"]), st.sampled_from([0, 999, 1000, 1001, 5000])),
            st.tuples(st.just("up"), opt(st.booleans())),
        ),
    ),
}
# one field at a time (several at once mostly end the quiet the fast path needs)
CHANGE = st.one_of(*(st.fixed_dictionaries({k: v}) for k, v in FIELDS.items()))
# a step: seconds since the last one (0 and back: no rates), what changes (nothing, a field, or
# back to the healthy sample first, so the checks go quiet between problems), and now and then an
# inventory naming a GPU model (an H100 expects 400 Gb/s InfiniBand ports)
STEP = st.tuples(
    st.sampled_from([1.0, 1.0, 1.0, 1.0, 1.0, 2.5, 0.0, -1.0]),
    st.one_of(st.just({}), CHANGE, st.just({"base": None}), CHANGE.map(lambda c: {"base": None, **c})),
    st.one_of(
        st.just(None), st.just(None), st.just(None), st.sampled_from(["NVIDIA H100 80GB HBM3", "Tesla T4"])
    ),
)
CONFIG = HealthConfig(
    health=HealthSection(emit_healthy_for=2),
    node=NodeThresholds(ib_ports_expected=2, ib_flap_window=3.0, kmsg_window=3.0, sxid_window=3.0),
)


def run(
    steps: list[tuple[float, dict[str, Any], str | None]], fast: bool, config: HealthConfig = CONFIG
) -> list[Any]:
    """After every frame: its observations and the whole health state."""
    engine, state = HealthEngine(config), HealthState()
    engine.host.fast = engine.host.node.fast = fast
    s, ts, out, seq = BASE, T0, [], 0
    for dt, changes, model in steps:
        ts += dt
        seq += 1
        if model is not None:
            inv = fr.InventoryFrame(
                host="h", provider="p", boot_id="b", seq=seq, ts=ts, gpus=(fr.GpuInfo(0, "G", model),)
            )
            state, obs = engine.observe(state, inv, ts)
            out.append(obs)
            seq += 1
        for key, value in changes.items():
            if key == "base":  # back to the healthy sample: the checks go quiet again
                s = BASE
            elif key in ("disk", "nic"):  # (which one, (field, value))
                i, (name, v) = value
                items = list(s.disks if key == "disk" else s.nics)
                if i < len(items):
                    items[i] = replace(items[i], **{name: v})
                    s = replace(s, **{key + "s": tuple(items)})
            else:
                s = replace(s, **{key: value})
        frame = fr.SampleFrame(host="h", provider="p", boot_id="b", seq=seq, ts=ts, interval_s=1.0, system=s)
        state, obs = engine.observe(state, frame, ts)
        out.append((obs, state_to_dict(state)))  # every field but the memos, dates included
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, min_size=5, max_size=40))
def test_random_system_samples_give_the_full_checks_verdicts(
    steps: list[tuple[float, dict[str, Any], str | None]],
) -> None:
    fast, plain = run(steps, True), run(steps, False)
    for i, (a, b) in enumerate(zip(fast, plain, strict=True)):
        assert a == b, (i, steps[: i + 1])


def _disk(i: int, **kw: Any) -> dict[str, Any]:
    disks = list(BASE.disks)
    disks[i] = replace(disks[i], **kw)
    return {"disks": tuple(disks)}


def _nic(i: int, **kw: Any) -> dict[str, Any]:
    nics = list(BASE.nics)
    nics[i] = replace(nics[i], **kw)
    return {"nics": tuple(nics)}


# one change to a quiet host's sample, on each side of every threshold and shape the fast path
# decides on (the hypothesis test above mixes them; here each meets the fast path for sure)
CASES: list[dict[str, Any]] = [
    *({"cpu_pct": x} for x in (94.9, 95.0, math.nan, None)),
    *({"mem_available_bytes": x} for x in (11, 10, 3, None)),
    {"mem_total_bytes": 0},
    *({"swap_used_bytes": x} for x in (49, 50, 90, None)),
    *({"fds_open": x} for x in (79, 80, 95, None)),
    *({"load_5": x} for x in (15.9, 16.0, 32.0, None)),
    {"cpu_count": 0},
    *(_disk(0, used_bytes=x) for x in (84, 85, 95)),
    _disk(1, total_bytes=0),
    *(_disk(0, readonly=x) for x in (True, None)),
    _disk(1, readonly=False),
    *(_disk(0, inodes_used=x) for x in (89, 90, 97, None)),
    _disk(1, inodes_total=100, inodes_used=1),
    {"disks": BASE.disks[::-1]},
    {"disks": BASE.disks[:1]},
    *(_nic(0, rx_errors=x) for x in (0, 1)),
    *(_nic(1, tx_drops=x) for x in (16, 17)),
    *(_nic(i, up=x) for i in (0, 1) for x in (False, None, True)),
    {"nics": BASE.nics[::-1]},
    {"nics": (*BASE.nics, fr.NicCounters("eth2", True))},
    {"nics": (BASE.nics[0], replace(BASE.nics[1], name="eth0"))},
    {"nics": ()},
    *({"ib_ports": p} for p in PORT_VARIANTS),
    *({"kernel_log": k} for k in LOG_VARIANTS),
    {"modules": ()},
    {"modules": (fr.ModuleState("nvidia", False),)},
    {"services": ()},
    {"services": (fr.ServiceState("nvidia-fabricmanager", "loaded", "failed", "failed"),)},
    {"services": (fr.ServiceState("nvidia-fabricmanager", "masked", "inactive", "dead"),)},
    *({"clock": fr.ClockSync(True, x)} for x in (0.099, 0.1, -0.1, 1.0, None)),
    *({"clock": fr.ClockSync(x, 0.0)} for x in (False, None)),
    {"clock": None},
    *({"dstate_procs": x} for x in (1, 10, None)),
]


@pytest.mark.parametrize("healthy_for", [1, 2])
@pytest.mark.parametrize("dt", [1.0, 2.5, 0.0])
def test_each_change_to_a_quiet_host_gives_the_full_checks_verdicts(dt: float, healthy_for: int) -> None:
    """A quiet host (on the fast path), then one change: at the first sample of it, at a second
    equal one, and back to the quiet sample; also under an inventory naming an H100 (400 Gb/s
    ports expected) and back, and with that model arriving while the changed sample is quiet."""
    config = HealthConfig(health=HealthSection(emit_healthy_for=healthy_for), node=CONFIG.node)
    for change in CASES:
        for model in (None, "NVIDIA H100 80GB HBM3"):
            quiet = [(1.0, {}, None)] * 3
            steps = [
                *quiet,
                (dt, change, model),
                (1.0, {}, None),
                (1.0, {"base": None}, "Tesla T4" if model else None),
                *quiet,
                (dt, change, None),
                *quiet,
                (1.0, {}, model),  # the model changes under a quiet sample
                *quiet,
            ]
            assert run(steps, True, config) == run(steps, False, config), (change, model)


def count_fast_path(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each call of the fast path answered, from now on."""
    taken: list[bool] = []
    quiet = host.HostChecks._quiet

    def counted(self: host.HostChecks, *args: Any) -> bool:
        r = quiet(self, *args)
        taken.append(r)
        return r

    monkeypatch.setattr(host.HostChecks, "_quiet", counted)
    return taken


def test_quiet_samples_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet host's samples take it (each dating its checks), then a problem ends it, and it
    comes back once the checks are quiet again (the comparison above is not vacuous)."""
    taken = count_fast_path(monkeypatch)
    hot = {"cpu_pct": 99.0}
    steps = (
        [(1.0, {}, None)] * 6 + [(1.0, hot, None)] + [(1.0, {"cpu_pct": 10.0}, None)] + [(1.0, {}, None)] * 6
    )
    fast = run(steps, True)
    assert fast == run(steps, False)
    assert taken.count(True) >= 6, taken
    assert taken[-1] is True
    obs, state = fast[-1]
    checks = state["hosts"]["h"]["checks"]
    assert obs == []
    assert checks["host.cpu"]["at"] == checks["host.nic:eth0"]["at"] == T0 + len(steps)


def test_node_fault_schedule_gives_the_same_verdicts_without_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The simulated 8-GPU host's node faults (InfiniBand, SXids, kernel log, modules, services,
    clock, mounts, D state, CPU, disk) with the fast path (it ran on the quiet stretches) and
    without it."""
    taken = count_fast_path(monkeypatch)
    fast, state = judge()
    assert taken.count(True) > 30, taken.count(True)
    monkeypatch.setattr(host.HostChecks, "fast", False)
    plain: tuple[list[Observation], HealthState] = judge()
    assert fast == plain[0]
    assert state.hosts["n1"].checks == plain[1].hosts["n1"].checks
    assert state.hosts["n1"].system_quiet is not None
    assert plain[1].hosts["n1"].system_quiet is None
