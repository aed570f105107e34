"""The node sources of the agent (issue 14): InfiniBand ports from a sysfs tree written to the
kernel's documented ABI (tests/sysfs_ib.py), kernel
modules, systemd services through a real ``systemctl``-shaped process, adjtimex, D-state scans
of a /proc tree, NVSwitch detection, and the simulated node's faults."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from agent.faults import FaultSchedule
from agent.ib import IbReader, parse_rate, parse_state
from agent.node import (
    STA_NANO,
    STA_UNSYNC,
    TIME_ERROR,
    DStateScanner,
    NodeSource,
    SystemdUnavailableError,
    clock_from_timex,
    module_states,
    nvswitch_present,
    parse_modules,
    parse_stat,
    parse_systemctl_show,
    query_services,
    read_clock,
)
from agent.system import SIM_IB_PORTS, SimulatedSystem, disk_usage
from shared.config import NodeConfig
from shared.frames import ModuleState, ServiceState
from tests.support.sysfs_ib import h100_port, write_port, write_tree
from tests.support.wait import until_blocking

IB_DEVICES = ["mlx5_0", "mlx5_1", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7", "mlx5_8", "mlx5_9", "mlx5_bond_0"]


# ----------------------------------------------------------------------------- InfiniBand


def test_h100_tree(tmp_path: Path) -> None:
    ports = IbReader(str(write_tree(tmp_path))).read()
    assert ports is not None
    assert [p.device for p in ports] == IB_DEVICES
    ib = [p for p in ports if p.link_layer == "InfiniBand"]
    assert len(ib) == 8
    assert {(p.state, p.phys_state, p.rate_gbps, p.port) for p in ib} == {("ACTIVE", "LinkUp", 400.0, 1)}
    bond = ports[-1]
    assert (bond.link_layer, bond.rate_gbps) == ("Ethernet", 200.0)
    first = ports[0]
    assert (first.port_rcv_errors, first.excessive_buffer_overrun_errors, first.link_downed) == (14, 15, 0)
    assert (first.port_rcv_switch_relay_errors, first.symbol_error, first.vl15_dropped) == (1, 0, 0)
    assert ports[1].link_downed == 255  # the 8-bit LinkDownedCounter, saturated


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("400 Gb/sec (4X NDR)\n", 400.0),
        ("200 Gb/sec (2X NDR)", 200.0),
        ("2.5 Gb/sec (1X SDR)", 2.5),
        ("800 Gb/sec (4X XDR)", 800.0),
        ("", None),
        ("garbage", None),
        (None, None),
    ],
)
def test_parse_rate(text: str | None, want: float | None) -> None:
    assert parse_rate(text) == want


def test_parse_state() -> None:
    assert parse_state("4: ACTIVE\n") == "ACTIVE"
    assert parse_state("5: LinkUp") == "LinkUp"
    assert parse_state("3: Disabled") == "Disabled"
    assert parse_state("") is None
    assert parse_state(None) is None


@pytest.fixture
def ib_tree(tmp_path: Path) -> Path:
    """An H100-shaped tree that a test may change (a port down, a device gone)."""
    return write_tree(tmp_path / "sys")


def test_port_down_and_counters_move(ib_tree: Path) -> None:
    reader = IbReader(str(ib_tree))
    port = ib_tree / "class/infiniband/mlx5_4/ports/1"
    (port / "state").write_text("1: DOWN\n")  # the kernel's spelling (drivers/infiniband/core/sysfs.c)
    (port / "phys_state").write_text("3: Disabled\n")
    (port / "counters/link_downed").write_text("3\n")
    got = {p.device: p for p in reader.read() or ()}
    assert (got["mlx5_4"].state, got["mlx5_4"].phys_state, got["mlx5_4"].link_downed) == (
        "DOWN",
        "Disabled",
        3,
    )
    assert got["mlx5_5"].state == "ACTIVE"


def test_unreadable_counter_is_none_not_zero(ib_tree: Path) -> None:
    (ib_tree / "class/infiniband/mlx5_0/ports/1/counters/symbol_error").unlink()
    (ib_tree / "class/infiniband/mlx5_0/ports/1/counters/port_rcv_errors").write_text("not a number\n")
    first = (IbReader(str(ib_tree)).read() or ())[0]
    assert first.symbol_error is None
    assert first.port_rcv_errors is None
    assert first.link_downed == 0


def test_a_device_that_goes_away_is_dropped_then_rescanned(ib_tree: Path) -> None:
    reader = IbReader(str(ib_tree), rescan_every=1000)
    assert len(reader.read() or ()) == 9
    shutil.rmtree(ib_tree / "class/infiniband/mlx5_9")
    assert [p.device for p in reader.read() or ()] == IB_DEVICES[:7] + ["mlx5_bond_0"]
    assert len(reader.read() or ()) == 8  # rescanned at once after a port vanished
    write_port(ib_tree, h100_port("mlx5_9"))
    assert len(reader.read() or ()) == 8  # a new device waits for the next rescan ...
    reader._reads = 0  # ... which happens every rescan_every reads
    assert len(reader.read() or ()) == 9


def test_no_infiniband_is_absent_not_an_error(tmp_path: Path) -> None:
    assert IbReader(str(tmp_path)).read() is None
    (tmp_path / "class/infiniband").mkdir(parents=True)
    assert IbReader(str(tmp_path)).read() is None  # the class exists, no device: still absent


# ----------------------------------------------------------------------------- modules

# /proc/modules of a GPU node, as shown in the Talos Linux NVIDIA guide (siderolabs/talos docs)
PROC_MODULES = """\
nvidia_uvm 1884160 - - Live 0xffffffffc3f79000 (PO)
nvidia_drm 94208 - - Live 0xffffffffc42f6000 (PO)
nvidia_modeset 1531904 - - Live 0xffffffffc4159000 (PO)
nvidia 62754816 - - Live 0xffffffffc039e000 (PO)
"""


def test_modules() -> None:
    loaded = parse_modules(PROC_MODULES)
    assert loaded == {"nvidia_uvm", "nvidia_drm", "nvidia_modeset", "nvidia"}
    assert module_states(loaded, ["nvidia", "nvidia-uvm", "nvidia_peermem"]) == (
        ModuleState("nvidia", True),
        ModuleState("nvidia-uvm", True),  # the kernel treats - and _ alike
        ModuleState("nvidia_peermem", False),
    )


# ----------------------------------------------------------------------------- services

SHOW = """\
Id=nvidia-persistenced.service
LoadState=loaded
ActiveState=active
SubState=running

