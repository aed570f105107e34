"""Node checks of the health engine (issue 14): InfiniBand, kernel-log classes, SXids, modules,
services, clock, read-only mounts, inodes and D state; a source the node lacks is not judged."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from agent.ib import IbReader
from collector.health import HealthEngine, HealthState
from collector.health.codec import state_from_dict
from collector.health.config import HealthConfig, NodeThresholds, expected_ib, health_config_from
from collector.health.model import Observation
from shared.errors import ConfigError
from shared.frames import (
    ClockSync,
    DiskUsage,
    GpuInfo,
    InventoryFrame,
    KernelLogCount,
    ModuleState,
    SampleFrame,
    ServiceState,
    SystemSample,
    replace,
)
from shared.sxid import parse_catalog
from tests.support.health_dump import state_to_dict
from tests.support.sysfs_ib import write_tree

T0 = 1_700_000_000.0
H100 = "NVIDIA H100 80GB HBM3"
with tempfile.TemporaryDirectory() as _sys:  # 8 InfiniBand at 400 Gb/s + a RoCE bond at 200, as read
    H100_PORTS = IbReader(str(write_tree(Path(_sys)))).read() or ()


class Host:
    """One host fed to the engine: an optional inventory, then samples every 5 s."""

    def __init__(self, model: str | None = H100, cfg: NodeThresholds | None = None) -> None:
        self.engine = HealthEngine(HealthConfig(node=cfg or NodeThresholds()))
        self.state = HealthState()
        self.seq = 0
        self.t = T0
        if model is not None:
            inv = InventoryFrame(
                host="n1",
                provider="p",
                boot_id="b",
                seq=0,
                ts=T0,
                gpus=tuple(GpuInfo(index=i, uuid=f"GPU-{i}", name=model) for i in range(8)),
            )
            self.state, _ = self.engine.observe(self.state, inv, T0)

    def sample(self, system: SystemSample) -> list[Observation]:
        self.seq += 1
        self.t += 5.0
        frame = SampleFrame(
            host="n1", provider="p", boot_id="b", seq=self.seq, ts=self.t, interval_s=5.0, system=system
        )
        self.state, obs = self.engine.observe(self.state, frame, self.t)
        return obs


def problems(obs: list[Observation]) -> dict[str, tuple[str, dict[str, str]]]:
    """check -> (status, subject labels) of every non-healthy observation."""
    out = {}
    for o in obs:
        if o.status != "healthy" and o.check != "host.gpu_missing":  # these samples carry no GPUs
            extra = {k: v for k, v in o.labels.items() if k not in ("provider", "host")}
            out[f"{o.check}{sorted(extra.items())}"] = (o.status, extra)
    return out


def node(**kw: Any) -> SystemSample:
    return SystemSample(cpu_pct=10.0, **kw)


def test_a_node_without_the_sources_is_not_judged() -> None:
    h = Host()
    for _ in range(3):
        obs = h.sample(node(absent=("ib", "nvswitch", "kmsg", "systemd")))
        assert not [
            o for o in obs if o.check.startswith(("host.ib", "host.kmsg", "host.sxid", "host.service"))
        ]
    obs = h.sample(SystemSample(cpu_pct=10.0))  # an older agent: none of the node fields
    assert {o.check for o in obs} <= {"host.cpu", "host.gpu_missing"}


def test_real_h100_ports_are_healthy_and_the_roce_bond_is_not_rate_judged() -> None:
    h = Host()
    for _ in range(3):
        obs = h.sample(node(ib_ports=H100_PORTS))
        assert problems(obs) == {}
    checks = {(o.check, o.labels.get("port")) for o in h.state.hosts["n1"].checks.values() for o in [o]}
    assert ("host.ib_port", "mlx5_bond_0/1") in checks
    assert ("host.ib_ports", None) in checks


def test_rate_below_expected_and_port_down() -> None:
    h = Host()
    h.sample(node(ib_ports=H100_PORTS))
    slow = replace(H100_PORTS[2], rate_gbps=200.0)
    down = replace(H100_PORTS[3], state="DOWN", phys_state="Polling")
    bond_down = replace(H100_PORTS[8], state="DOWN", phys_state="Disabled")
    ports = (*H100_PORTS[:2], slow, down, *H100_PORTS[4:8], bond_down)
    got = problems(h.sample(node(ib_ports=ports)))
    assert got == {
        "host.ib_port[('port', 'mlx5_4/1')]": ("warning", {"port": "mlx5_4/1"}),
        "host.ib_port[('port', 'mlx5_5/1')]": ("critical", {"port": "mlx5_5/1"}),
        "host.ib_port[('port', 'mlx5_bond_0/1')]": ("critical", {"port": "mlx5_bond_0/1"}),
    }


def test_without_a_known_gpu_model_the_rate_and_count_are_not_judged() -> None:
    h = Host(model=None)
    slow = tuple(replace(p, rate_gbps=100.0) for p in H100_PORTS[:3])
    assert problems(h.sample(node(ib_ports=slow))) == {}
    h = Host(model=None, cfg=NodeThresholds(ib_rate_expected_gbps=200.0, ib_ports_expected=4))
    got = problems(h.sample(node(ib_ports=slow)))
    assert got["host.ib_ports[]"][0] == "warning"
    assert {k for k in got if k.startswith("host.ib_port[")} == {
        f"host.ib_port[('port', '{p.device}/1')]" for p in slow
    }


def test_expected_ib_by_model() -> None:
    cfg = NodeThresholds()
    assert expected_ib(cfg, "NVIDIA H200") == (8, 400.0)
    assert expected_ib(cfg, "NVIDIA GB200") == (4, 400.0)
    assert expected_ib(cfg, "NVIDIA A100-SXM4-80GB") == (0, 0.0)
    assert expected_ib(cfg, None) == (0, 0.0)
    assert expected_ib(NodeThresholds(ib_ports_expected=2), "NVIDIA H100") == (2, 400.0)


def test_error_rate_and_a_counter_reset() -> None:
    h = Host()
    h.sample(node(ib_ports=H100_PORTS))
    noisy = (replace(H100_PORTS[0], symbol_error=5), *H100_PORTS[1:])  # 5 in 5 s: 60/min
    assert problems(h.sample(node(ib_ports=noisy))) == {
        "host.ib_errors[('port', 'mlx5_0/1')]": ("warning", {"port": "mlx5_0/1"})
    }
    assert problems(h.sample(node(ib_ports=noisy))) == {}  # no new errors
    reset = tuple(
        replace(p, port_rcv_errors=0, excessive_buffer_overrun_errors=0, symbol_error=0) for p in H100_PORTS
    )
    assert problems(h.sample(node(ib_ports=reset))) == {}  # a reset (driver reload) is no burst


def test_flap_is_sticky_for_its_window() -> None:
    h = Host(cfg=NodeThresholds(ib_flap_window=30.0))
    h.sample(node(ib_ports=H100_PORTS))
    flapped = (replace(H100_PORTS[0], link_downed=1), *H100_PORTS[1:])
    statuses = [problems(h.sample(node(ib_ports=flapped))) for _ in range(8)]
    flap = "host.ib_flap[('port', 'mlx5_0/1')]"
    assert [flap in p for p in statuses] == [True] * 6 + [False] * 2  # 30 s, then healthy
    saturated = (replace(H100_PORTS[1], link_downed=255), *H100_PORTS[2:])  # stays at 255: no flap
    assert problems(h.sample(node(ib_ports=(H100_PORTS[0], *saturated)))) == {}


def log(*counts: tuple[str, int | None, int, bool | None]) -> tuple[KernelLogCount, ...]:
    return tuple(KernelLogCount(n, c, k, f, f"{n} line") for n, c, k, f in counts)


def test_kmsg_threshold_and_window() -> None:
    h = Host(cfg=NodeThresholds(kmsg_window=20.0))
    h.sample(node())
    assert problems(h.sample(node(kernel_log=log(("aer_corrected", None, 99, None))))) == {}
    got = problems(h.sample(node(kernel_log=log(("aer_corrected", None, 100, None)))))
    assert got == {"host.kmsg[('class', 'aer_corrected')]": ("warning", {"class": "aer_corrected"})}
    for _ in range(2):
        assert got == problems(h.sample(node(kernel_log=log(("aer_corrected", None, 100, None)))))
    assert problems(h.sample(node(kernel_log=log(("aer_corrected", None, 100, None))))) == {}  # aged out


def test_kmsg_counts_seen_first_are_not_judged_and_a_restart_counts_again() -> None:
    h = Host()
    assert problems(h.sample(node(kernel_log=log(("mce", None, 3, None))))) == {}  # no previous sample
    assert problems(h.sample(node(kernel_log=log(("mce", None, 3, None))))) == {}
    got = problems(h.sample(node(kernel_log=log(("mce", None, 1, None)))))  # agent restarted: 1 new line
    assert got == {"host.kmsg[('class', 'mce')]": ("critical", {"class": "mce"})}


@pytest.mark.parametrize(
    ("code", "said", "status"),
    [
        (20034, None, "critical"),  # catalogue: fatal
        (20034, False, "warning"),  # the driver said Non-fatal: the line wins
        (22013, None, "warning"),  # catalogue: non-fatal
        (22013, True, "critical"),  # the driver said Fatal
        (12028, None, "warning"),  # not in the catalogue, the line says nothing: non-fatal
        (12028, True, "critical"),  # not in the catalogue, the line says Fatal
        (99999, None, "warning"),  # unknown code
    ],
)
def test_sxid_severity(code: int, said: bool | None, status: str) -> None:
    h = Host()
    h.sample(node())
    got = problems(h.sample(node(kernel_log=log(("sxid", code, 1, said)))))
    assert got == {f"host.sxid[('sxid', '{code}')]": (status, {"sxid": str(code)})}


def test_sxid_always_fatal_from_a_catalogue_that_has_it() -> None:
    """The packaged catalogue marks no code always fatal (none could be cited); a catalogue that
    does gives critical and its summary even when the line carries no Fatal/Non-fatal word."""
    table = parse_catalog(
        "code,name,severity,action,source,summary\n"
        "40001,test code,always_fatal,reboot,a test,Always fatal to the whole fabric; reboot the node\n"
    )
    h = Host()
    h.engine.host.node.sxids = table
    h.sample(node())
    obs = h.sample(node(kernel_log=log(("sxid", 40001, 1, None))))
    assert problems(obs) == {"host.sxid[('sxid', '40001')]": ("critical", {"sxid": "40001"})}
    assert any("reboot the node" in (o.advice or "") for o in obs if o.check == "host.sxid")


def test_modules_services_clock_mounts_dstate() -> None:
    h = Host()
    disks = (
        DiskUsage("/", 100, 10, 90, readonly=False, inodes_total=1000, inodes_used=950),
        DiskUsage("/boot/efi", 100, 10, 90, readonly=True),
        DiskUsage("/raid", 100, 10, 90, readonly=True, inodes_total=1000, inodes_used=980),
        DiskUsage("/scratch", 100, 10, 90),  # an older agent: neither judged
    )
    s = node(
        modules=(ModuleState("nvidia", True), ModuleState("nvidia_peermem", False)),
        services=(
            ServiceState("nvidia-persistenced", "loaded", "activating", "auto-restart"),
            ServiceState("nvidia-fabricmanager", "loaded", "active", "running"),
            ServiceState("dcgm", "not-found", "inactive", "dead"),
            ServiceState("slurmd", "masked", "inactive", "dead"),
        ),
        clock=ClockSync(synced=False, offset_s=0.01, max_error_s=16.0, source="adjtimex"),
        disks=disks,
        dstate_procs=2,
        dstate_names=("rsync", "ls"),
    )
    h2 = Host(cfg=NodeThresholds(readonly_ignore=("/boot/efi",)))
    assert {k: v[0] for k, v in problems(h.sample(s)).items()} == {
        "host.module[('module', 'nvidia_peermem')]": "critical",
        "host.service[('service', 'nvidia-persistenced')]": "warning",
        "host.clock[]": "warning",
        "host.fs_readonly[('mount', '/boot/efi')]": "critical",
        "host.fs_readonly[('mount', '/raid')]": "critical",
        "host.inodes[('mount', '/')]": "warning",
        "host.inodes[('mount', '/raid')]": "critical",
        "host.dstate[]": "warning",
    }
    assert "host.fs_readonly[('mount', '/boot/efi')]" not in problems(h2.sample(s))
    quiet = Host(cfg=NodeThresholds(clock_unsynced_warns=False, dstate_warning=0))
    got = problems(quiet.sample(s))
    assert "host.clock[]" not in got
    assert "host.dstate[]" not in got
    skew = replace(s, clock=ClockSync(synced=True, offset_s=-1.5))
    assert problems(h.sample(skew))["host.clock[]"][0] == "critical"


def test_state_round_trips_with_the_node_part() -> None:
    h = Host(cfg=NodeThresholds(ib_flap_window=600.0))
    h.sample(node(ib_ports=H100_PORTS, kernel_log=log(("oom_kill", None, 1, None))))
    flapped = (replace(H100_PORTS[0], link_downed=1), *H100_PORTS[1:])
    h.sample(
        node(
            ib_ports=flapped,
            kernel_log=log(("oom_kill", None, 2, None), ("sxid", 20034, 1, True)),
            modules=(ModuleState("nvidia", True),),
            services=(ServiceState("nvidia-persistenced", "loaded", "active", "running"),),
            clock=ClockSync(True, 0.001, 0.01, "adjtimex"),
            dstate_names=("x",),
            absent=("kmsg",),
        )
    )
    saved = json.loads(json.dumps(state_to_dict(h.state)))
    restored = state_from_dict(saved)
    assert restored.hosts == h.state.hosts
    hs = restored.hosts["n1"]
    assert hs.gpu_model == H100
    assert set(hs.ib_flaps) == {"mlx5_0/1"}
    assert set(hs.log_hits) == {"kmsg:oom_kill", "sxid:20034"}


def test_config_keys_and_errors() -> None:
    cfg = health_config_from(
        {"health": {"node": {"ib_rate_expected_gbps": 200, "kmsg_aer_corrected": 0}}}, env={}
    )
    assert cfg.node.ib_rate_expected_gbps == 200.0
    assert cfg.node.kmsg_aer_corrected == 0
    with pytest.raises(ConfigError, match="health.node.ib_down_status"):
        health_config_from({"health": {"node": {"ib_down_status": "loud"}}}, env={})
    with pytest.raises(ConfigError, match="health.node.clock_offset_warning_s"):
        health_config_from({"health": {"node": {"clock_offset_warning_s": 5}}}, env={})
    with pytest.raises(ConfigError, match="health.node.bogus"):
        health_config_from({"health": {"node": {"bogus": 1}}}, env={})
    env = {"GPUWARDEN_HEALTH_NODE_DSTATE_WARNING": "3"}
    assert health_config_from({}, env=env).node.dstate_warning == 3


def test_a_failing_class_clears_after_an_agent_restart_emptied_the_counts() -> None:
    """The agent restarts: its kernel-log counts start from nothing, the classes vanish from
    the samples; the failing checks are still judged and clear when their lines age out."""
    h = Host(cfg=NodeThresholds(kmsg_window=20.0, sxid_window=20.0))
    h.sample(node())
    got = problems(h.sample(node(kernel_log=log(("oom_kill", None, 1, None), ("sxid", 20034, 1, None)))))
    assert set(got) == {"host.kmsg[('class', 'oom_kill')]", "host.sxid[('sxid', '20034')]"}
    after = [problems(h.sample(node())) for _ in range(5)]  # restarted: no kernel_log any more
    assert [len(p) for p in after] == [2, 2, 2, 0, 0]
    assert after[0]["host.sxid[('sxid', '20034')]"][0] == "critical"
