"""Per-process attribution: cgroup parsing (pure) and /proc reading from a temporary proc root."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.processes import (
    NOT_AVAILABLE,
    build_processes,
    container_from_cgroup,
    container_from_path,
    merge_nvml,
    used_memory,
)
from shared.frames import GpuProcess

CID = "4f3c2b1a" * 8  # 64 hex
POD = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/system.slice/docker-{CID}.scope", f"docker://{CID}"),
        (f"/docker/{CID}", f"docker://{CID}"),
        (f"/system.slice/crio-{CID}.scope", f"cri-o://{CID}"),
        (f"/machine.slice/libpod-{CID}.scope", f"podman://{CID}"),
        (
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            + POD.replace("-", "_")
            + f".slice/cri-containerd-{CID}.scope",
            f"pod_{POD}/containerd://{CID}",
        ),
        (f"/kubepods/besteffort/pod{POD}/{CID}", f"pod_{POD}/container://{CID}"),
        (f"/kubepods/burstable/pod{POD}", f"pod_{POD}"),
        (
            "/system.slice/containerd.service/"
            f"kubepods-besteffort-pod{POD.replace('-', '_')}.slice:cri-containerd:{CID}",
            f"pod_{POD}/containerd://{CID}",
        ),
        ("/system.slice/slurmstepd.scope/job_123/step_0/user/task_0", "job_123"),
        ("/slurm/uid_1000/job_987654/step_batch/task_0", "job_987654"),
        ("/system.slice/nginx.service", "nginx.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo@1.service", "app-foo@1.service"),
        ("/", None),
        ("/user.slice/user-1000.slice", None),
        (f"/docker/{CID[:60]}", None),  # not a full container id
    ],
)
def test_container_from_path(path: str, expected: str | None) -> None:
    assert container_from_path(path) == expected


def test_cgroup_v1_file_uses_any_hierarchy() -> None:
    text = (
        "12:perf_event:/\n"
        f"11:memory:/docker/{CID}\n"
        f"4:cpu,cpuacct:/docker/{CID}\n"
        "1:name=systemd:/system.slice/docker.service\n"
    )
    assert container_from_cgroup(text) == f"docker://{CID}"


def test_cgroup_unified_line_wins_and_garbage_is_ignored() -> None:
    text = (
        "garbage line\n"
        "1:name=systemd:/system.slice/sshd.service\n"
        "0::/system.slice/slurmstepd.scope/job_42/step_0\n"
    )
    assert container_from_cgroup(text) == "job_42"
    assert container_from_cgroup("") is None
    assert container_from_cgroup("0::/\n") is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(0, 0), (123456, 123456), (None, None), (NOT_AVAILABLE, None), (-1, None), ("12", None)],
)
def test_used_memory(raw: object, expected: int | None) -> None:
    assert used_memory(raw) == expected


def test_merge_nvml_dedups_pids_and_sorts() -> None:
    compute = [SimpleNamespace(pid=30, usedGpuMemory=100), SimpleNamespace(pid=10, usedGpuMemory=None)]
    graphics = [SimpleNamespace(pid=30, usedGpuMemory=50), SimpleNamespace(pid=10, usedGpuMemory=7)]
    assert merge_nvml(compute, graphics, None) == [(10, 7), (30, 100)]
    assert merge_nvml(None, None) == []


def test_build_processes_reads_proc_root(tmp_path: Path) -> None:
    (tmp_path / "100").mkdir()
    (tmp_path / "100" / "comm").write_text("python3\n")
    (tmp_path / "100" / "cgroup").write_text(f"0::/system.slice/docker-{CID}.scope\n")
    (tmp_path / "200").mkdir()
    (tmp_path / "200" / "comm").write_text("\n")  # a kernel oddity: empty name
    (tmp_path / "300").mkdir()
    (tmp_path / "300" / "cgroup").mkdir()  # unreadable as a file
    got = build_processes([(100, 1 << 30), (200, None), (300, 5), (400, 6)], str(tmp_path))
    assert got == (
        GpuProcess(pid=100, name="python3", used_mem_bytes=1 << 30, container=f"docker://{CID}"),
        GpuProcess(pid=200, name=None, used_mem_bytes=None, container=None),
        GpuProcess(pid=300, name=None, used_mem_bytes=5, container=None),
        GpuProcess(pid=400, name=None, used_mem_bytes=6, container=None),  # exited meanwhile
    )


def test_build_processes_on_this_process() -> None:
    import os

    (proc,) = build_processes([(os.getpid(), None)])
    assert proc.name is not None
    assert proc.name.startswith(("python", "pytest"))
