"""The one NVML error policy (docs/reference.md): every NVML call goes through :meth:`NvmlQuery.attempt`.

- ``NVMLError_NotSupported`` (and ``InvalidArgument``, which a driver answers for a field id it
  does not know) -> ``None``; cached per (GPU, topic) so it is not asked again, and reported in
  ``GpuInfo.unsupported``;
- a function missing from the binding (``AttributeError``: absent attribute) or from the library
  (``NVMLError_FunctionNotFound``) -> logged once, ``None``;
- ``GpuIsLost``, or ``Unknown`` on a device that then fails a probe -> :class:`GpuLost`, which the
  backend turns into ``GpuSample(lost=True)`` and a ``gpu_lost`` event; the other GPUs go on;
- any other ``NVMLError`` -> ``None`` for that reading and one more :attr:`NvmlQuery.errors`,
  logged once per (call, error) at warning level, then at debug;
- the backend's ``open`` asks for ``reraise`` of every ``NVMLError`` and raises
  :class:`shared.errors.NvmlUnavailableError` (library missing, driver not loaded, version
  mismatch, uninitialised).

Nothing else is caught: a bug in the backend is a bug, not a missing reading.
(Modelled on nvitop's ``libnvml.nvmlQuery``.)
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.gpu.nvml_fields import FieldSpec
from shared.frames import GpuInfo

log = logging.getLogger("agent.gpu.nvml")

Status = Literal["ok", "missing", "unsupported", "error", "quiet"]


class GpuLost(Exception):
    """An NVML call said the GPU is lost (fell off the bus); caught per GPU by the backend."""


@dataclass(eq=False)
class NvmlGpu:
    """What the backend keeps per GPU between ticks."""

    index: int
    handle: Any
    uuid: str = ""
    lost: bool = False
    info: GpuInfo | None = None  # static facts, read once
    links: int = 0  # NVLinks
    unsupported: set[str] = field(default_factory=set)  # topics NVML said are not supported
    demoted: set[str] = field(default_factory=set)  # batch fields read by single calls instead
    request: list[Any] = field(default_factory=list)  # field ids (or (id, link)) for the batch
    specs: list[FieldSpec] = field(default_factory=list)  # spec of each request entry
    thresholds: dict[str, float] = field(default_factory=dict)
    fabric_cluster: str | None = None  # NVSwitch fabric cluster UUID, once registered
    mig: list[tuple[Any, int, int, int | None]] = field(default_factory=list)  # (handle, GI, CI, bytes)


def text(v: Any) -> str | None:
    """A string NVML returned (``str`` or, from older bindings, ``bytes``); ``None`` if empty."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", errors="replace")
    s = str(v).strip()
    return s or None


def handle_key(h: Any) -> Any:
    """A hashable key for a device handle (the address behind a ctypes pointer)."""
    try:
        return ctypes.cast(h, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return h


class NvmlQuery:
    """Calls into the ``pynvml`` module ``nvml`` under the error policy; thread-safe counters."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.errors = 0
        self._missing: set[Any] = set()
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def attempt(
        self,
        gpu: NvmlGpu | None,
        topic: str,
        fn_name: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        cache: bool = True,
        quiet: tuple[type[BaseException], ...] = (),
        reraise: tuple[type[BaseException], ...] = (),
    ) -> tuple[Status, Any]:
        """Call ``nvml.<fn_name>(*args, **kwargs)``; return (status, value or ``None``).

        ``topic`` names what is read (a sample field, or a name in ``TOPIC_ATTRS``) for the
        not-supported cache of ``gpu``; ``cache=False`` does not record it. Exceptions in
        ``quiet`` give status ``"quiet"`` (not counted); those in ``reraise`` propagate.
        Raises :class:`GpuLost`.
        """
        if gpu is not None and topic in gpu.unsupported:
            return "unsupported", None
        fn = getattr(self.nvml, fn_name, None)
        if fn is None or fn_name in self._missing or (fn_name, topic) in self._missing:
            if fn is None and fn_name not in self._missing:
                self._missing.add(fn_name)
                log.info("NVML binding has no %s; readings that need it are absent", fn_name)
            return "missing", None
        nvml = self.nvml
        try:
            return "ok", fn(*args, **(kwargs or {}))
        except reraise:
            raise
        except quiet:
            return "quiet", None
        except (nvml.NVMLError_NotSupported, nvml.NVMLError_InvalidArgument):
            if gpu is not None and cache:
                gpu.unsupported.add(topic)
            return "unsupported", None
        except nvml.NVMLError_FunctionNotFound:
            self._missing.add((fn_name, topic))
            log.info("NVML library has no %s (driver too old); %s is absent", fn_name, topic)
            return "missing", None
        except nvml.NVMLError_GpuIsLost as e:
            raise GpuLost(fn_name) from e
        except nvml.NVMLError_Unknown as e:
            if gpu is not None and self.probe_lost(gpu):
                raise GpuLost(fn_name) from e
            self.count_error(fn_name, str(e))
            return "error", None
        except nvml.NVMLError as e:
            self.count_error(fn_name, str(e))
            return "error", None

    def query(self, gpu: NvmlGpu | None, topic: str, fn_name: str, *args: Any) -> Any:
        """:meth:`attempt`'s value: the answer, or ``None`` when it is not available."""
        return self.attempt(gpu, topic, fn_name, args)[1]

    def query_first(self, gpu: NvmlGpu, topic: str, fn_names: tuple[str, ...], *args: Any) -> Any:
        """The answer of the first of ``fn_names`` the binding and library have (newest first)."""
        for fn_name in fn_names:
            status, value = self.attempt(gpu, topic, fn_name, args)
            if status != "missing":
                return value
        return None

    def probe_lost(self, gpu: NvmlGpu) -> bool:
        """After ``Unknown``: is the device gone? (a cheap call that a live GPU answers)."""
        try:
            status, _ = self.attempt(
                gpu,
                "probe",
                "nvmlDeviceGetPciInfo",
                (gpu.handle,),
                cache=False,
                quiet=(self.nvml.NVMLError_Unknown,),
            )
        except GpuLost:
            return True
        return status == "quiet"

    def count_error(self, what: str, error: str) -> None:
        """One more NVML error that cost a reading; logged once per (call, error) as a warning."""
        with self._lock:
            self.errors += 1
            first = (what, error) not in self._warned
            self._warned.add((what, error))
        if first:
            log.warning("NVML %s failed: %s (reading absent; further failures logged at debug)", what, error)
        else:
            log.debug("NVML %s failed: %s", what, error)
