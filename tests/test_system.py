"""Host metrics: the real host through psutil and the simulated host with its faults."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from agent.faults import FaultSchedule
from agent.system import (
    PsutilSystem,
    SimulatedSystem,
    SystemSource,
    cpu_model,
    keep_mount,
    os_pretty_name,
    parse_file_nr,
)
from shared.frames import InventoryFrame, SampleFrame, SystemSample, decode, encode, replace


def _round_trip(system: SystemSample) -> None:
    frame = SampleFrame(host="h", provider="p", boot_id="b", seq=1, ts=time.time(), system=system)
    assert decode(encode(frame)) == frame


# ----------------------------------------------------------------------------- real host


def test_psutil_sample_matches_the_host() -> None:
    src = PsutilSystem("me")
    assert isinstance(src, SystemSource)
    s = src.sample()
    _round_trip(s)
    assert s.cpu_count == os.cpu_count()
    meminfo = Path("/proc/meminfo").read_text().split()
    assert s.mem_total_bytes == int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    assert s.mem_available_bytes is not None
    assert 0 < s.mem_available_bytes <= s.mem_total_bytes
    assert s.load_1 is not None
    assert s.load_1 >= 0
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert s.uptime_s == pytest.approx(uptime, abs=5)
    nr = Path("/proc/sys/fs/file-nr").read_text().split()
    assert s.fds_max == int(nr[2])
    assert s.fds_open is not None
    assert s.fds_open > 0
    mounts = [d.mount for d in s.disks]
    assert "/" in mounts
    assert not [m for m in mounts if m.startswith(("/proc", "/sys", "/dev"))]
    for d in s.disks:
        assert d.total_bytes > 0
        assert d.used_bytes + d.free_bytes <= d.total_bytes
    names = {n.name for n in s.nics}
    assert "lo" not in names
    assert names <= set(psutil.net_io_counters(pernic=True))
    for n in s.nics:
        assert n.up is not None


def test_psutil_cpu_percent_is_non_blocking_and_measures() -> None:
    src = PsutilSystem("me")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.3:  # burn one core
        sum(range(1000))
    t1 = time.monotonic()
    s = src.sample()
    assert time.monotonic() - t1 < 0.2  # no 'interval' sleep inside
    assert s.cpu_pct is not None
    assert s.cpu_pct > 100 / (os.cpu_count() or 1) / 4


def test_psutil_nic_exclusion_is_configurable() -> None:
    assert "lo" in {n.name for n in PsutilSystem("me", nic_exclude=()).sample().nics}


def test_psutil_host_facts() -> None:
    facts = PsutilSystem("node-9").host_facts()
    assert facts.hostname == "node-9"
    assert facts.kernel_boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert facts.os == os_pretty_name(Path("/etc/os-release").read_text())
    assert facts.os
    assert facts.kernel == os.uname().release
    assert facts.cpu_model
    assert facts.cpu_count == os.cpu_count()
    assert facts.boot_time == pytest.approx(psutil.boot_time())
    assert facts.python_version
    frame = InventoryFrame(host="h", provider="p", boot_id="b", seq=1, ts=time.time(), host_facts=facts)
    assert decode(encode(frame)) == frame


def test_psutil_with_a_bare_proc_root(tmp_path: Path) -> None:
    src = PsutilSystem("x", proc_root=str(tmp_path), os_release=str(tmp_path / "missing"))
    s = src.sample()
    assert (s.fds_open, s.fds_max) == (None, None)
    facts = src.host_facts()
    assert facts.kernel_boot_id is None
    assert facts.os is None
    (tmp_path / "sys/fs").mkdir(parents=True)
    (tmp_path / "sys/fs/file-nr").write_text("1500\t100\t9000\n")
    (tmp_path / "sys/kernel/random").mkdir(parents=True)
    (tmp_path / "sys/kernel/random/boot_id").write_text("abc-123\n")
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n")
    (tmp_path / "os-release").write_text('NAME="X"\nPRETTY_NAME="Test OS 1.0"\n')
    src = PsutilSystem("x", proc_root=str(tmp_path), os_release=str(tmp_path / "os-release"))
    s = src.sample()
    assert (s.fds_open, s.fds_max) == (1400, 9000)
    facts = src.host_facts()
    assert (facts.kernel_boot_id, facts.os, facts.cpu_model) == ("abc-123", "Test OS 1.0", "Test CPU 9000")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('NAME="Ubuntu"\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\nID=ubuntu\n', "Ubuntu 22.04.4 LTS"),
        ("PRETTY_NAME='Rocky Linux 9.3 (Blue Onyx)'\n", "Rocky Linux 9.3 (Blue Onyx)"),
        ("PRETTY_NAME=Alpine\n", "Alpine"),
        ('PRETTY_NAME=""\n', None),
        ("NAME=x\n", None),
        ("", None),
        (None, None),
    ],
)
def test_os_pretty_name(text: str | None, expected: str | None) -> None:
    assert os_pretty_name(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nprocessor\t: 1\n",
            "Intel(R) Xeon(R) Platinum 8480+",
        ),
        ("processor\t: 0\nCPU part\t: 0xd4f\nModel\t: NVIDIA Grace\n", "NVIDIA Grace"),
        ("Hardware\t: BCM2835\n", "BCM2835"),
        ("processor : 0\n", None),
        (None, None),
    ],
)
def test_cpu_model(text: str | None, expected: str | None) -> None:
    assert cpu_model(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("820\t0\t2466177\n", (820, 2466177)),
        ("1500 100 9000", (1400, 9000)),
        ("1 2", (None, None)),
        ("a b c", (None, None)),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_parse_file_nr(text: str | None, expected: tuple[int | None, int | None]) -> None:
    assert parse_file_nr(text) == expected


@pytest.mark.parametrize(
    ("mount", "fstype", "keep"),
    [
        ("/", "overlay", True),
        ("/", "ext4", True),
        ("/raid", "xfs", True),
        ("/home", "nfs4", True),
        ("/boot/efi", "vfat", True),
        ("/snap/core/123", "squashfs", False),
        ("/run", "tmpfs", False),
        ("/run/user/1000", "ext4", False),
        ("/dev/shm", "tmpfs", False),
        ("/sys/fs/cgroup", "cgroup2", False),
        ("/var/lib/docker/overlay2/abc/merged", "overlay", False),
        ("/data", "overlay", False),
        ("/devices", "ext4", True),  # a prefix match needs a path boundary
    ],
)
def test_keep_mount(mount: str, fstype: str, keep: bool) -> None:
    assert keep_mount(mount, fstype) is keep


# ----------------------------------------------------------------------------- simulated host


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def _sim(
    host: str = "h1", seed: int = 0, faults: list[str] | None = None
) -> tuple[SimulatedSystem, FakeClock]:
    clock = FakeClock()
    return SimulatedSystem(host=host, seed=seed, faults=FaultSchedule.parse(faults or []), clock=clock), clock


def _at(src: SimulatedSystem, clock: FakeClock, t: float) -> SystemSample:
    clock.now = 50.0 + t
    return src.sample()


def test_simulated_is_deterministic_and_valid() -> None:
    a, ca = _sim(seed=4)
    b, cb = _sim(seed=4)
    c, cc = _sim(seed=4, host="h2")
    ra = [_at(a, ca, t) for t in range(0, 3600, 30)]
    assert ra == [_at(b, cb, t) for t in range(0, 3600, 30)]
    assert ra != [_at(c, cc, t) for t in range(0, 3600, 30)]
    assert isinstance(a, SystemSource)
    for s in ra:
        _round_trip(s)
        assert s.cpu_pct is not None
        assert 0 <= s.cpu_pct < 50
        assert {d.mount for d in s.disks} == {"/", "/raid"}
        assert [n.name for n in s.nics] == ["eth0"] + [f"ib{i}" for i in range(8)]
    for before, after in zip(ra, ra[1:], strict=False):
        assert after.uptime_s is not None
        assert before.uptime_s is not None
        assert after.uptime_s > before.uptime_s
        for n0, n1 in zip(before.nics, after.nics, strict=True):
            assert n1.rx_bytes > n0.rx_bytes
            assert n1.tx_bytes > n0.tx_bytes
    fa, fc = a.host_facts(), c.host_facts()
    assert fa.hostname == "h1"
    assert fa.kernel_boot_id != fc.kernel_boot_id
    fb = b.host_facts()
    assert fa.boot_time == pytest.approx(fb.boot_time, abs=2)  # wall clock at construction
    assert replace(fa, boot_time=None) == replace(fb, boot_time=None)
    assert fa.boot_time is not None
    assert fa.boot_time == pytest.approx(time.time() - (ra[0].uptime_s or 0), abs=5)


def test_simulated_cpu_fault() -> None:
    src, clock = _sim(faults=["h1:cpu=97@10s+10s", "other:cpu=5@0s"])
    before, during, after = (_at(src, clock, t) for t in (5, 15, 25))
    assert before.cpu_pct is not None
    assert before.cpu_pct < 50
    assert during.cpu_pct == 97.0
    assert during.load_1 == pytest.approx(0.97 * 224)
    assert after.cpu_pct is not None
    assert after.cpu_pct < 50


def test_simulated_disk_full_fault() -> None:
    src, clock = _sim(faults=["disk_full@10s+10s"])
    before, during, after = (_at(src, clock, t) for t in (5, 15, 25))
    root = [next(d for d in s.disks if d.mount == "/") for s in (before, during, after)]
    assert root[0].used_bytes < 0.7 * root[0].total_bytes
    assert root[1].used_bytes >= 0.99 * root[1].total_bytes
    assert root[1].free_bytes == root[1].total_bytes - root[1].used_bytes
    assert root[2].used_bytes == root[0].used_bytes


def test_simulated_open_restarts_fault_clock() -> None:
    src, clock = _sim(faults=["cpu=90@10s"])
    assert _at(src, clock, 15).cpu_pct == 90.0
    src.open()
    assert src.sample().cpu_pct != 90.0
    assert src.elapsed() == 0.0
