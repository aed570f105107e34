"""Per-process attribution: which processes use a GPU, and which container or job they belong to.

NVML gives the pid and GPU memory of each process (compute and graphics lists); the name comes
from ``/proc/<pid>/comm`` and the owner from ``/proc/<pid>/cgroup``. The cgroup parsing is pure
(:func:`container_from_cgroup`) so it is tested on sample lines; the readers take ``proc_root``
so tests point them at a temporary directory.

The ``container`` string, most specific first:

- ``<runtime>://<64 hex>`` for a container (``docker``, ``containerd``, ``cri-o``, ``podman``,
  or ``container`` when the runtime is not named in the path), prefixed with
  ``pod_<uid>/`` when the path also names a Kubernetes pod;
- ``pod_<uid>`` for a Kubernetes pod whose container id is not in the path;
- ``job_<id>`` for a Slurm job (``slurmstepd`` / ``/slurm/uid_N/job_N`` paths);
- the systemd unit (``nginx.service``, ``session-3.scope``);
- ``None`` when the path tells nothing (the root cgroup, ``user.slice`` alone).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any, Final

from shared.frames import GpuProcess

NOT_AVAILABLE: Final = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE_ulonglong, as old bindings return it

_RUNTIMES: Final = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "containerd": "containerd",
    "crio": "cri-o",
    "libpod": "podman",
}
_CONTAINER_RE: Final = re.compile(
    r"(docker|cri-containerd|containerd|crio|libpod)[-:]([0-9a-f]{64})(?:\.scope)?\b"
)
_BARE_ID_RE: Final = re.compile(r"/(docker/)?([0-9a-f]{64})(?:/|$)")
_POD_RE: Final = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_SLURM_RE: Final = re.compile(r"/job_(\d+)(?:/|$)")
_UNIT_RE: Final = re.compile(r"^[\w@.:\\-]+\.(?:service|scope)$")


def container_from_path(path: str) -> str | None:
    """The container, pod, Slurm job or systemd unit named by one cgroup path, or ``None``."""
    pod_match = _POD_RE.search(path) if "kubepods" in path else None
    pod = f"pod_{pod_match.group(1).replace('_', '-')}" if pod_match else None
    container: str | None = None
    m = _CONTAINER_RE.search(path)
    if m:
        container = f"{_RUNTIMES[m.group(1)]}://{m.group(2)}"
    else:
        bare = _BARE_ID_RE.search(path)
        if bare:
            container = f"{'docker' if bare.group(1) else 'container'}://{bare.group(2)}"
    if container:
        return f"{pod}/{container}" if pod else container
    if pod:
        return pod
    job = _SLURM_RE.search(path)
    if job:
        return f"job_{job.group(1)}"
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if _UNIT_RE.match(last):
        return last
    return None


def container_from_cgroup(text: str) -> str | None:
    """Parse the whole content of ``/proc/<pid>/cgroup`` (v1 or v2 lines ``id:controllers:path``).

    The unified (v2, ``0::``) line is read first; then the v1 hierarchies in file order.
    """
    paths: list[str] = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, _controllers, path = parts
        if hid == "0" and not _controllers:
            paths.insert(0, path)
        else:
            paths.append(path)
    for path in paths:
        found = container_from_path(path)
        if found:
            return found
    return None


def _read(path: str, limit: int = 65536) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:  # the process exited, or we may not look at it
        return None


def process_name(pid: int, proc_root: str = "/proc") -> str | None:
    """The command name of ``pid`` (``/proc/<pid>/comm``), or ``None`` when it is gone."""
    text = _read(os.path.join(proc_root, str(pid), "comm"), 256)
    if text is None:
        return None
    name = text.strip()
    return name or None


def process_container(pid: int, proc_root: str = "/proc") -> str | None:
    """The container or job of ``pid`` from ``/proc/<pid>/cgroup``, or ``None``."""
    text = _read(os.path.join(proc_root, str(pid), "cgroup"))
    return container_from_cgroup(text) if text is not None else None


def used_memory(raw: Any) -> int | None:
    """NVML's ``usedGpuMemory`` in bytes, or ``None`` when NVML says it is not available."""
    if raw is None or not isinstance(raw, int) or raw < 0 or raw >= NOT_AVAILABLE:
        return None
    return raw


def merge_nvml(*lists: Iterable[Any] | None) -> list[tuple[int, int | None]]:
    """(pid, used bytes) from NVML process lists (objects with ``pid`` and ``usedGpuMemory``).

    A process found in several lists (compute and graphics) appears once, with the largest
    memory figure. Sorted by pid.
    """
    merged: dict[int, int | None] = {}
    for entries in lists:
        for entry in entries or ():
            pid = int(entry.pid)
            mem = used_memory(getattr(entry, "usedGpuMemory", None))
            old = merged.get(pid)
            merged[pid] = mem if old is None else (old if mem is None else max(old, mem))
    return sorted(merged.items())


_NO_INSTANCE: Final = 0xFFFFFFFF  # NVML's gpuInstanceId / computeInstanceId outside MIG


def mig_ids(*lists: Iterable[Any] | None) -> dict[int, tuple[int, int]]:
    """pid -> (GPU instance id, compute instance id) from NVML process lists, for processes in
    MIG devices (empty when MIG is off)."""
    out: dict[int, tuple[int, int]] = {}
    for entries in lists:
        for entry in entries or ():
            gi = getattr(entry, "gpuInstanceId", None)
            ci = getattr(entry, "computeInstanceId", None)
            if gi is None or ci is None or int(gi) == _NO_INSTANCE or int(ci) == _NO_INSTANCE:
                continue
            out[int(entry.pid)] = (int(gi), int(ci))
    return out


def build_processes(
    entries: Iterable[tuple[int, int | None]], proc_root: str = "/proc"
) -> tuple[GpuProcess, ...]:
    """One :class:`GpuProcess` per (pid, used bytes), with name and container from ``proc_root``."""
    return tuple(
        GpuProcess(
            pid=pid,
            name=process_name(pid, proc_root),
            used_mem_bytes=mem,
            container=process_container(pid, proc_root),
        )
        for pid, mem in entries
    )