Id=nvidia-fabricmanager.service
LoadState=loaded
ActiveState=failed
SubState=failed

Id=nothere.service
LoadState=not-found
ActiveState=inactive
SubState=dead
"""


def test_parse_systemctl_show() -> None:
    got = parse_systemctl_show(SHOW)
    assert got["nvidia-persistenced"] == ServiceState("nvidia-persistenced", "loaded", "active", "running")
    assert got["nvidia-fabricmanager"].active_state == "failed"
    assert got["nothere"].load_state == "not-found"


def _fake_systemctl(tmp_path: Path, output: str) -> str:
    """An executable that prints what ``systemctl show`` prints (the agent runs it as a process)."""
    (tmp_path / "show.txt").write_text(output)
    script = tmp_path / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat {tmp_path}/show.txt\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_query_services_runs_one_process_for_all(tmp_path: Path) -> None:
    systemctl = _fake_systemctl(tmp_path, SHOW)
    got = query_services(["nvidia-persistenced", "nvidia-fabricmanager", "missing"], systemctl)
    assert [(s.name, s.load_state, s.active_state) for s in got] == [
        ("nvidia-persistenced", "loaded", "active"),
        ("nvidia-fabricmanager", "loaded", "failed"),
        ("missing", "not-found", None),  # systemd said nothing about it
    ]
    args = (tmp_path / "args").read_text().split()
    assert args[:2] == ["show", "--no-pager"]
    assert args[-3:] == ["nvidia-persistenced.service", "nvidia-fabricmanager.service", "missing.service"]


# ----------------------------------------------------------------------------- clock


def test_clock_from_timex() -> None:
    synced = clock_from_timex(0, 0x2001 & ~STA_NANO, 1500, 20_000)  # PLL, microseconds
    assert (synced.synced, synced.offset_s, synced.max_error_s) == (True, 0.0015, 0.02)
    nano = clock_from_timex(0, STA_NANO, -2_000_000_000, 0)
    assert nano.offset_s == -2.0
    assert clock_from_timex(TIME_ERROR, 0, 0, 16_000_000).synced is False
    assert clock_from_timex(0, STA_UNSYNC, 0, 0).synced is False


def test_read_clock_on_this_host() -> None:
    c = read_clock()
    assert c is not None  # adjtimex(modes=0) needs no privilege
    assert c.source == "adjtimex"
    assert c.max_error_s is not None
    assert c.max_error_s >= 0


# ----------------------------------------------------------------------------- D state

# /proc/<pid>/stat lines in the kernel's format (fs/proc/array.c): pid (comm) state ppid ...
# field 22 is the start time; comm may hold spaces and parentheses.
STAT_D = (
    "4242 (rsync (x)) D 1 4242 4242 0 -1 4194560 10 0 0 0 3 4 0 0 20 0 1 0 98765 1000 10 18446744073709551615"
)
STAT_S = "17 (ksoftirqd/1) S 2 0 0 0 -1 69238848 0 0 0 0 0 9 0 0 20 0 1 0 12 0 0 18446744073709551615"


def test_parse_stat() -> None:
    assert parse_stat(STAT_D) == ("rsync (x)", "D", 98765)
    assert parse_stat(STAT_S) == ("ksoftirqd/1", "S", 12)
    assert parse_stat("garbage") is None
    assert parse_stat(Path("/proc/self/stat").read_text()) is not None  # this very process


def _proc(root: Path, pid: int, line: str) -> None:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "stat").write_text(line)


def test_dstate_counts_processes_seen_twice(tmp_path: Path) -> None:
    _proc(tmp_path, 4242, STAT_D)
    _proc(tmp_path, 17, STAT_S)
    scanner = DStateScanner(str(tmp_path))
    assert scanner.scan() == (0, ())  # first sight: not stuck yet
    assert scanner.scan() == (1, ("rsync (x)",))
    _proc(tmp_path, 4242, STAT_D.replace(" 98765 ", " 99999 "))  # the pid was reused: a new process
    assert scanner.scan() == (0, ())
    _proc(tmp_path, 4242, STAT_D.replace(") D ", ") S "))
    assert scanner.scan() == (0, ())


def test_dstate_scan_of_the_real_proc() -> None:
    n, names = DStateScanner().scan()
    assert (n, names) == (0, ())  # first scan never counts
    n, _ = DStateScanner().scan()
    assert n >= 0


# ----------------------------------------------------------------------------- NVSwitch and the source


def test_nvswitch_present(tmp_path: Path) -> None:
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    assert not nvswitch_present(str(proc), str(sys_root))
    dev = sys_root / "bus/pci/devices/0000:05:00.0"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x10de\n")
    (dev / "class").write_text("0x068000\n")  # an NVSwitch before its driver is loaded
    assert nvswitch_present(str(proc), str(sys_root))
    (dev / "vendor").write_text("0x8086\n")
    assert not nvswitch_present(str(proc), str(sys_root))
    (proc / "driver/nvidia-nvswitch/devices").mkdir(parents=True)
    (proc / "driver/nvidia-nvswitch/devices/0000:05:00.0").write_text("")
    assert nvswitch_present(str(proc), str(sys_root))


def test_node_source_reads_everything(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "modules").write_text(PROC_MODULES)
    _proc(proc, 4242, STAT_D)
    now = [0.0]
    cfg = NodeConfig(sys_root=str(write_tree(tmp_path / "sys")), services_every=30.0, dstate_every=30.0)
    src = NodeSource(cfg, proc_root=str(proc), clock=lambda: now[0])
    src._systemctl = _fake_systemctl(tmp_path, SHOW)
    r = src.read()
    assert len(r.ib_ports) == 9
    # IB present: nvidia_peermem is expected too, and it is not loaded on this host
    assert [(m.name, m.loaded) for m in r.modules] == [
        ("nvidia", True),
        ("nvidia_uvm", True),
        ("nvidia_peermem", False),
    ]
    assert [s.name for s in r.services] == ["nvidia-persistenced"]  # no NVSwitch: no fabric manager
    assert r.absent == ("nvswitch", "kmsg")
    assert r.dstate_procs == 0
    assert r.clock is not None
    now[0] = 31.0
    r = src.read()
    assert (r.dstate_procs, r.dstate_names) == (1, ("rsync (x)",))
    src.kmsg_counts = tuple
    assert "kmsg" not in src.read().absent


def test_node_source_without_anything(tmp_path: Path) -> None:
    cfg = NodeConfig(sys_root=str(tmp_path), modules=(), services=(), clock=False, dstate_every=0)
    src = NodeSource(cfg, proc_root=str(tmp_path))
    src._systemctl = None
    r = src.read()
    assert (r.ib_ports, r.modules, r.services, r.clock, r.dstate_procs) == ((), (), (), None, None)
    assert r.absent == ("ib", "nvswitch", "systemd", "kmsg")


def test_disk_usage_reads_inodes_and_readonly() -> None:
    d = disk_usage("/", os.statvfs("/"), False)
    assert d.total_bytes > 0
    assert d.readonly is False
    assert d.inodes_total is None or (d.inodes_used is not None and d.inodes_used <= d.inodes_total)


# ----------------------------------------------------------------------------- simulated node


def _sim(specs: list[str]) -> tuple[SimulatedSystem, list[float]]:
    now = [0.0]
    return SimulatedSystem(host="h", faults=FaultSchedule.parse(specs), clock=lambda: now[0]), now


def test_simulated_node_is_a_healthy_dgx() -> None:
    s = SimulatedSystem(host="h").sample()
    assert len(s.ib_ports) == SIM_IB_PORTS
    assert {(p.state, p.rate_gbps, p.link_layer) for p in s.ib_ports} == {("ACTIVE", 400.0, "InfiniBand")}
    assert all(m.loaded for m in s.modules)
    assert {(x.name, x.active_state) for x in s.services} == {
        ("nvidia-persistenced", "active"),
        ("nvidia-fabricmanager", "active"),
    }
    assert s.clock is not None
    assert s.clock.synced
    assert abs(s.clock.offset_s or 0) < 0.01
    assert (s.kernel_log, s.dstate_procs, s.absent) == ((), 0, ())
    assert [d.readonly for d in s.disks] == [False, False]


def test_simulated_node_faults_start_and_clear() -> None:
    specs = [
        "ib_down=3@10s+10s",
        "ib_rate=200@10s+10s",
        "ib_errors=60@10s+10s",
        "ib_flap@10s+10s",
        "sxid=22013@10s+10s",
        "kmsg=hung_task@10s+10s",
        "module_missing=nvidia_peermem@10s+10s",
        "service_down=nvidia-fabricmanager@10s+10s",
        "clock_skew=-3@10s+10s",
        "fs_readonly@10s+10s",
        "dstate=4@10s+10s",
    ]
    sim, now = _sim(specs)
    before = sim.sample()
    now[0] = 15.0
    s = sim.sample()
    assert (s.ib_ports[3].state, s.ib_ports[3].phys_state) == ("DOWN", "Disabled")
    assert s.ib_ports[0].rate_gbps == 200.0
    assert s.ib_ports[0].symbol_error == 5  # 60/min for 5 s
    assert s.ib_ports[0].link_downed == 1
    assert {(k.name, k.code, k.fatal) for k in s.kernel_log} == {
        ("sxid", 22013, False),
        ("hung_task", None, None),
    }
    assert ModuleState("nvidia_peermem", False) in s.modules
    assert ServiceState("nvidia-fabricmanager", "loaded", "failed", "failed") in s.services
    assert s.clock is not None
    assert s.clock.offset_s == -3.0
    assert (s.disks[0].readonly, s.disks[1].readonly) == (False, True)
    assert (s.dstate_procs, len(s.dstate_names)) == (4, 4)
    now[0] = 25.0
    after = sim.sample()
    assert after.ib_ports[3] == before.ib_ports[3]
    assert after.ib_ports[0].rate_gbps == 400.0
    assert after.ib_ports[0].symbol_error == 10  # counters keep their value
    assert after.ib_ports[0].link_downed == 1
    assert {k.name for k in after.kernel_log} == {"sxid", "hung_task"}  # counts of this agent run stay
    assert (after.modules, after.services, after.clock) == (before.modules, before.services, before.clock)
    assert (after.dstate_procs, after.disks[1].readonly) == (0, False)


# ----------------------------------------------------------------------------- watched mounts


def test_mount_of() -> None:
    from agent.system import _mount_of

    mounts = {"/": 0, "/data": 0, "/data/scratch": 0, "/database": 0}
    assert _mount_of("/data/x/y", mounts) == "/data"
    assert _mount_of("/data/scratch", mounts) == "/data/scratch"
    assert _mount_of("/database/x", mounts) == "/database"
    assert _mount_of("/home", mounts) == "/"
    assert _mount_of("/x", {}) is None


def test_watched_paths_are_reported_with_the_mount_tables_flag() -> None:
    """``[node] mounts``: the mount holding each path is reported even where the default disk
    list leaves it out (here the real /proc and /sys of this machine)."""
    import psutil

    from agent.system import PsutilSystem

    table = {p.mountpoint: p for p in psutil.disk_partitions(all=True)}
    cfg = NodeConfig(sys_root="/nonexistent", mounts=("/proc/self", "/sys/class"), dstate_every=0)
    disks = {d.mount: d for d in PsutilSystem("me", node=NodeSource(cfg)).sample().disks}
    for mount in ("/proc", "/sys"):
        assert disks[mount].readonly == ("ro" in table[mount].opts.split(","))


def test_a_hung_statvfs_never_blocks_the_tick() -> None:
    import threading

    from agent.system import PsutilSystem

    release = threading.Event()

    def hung(path: str) -> os.statvfs_result:
        release.wait(30)  # a dead NFS server
        return os.statvfs(path)

    cfg = NodeConfig(sys_root="/nonexistent", mounts=("/",), dstate_every=0)
    src = PsutilSystem("me", node=NodeSource(cfg), nic_exclude=("",))
    src.statvfs = hung
    got = src._watched(["/"])
    assert [(d.mount, d.total_bytes, d.inodes_total) for d in got] == [("/", 0, None)]
    # the next sample does not queue another call behind the hung one
    hung_call = src._stat_pending["/"]
    assert src._watched(["/"])[0].total_bytes == 0
    assert src._stat_pending["/"] is hung_call
    release.set()
    src.statvfs = os.statvfs
    until_blocking(lambda: src._watched(["/"])[0].total_bytes > 0, 10, "the released statvfs answered")


def test_systemd_not_reachable_is_absent(tmp_path: Path) -> None:
    """A container: systemctl exists but systemd is not PID 1 (the real message, exit code 1)."""
    script = tmp_path / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        "echo 'System has not been booted with systemd as init system (PID 1). Can'\"'\"'t operate.' >&2\n"
        "echo 'Failed to connect to bus: Host is down' >&2\nexit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(SystemdUnavailableError, match="Host is down"):
        query_services(["nvidia-persistenced"], str(script))
    src = NodeSource(NodeConfig(sys_root=str(tmp_path), dstate_every=0, clock=False), proc_root=str(tmp_path))
    src._systemctl = str(script)
    r = src.read()
    assert r.services == ()
    assert "systemd" in r.absent
