"""The ``GpuBackend`` Protocol that every GPU source implements.

Code above the backend (sampler, publisher, service) cannot tell NVML from simulated GPUs.
Every method is blocking; the service calls them from a worker thread, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from shared.frames import GpuInfo, GpuSample


@dataclass(frozen=True, slots=True)
class Inventory:
    """What :meth:`GpuBackend.inventory` returns: the GPUs and the driver stack."""

    backend: str  # "nvml" or "simulated"
    driver_version: str | None
    cuda_version: str | None
    nvml_version: str | None
    gpus: tuple[GpuInfo, ...]
    nvml_error: str | None = None  # NVML cannot initialise (the agent runs without GPUs): why


@dataclass(frozen=True, slots=True)
class GpuEvent:
    """An immediate event seen by a backend or the kernel-log reader.

    ``type`` is one of :data:`shared.frames.EVENT_TYPES`; ``ts`` is Unix time in seconds.
    The agent numbers events, counts them per (GPU, type/xid) and deduplicates the same XID
    seen through NVML and the kernel log.
    """

    type: str
    ts: float
    source: str  # "nvml", "kmsg" or "simulated"
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    pci_bus_id: str | None = None  # set by the kernel-log reader; the agent maps it to a GPU
    xid: int | None = None
    value: int | None = None
    message: str | None = None


@runtime_checkable
class GpuBackend(Protocol):
    """One source of GPU readings.

    Errors: :meth:`open` raises :class:`shared.errors.NvmlUnavailableError` when the backend
    cannot work on this machine (library missing, driver not loaded, version mismatch).
    After a successful ``open``, no method raises for a GPU problem: a GPU that fell off the
    bus is reported with ``GpuSample.lost = True`` (and a ``gpu_lost`` event), a reading the
    GPU does not support is ``None``.
    """

    name: str
    kernel_log: bool  # the host's kernel log (/dev/kmsg) speaks of these GPUs (XIDs, NVRM lines)

    def open(self) -> None:
        """Initialise the library and cache device handles."""

    def close(self) -> None:
        """Release the library (idempotent). Wakes a thread blocked in :meth:`wait_events`."""

    def inventory(self) -> Inventory:
        """Static facts about every GPU; called at start and on every tick to detect changes."""

    def sample(self) -> list[GpuSample]:
        """Read every GPU now, one :class:`GpuSample` per GPU in index order."""

    def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Block up to ``timeout_s`` for events (XID, ECC, recovery action, GPU lost).

        Returns an empty list on timeout. Runs in a dedicated thread.
        """

    def host_down(self) -> bool:
        """The host publishes nothing now: a simulated ``host_down`` fault; real GPUs: never."""
