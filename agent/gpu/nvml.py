"""The NVML backend: real GPUs through nvidia-ml-py (module ``pynvml``).

Every NVML call goes through :class:`agent.gpu.nvml_query.NvmlQuery`, which holds the one error
policy (not supported, missing function, GPU lost, other errors); the field table and the
single-call fallbacks are in :mod:`agent.gpu.nvml_fields`. This module opens NVML, reads the
GPUs each tick, builds the inventory, and turns the NVML event set into :class:`GpuEvent`.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import re
import threading
import time
import uuid
from functools import partial
from types import ModuleType
from typing import Any, Final

from agent.gpu import nvml_fields as nf
from agent.gpu.base import GpuEvent, Inventory
from agent.gpu.nvml_query import GpuLost, NvmlGpu, NvmlQuery, handle_key, text
from agent.processes import build_processes, merge_nvml, mig_ids
from shared.errors import NvmlUnavailableError
from shared.frames import GpuInfo, GpuSample, MigInstance, MigSample, replace

log = logging.getLogger(__name__)

_SLICE_S: Final = 0.2  # longest single nvmlEventSetWait, so close() is honoured quickly
_MAX_EVENTS: Final = 256  # events taken from the event set in one wait_events call
_UNSUPPORTED_CODES: Final = (3, 2)  # NOT_SUPPORTED, INVALID_ARGUMENT (unknown field id)
_GPU_IS_LOST: Final = 15
_MIG_PROFILE: Final = re.compile(r"MIG\s+(\S+)")  # "NVIDIA A100-SXM4-40GB MIG 1g.5gb" -> 1g.5gb

# NVML event type bits (nvmlEventType*) -> GpuEvent type
_EVENT_TYPES: Final = {
    0x8: "xid",  # XidCriticalError
    0x1: "ecc_sbe",
    0x2: "ecc_dbe",
    0x400: "page_retirement",  # DramRetirementEvent
    0x800: "page_retirement",  # DramRetirementFailure
    0x8000: "recovery_action",  # GpuRecoveryAction
}


class NvmlBackend:
    """:class:`~agent.gpu.base.GpuBackend` over NVML.

    ``nvml`` is the ``pynvml`` module (injectable for tests); ``proc_root`` is where process
    names and cgroups are read; ``processes`` and ``events`` switch those parts off.
    :meth:`open` raises :class:`~shared.errors.NvmlUnavailableError`; no other method raises
    for a GPU or driver problem.
    """

    name = "nvml"
    kernel_log = True

    def __init__(
        self,
        nvml: ModuleType | None = None,
        *,
        proc_root: str = "/proc",
        processes: bool = True,
        events: bool = True,
    ) -> None:
        self._nvml: Any = nvml
        self._proc_root = proc_root
        self._want_processes = processes
        self._want_events = events
        self._gpus: list[NvmlGpu] = []
        self._by_handle: dict[Any, NvmlGpu] = {}
        self._opened = False
        self._q: NvmlQuery | None = None
        self._event_set: Any = None
        self._queue: list[GpuEvent] = []
        self._lock = threading.Lock()  # lost flags, event queue
        self._wait_lock = threading.Lock()  # held while inside nvmlEventSetWait
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._system: dict[str, str | None] = {}
        self._arch_names: dict[int, str] = {}

    @property
    def nvml_errors(self) -> int:
        """NVML errors that cost a reading since :meth:`open` (not-supported is not an error)."""
        return self._q.errors if self._q is not None else 0

    @property
    def _qry(self) -> NvmlQuery:
        assert self._q is not None, "NvmlBackend.open() was not called"
        return self._q

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Initialise NVML, cache handles, UUIDs and static facts; register the event set.

        Raises :class:`~shared.errors.NvmlUnavailableError` when NVML cannot be used.
        """
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as e:
                text_ = "NVML bindings not installed: pip install nvidia-ml-py"
                raise NvmlUnavailableError(text_, f"NVML bindings not installed ({e})") from e
        nvml = self._nvml
        self._q = NvmlQuery(nvml)
        init = status = "missing"
        try:
            init, _ = self._qry.attempt(None, "init", "nvmlInit", reraise=(nvml.NVMLError,))
            status, count = self._qry.attempt(None, "count", "nvmlDeviceGetCount", reraise=(nvml.NVMLError,))
        except nvml.NVMLError as e:
            if init == "ok":  # initialised, then failed: balance nvmlInit so a retry starts clean
                self._qry.query(None, "shutdown", "nvmlShutdown")
            raise NvmlUnavailableError(f"NVML unavailable: {e} (is the NVIDIA driver loaded?)", str(e)) from e
        if init != "ok" or status != "ok":
            raise NvmlUnavailableError(
                "NVML unavailable: the binding lacks nvmlInit/nvmlDeviceGetCount",
                "the NVML binding lacks nvmlInit/nvmlDeviceGetCount",
            )
        self._opened = True
        self._closed.clear()
        self._arch_names = {
            getattr(nvml, n): n.removeprefix("NVML_DEVICE_ARCH_").lower()
            for n in dir(nvml)
            if n.startswith("NVML_DEVICE_ARCH_") and n != "NVML_DEVICE_ARCH_UNKNOWN"
        }
        cuda = self._qry.query(None, "cuda_version", "nvmlSystemGetCudaDriverVersion")
        self._system = {
            "driver": text(self._qry.query(None, "driver_version", "nvmlSystemGetDriverVersion")),
            "nvml": text(self._qry.query(None, "nvml_version", "nvmlSystemGetNVMLVersion")),
            "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) and cuda > 0 else None,
        }
        self._gpus = [self._open_gpu(i) for i in range(int(count))]
        if self._want_events:
            self._open_events()
        self.sample()  # learns what each GPU does not support, so the first inventory says it

    def _open_gpu(self, index: int) -> NvmlGpu:
        gpu = NvmlGpu(index=index, handle=None)
        try:
            gpu.handle = self._qry.query(gpu, "handle", "nvmlDeviceGetHandleByIndex", index)
            if gpu.handle is None:
                raise GpuLost("nvmlDeviceGetHandleByIndex")
            gpu.uuid = text(self._qry.query(gpu, "uuid", "nvmlDeviceGetUUID", gpu.handle)) or ""
            self._read_static(gpu)
        except GpuLost:
            self._mark_lost(gpu)
        if gpu.handle is not None:
            self._by_handle[handle_key(gpu.handle)] = gpu
        return gpu

    def _read_static(self, gpu: NvmlGpu) -> None:
        q = partial(self._qry.query, gpu)
        h = gpu.handle
        pci = q("pci_bus_id", "nvmlDeviceGetPciInfo", h)
        power_default = q("power_limit_default_w", "nvmlDeviceGetPowerManagementDefaultLimit", h)
        mem = q("memory", "nvmlDeviceGetMemoryInfo", h)
        arch = q("architecture", "nvmlDeviceGetArchitecture", h)
        gpu.links = self._link_count(gpu)
        gpu.info = GpuInfo(
            index=gpu.index,
            uuid=gpu.uuid,
            name=text(q("name", "nvmlDeviceGetName", h)),
            serial=text(q("serial", "nvmlDeviceGetSerial", h)),
            pci_bus_id=None if pci is None else text(pci.busId) or text(getattr(pci, "busIdLegacy", None)),
            minor_number=q("minor_number", "nvmlDeviceGetMinorNumber", h),
            architecture=None if arch is None else self._arch_names.get(arch),
            mem_total_bytes=None if mem is None else int(mem.total),
            vbios=text(q("vbios", "nvmlDeviceGetVbiosVersion", h)),
            power_limit_default_w=None if power_default is None else power_default / 1000.0,
            pcie_link_gen_max=q("pcie_link_gen_max", "nvmlDeviceGetMaxPcieLinkGeneration", h),
            pcie_link_width_max=q("pcie_link_width_max", "nvmlDeviceGetMaxPcieLinkWidth", h),
            nvlink_links_total=gpu.links if gpu.links > 0 or "nvlink_state" not in gpu.unsupported else None,
        )
        self._build_request(gpu)

    def _link_count(self, gpu: NvmlGpu) -> int:
        """NVLinks of the GPU: the LINK_COUNT field, else the links that answer a state query."""
        values = self._qry.query(
            gpu, "field_values", "nvmlDeviceGetFieldValues", gpu.handle, [nf.NVLINK_LINK_COUNT]
        )
        if values is not None and int(values[0].nvmlReturn) == 0:
            return int(nf.raw_value(values[0]) or 0)
        links = 0
        for link in range(int(getattr(self._nvml, "NVML_NVLINK_MAX_LINKS", 18))):
            status, _ = self._qry.attempt(
                gpu, "nvlink_state", "nvmlDeviceGetNvLinkState", (gpu.handle, link), cache=False
            )
            if status != "ok":
                break
            links += 1
        if links == 0:
            gpu.unsupported.add("nvlink_state")
        return links

    def _build_request(self, gpu: NvmlGpu) -> None:
        gpu.request, gpu.specs = [], []
        for spec in nf.BATCH:
            if spec.attr in gpu.demoted:
                continue
            if spec.per_link:
                for link in range(gpu.links):
                    gpu.request.append((spec.field_id, link))
                    gpu.specs.append(spec)
                if gpu.links == 0:
                    gpu.demoted.add(spec.attr)
            else:
                gpu.request.append(spec.field_id)
                gpu.specs.append(spec)

    def _open_events(self) -> None:
        event_set = self._qry.query(None, "events", "nvmlEventSetCreate")
        if event_set is None:
            return
        registered = 0
        for gpu in self._gpus:
            if gpu.lost:
                continue
            try:
                registered += self._register_events(gpu, event_set)
            except GpuLost:
                self._mark_lost(gpu)
        if registered:
            self._event_set = event_set
        else:
            self._qry.query(None, "events", "nvmlEventSetFree", event_set)
            log.info(
                "no GPU offers NVML events (%d GPUs); XIDs come from the kernel log only", len(self._gpus)
            )

    def _register_events(self, gpu: NvmlGpu, event_set: Any) -> bool:
        """Register ``gpu`` for the event types it supports among those we convert. Raises GpuLost."""
        wanted = 0
        for bit in _EVENT_TYPES:
            wanted |= bit
        supported = self._qry.query(gpu, "events", "nvmlDeviceGetSupportedEventTypes", gpu.handle)
        mask = int(supported or 0) & wanted
        if not mask:
            return False
        status, _ = self._qry.attempt(
            gpu, "events", "nvmlDeviceRegisterEvents", (gpu.handle, mask, event_set)
        )
        return status == "ok"

    def close(self) -> None:
        """Free the event set and shut NVML down (idempotent); wakes :meth:`wait_events`."""
        self._closed.set()
        self._wake.set()
        with self._wait_lock:
            if self._event_set is not None:
                self._qry.query(None, "events", "nvmlEventSetFree", self._event_set)
                self._event_set = None
            if self._opened:
                self._opened = False
                self._qry.query(None, "shutdown", "nvmlShutdown")

    # ------------------------------------------------------------------ inventory

    def inventory(self) -> Inventory:
        """Driver, CUDA and NVML versions and every GPU's static facts (see :class:`GpuInfo`)."""
        gpus = []
        for gpu in self._gpus:
            info = gpu.info or GpuInfo(index=gpu.index, uuid=gpu.uuid)
            if not gpu.lost:
                try:
                    mig = self._qry.query(gpu, "mig_mode", "nvmlDeviceGetMigMode", gpu.handle)
                    pers = self._qry.query(
                        gpu, "persistence_mode", "nvmlDeviceGetPersistenceMode", gpu.handle
                    )
                    mig_on = mig is not None and int(mig[0]) == 1
                    instances = self._mig_devices(gpu) if mig_on else ()
                except GpuLost:
                    self._mark_lost(gpu)
                else:
                    if not mig_on:
                        gpu.mig = []
                    info = replace(
                        info,
                        mig_mode=None if mig is None else mig_on,
                        persistence_mode=None if pers is None else int(pers) == 1,
                        fabric_cluster_uuid=gpu.fabric_cluster,
                        mig_instances=instances,
                    )
            gpus.append(replace(info, unsupported=tuple(sorted(self._unsupported_fields(gpu)))))
        return Inventory(
            backend="nvml",
            driver_version=self._system.get("driver"),
            cuda_version=self._system.get("cuda"),
            nvml_version=self._system.get("nvml"),
            gpus=tuple(gpus),
        )

    def _mig_devices(self, gpu: NvmlGpu) -> tuple[MigInstance, ...]:
        """The MIG devices of a GPU in MIG mode (also kept as handles for :meth:`_read_mig`).

        Raises :class:`GpuLost`.
        """
        nvml = self._nvml
        count = self._qry.query(gpu, "mig", "nvmlDeviceGetMaxMigDeviceCount", gpu.handle)
        handles: list[tuple[Any, int, int, int | None]] = []
        out = []
        for i in range(int(count or 0)):
            status, mh = self._qry.attempt(
                gpu,
                "mig",
                "nvmlDeviceGetMigDeviceHandleByIndex",
                (gpu.handle, i),
                cache=False,
                quiet=(nvml.NVMLError_NotFound, nvml.NVMLError_InvalidArgument),
            )
            if status != "ok" or mh is None:
                continue  # no MIG device at this index
            q = partial(self._qry.query, None, "mig")
            gi, ci = q("nvmlDeviceGetGpuInstanceId", mh), q("nvmlDeviceGetComputeInstanceId", mh)
            if gi is None or ci is None:
                continue
            name = text(q("nvmlDeviceGetName", mh))
            m = _MIG_PROFILE.search(name or "")
            mem = q("nvmlDeviceGetMemoryInfo", mh)
            total = None if mem is None else int(mem.total)
            handles.append((mh, int(gi), int(ci), total))
            out.append(
                MigInstance(
                    gpu_instance_id=int(gi),
                    compute_instance_id=int(ci),
                    profile=m.group(1) if m else None,
                    uuid=text(q("nvmlDeviceGetUUID", mh)),
                    mem_total_bytes=total,
                )
            )
        gpu.mig = handles
        return tuple(out)

    def _read_mig(self, gpu: NvmlGpu, v: dict[str, Any]) -> None:
        """Memory (and utilisation, where NVML gives it) of each MIG device."""
        out = []
        for mh, gi, ci, total in gpu.mig:
            mem = self._qry.query(None, "mig", "nvmlDeviceGetMemoryInfo", mh)
            util = self._qry.query(gpu, "mig_util", "nvmlDeviceGetUtilizationRates", mh)
            out.append(
                MigSample(
                    gpu_instance_id=gi,
                    compute_instance_id=ci,
                    mem_total_bytes=total if mem is None else int(mem.total),
                    mem_used_bytes=None if mem is None else int(mem.used),
                    util_gpu_pct=None if util is None else float(util.gpu),
                )
            )
        v["mig"] = tuple(out)

    @staticmethod
    def _unsupported_fields(gpu: NvmlGpu) -> set[str]:
        batched = {spec.attr for spec in gpu.specs}
        return nf.topic_fields(gpu.unsupported) - batched

    # ------------------------------------------------------------------ sampling

    def sample(self) -> list[GpuSample]:
        """Read every GPU now; a lost GPU gives ``GpuSample(lost=True)`` and the others go on."""
        out: list[GpuSample] = []
        for gpu in self._gpus:
            try:
                if gpu.lost or gpu.info is None:
                    self._reacquire(gpu)
                values = self._read(gpu)
            except GpuLost:
                self._mark_lost(gpu)
                out.append(GpuSample(index=gpu.index, uuid=gpu.uuid, lost=True))
                continue
            if gpu.lost:
                self._mark_recovered(gpu)
            for name in nf.wire_safe(values):
                self._qry.count_error(f"reading {name}", "value outside its valid range")
            out.append(GpuSample(index=gpu.index, uuid=gpu.uuid, **values))
        return out

    def _reacquire(self, gpu: NvmlGpu) -> None:
        nvml = self._nvml
        quiet = (nvml.NVMLError_NotFound, nvml.NVMLError_Unknown, nvml.NVMLError_GpuNotFound)
        if gpu.uuid:
            status, h = self._qry.attempt(
                gpu, "reacquire", "nvmlDeviceGetHandleByUUID", (gpu.uuid,), cache=False, quiet=quiet
            )
        else:
            status, h = self._qry.attempt(
                gpu, "reacquire", "nvmlDeviceGetHandleByIndex", (gpu.index,), cache=False, quiet=quiet
            )
        if status != "ok" or h is None:
            raise GpuLost("reacquire")
        if handle_key(h) != handle_key(gpu.handle):  # a new handle (reset, or lost at open)
            gpu.handle = h
            self._by_handle[handle_key(h)] = gpu
            if self._event_set is not None:
                self._register_events(gpu, self._event_set)
        if gpu.info is None:
            gpu.uuid = gpu.uuid or text(self._qry.query(gpu, "uuid", "nvmlDeviceGetUUID", h)) or ""
            self._read_static(gpu)

    def _read(self, gpu: NvmlGpu) -> dict[str, Any]:
        v: dict[str, Any] = {}
        self._read_batch(gpu, v)
        q = partial(self._qry.query, gpu)
        h = gpu.handle
        nvml = self._nvml
        util = q("utilization", "nvmlDeviceGetUtilizationRates", h)
        if util is not None:
            v["util_gpu_pct"], v["util_mem_pct"] = float(util.gpu), float(util.memory)
        self._read_memory(gpu, v)
        temp = q("temp_c", "nvmlDeviceGetTemperature", h, 0)  # NVML_TEMPERATURE_GPU
        v["temp_c"] = None if temp is None else float(temp)
        self._read_thresholds(gpu, v)
        fan = q("fan_pct", "nvmlDeviceGetFanSpeed", h)
        v["fan_pct"] = None if fan is None else float(min(fan, 100))
        limit = q("power_limit_w", "nvmlDeviceGetEnforcedPowerLimit", h)
        v["power_limit_w"] = None if limit is None else limit / 1000.0
        pstate = self._qry.query_first(
            gpu, "pstate", ("nvmlDeviceGetPerformanceState", "nvmlDeviceGetPowerState"), h
        )
        v["pstate"] = pstate if isinstance(pstate, int) and 0 <= pstate < 32 else None
        v["clock_sm_mhz"] = q("clock_sm_mhz", "nvmlDeviceGetClockInfo", h, getattr(nvml, "NVML_CLOCK_SM", 1))
        v["clock_mem_mhz"] = q(
            "clock_mem_mhz", "nvmlDeviceGetClockInfo", h, getattr(nvml, "NVML_CLOCK_MEM", 2)
        )
        v["clock_event_reasons"] = self._qry.query_first(
            gpu,
            "clock_event_reasons",
            ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
            h,
        )
        v["clock_sm_app_mhz"] = q(
            "clock_sm_app_mhz", "nvmlDeviceGetApplicationsClock", h, getattr(nvml, "NVML_CLOCK_SM", 1)
        )
        self._read_fabric(gpu, v)
        v["pcie_link_gen"] = q("pcie_link_gen", "nvmlDeviceGetCurrPcieLinkGeneration", h)
        v["pcie_link_width"] = q("pcie_link_width", "nvmlDeviceGetCurrPcieLinkWidth", h)
        info = gpu.info
        if info is not None:
            v["pcie_link_gen_max"] = info.pcie_link_gen_max
            v["pcie_link_width_max"] = info.pcie_link_width_max
            v["nvlink_links_total"] = info.nvlink_links_total
        pers = q("persistence_mode", "nvmlDeviceGetPersistenceMode", h)
        v["persistence_mode"] = None if pers is None else int(pers) == 1
        if self._want_processes:
            compute = q("processes", "nvmlDeviceGetComputeRunningProcesses", h)
            graphics = q("graphics_processes", "nvmlDeviceGetGraphicsRunningProcesses", h)
            procs = build_processes(merge_nvml(compute, graphics), self._proc_root)
            ids = mig_ids(compute, graphics)
            if ids:  # MIG: each process runs in one GPU instance / compute instance
                procs = tuple(
                    replace(p, gpu_instance_id=ids[p.pid][0], compute_instance_id=ids[p.pid][1])
                    if p.pid in ids
                    else p
                    for p in procs
                )
            v["processes"] = procs
        if gpu.mig:
            self._read_mig(gpu, v)
        return v

    def _read_fabric(self, gpu: NvmlGpu, v: dict[str, Any]) -> None:
        """NVSwitch fabric registration (NVML GPU fabric info, versioned form first).

        A GPU without a fabric (no NVSwitch, or a driver without the call) answers not
        supported, or state NOT_SUPPORTED: the readings are absent and not asked again.
        """
        nvml = self._nvml
        info, mask = None, None
        versioned = getattr(nvml, "c_nvmlGpuFabricInfoV_t", None)
        if versioned is not None:
            info = versioned()
            status, _ = self._qry.attempt(
                gpu, "fabric", "nvmlDeviceGetGpuFabricInfoV", (gpu.handle, ctypes.byref(info))
            )
            if status == "ok":
                mask = int(info.healthMask)
            elif status != "missing":
                return
            else:
                info = None
        if info is None:
            plain = getattr(nvml, "c_nvmlGpuFabricInfo_t", None)
            if plain is None:
                return
            info = plain()
            status, _ = self._qry.attempt(
                gpu, "fabric", "nvmlDeviceGetGpuFabricInfo", (gpu.handle, ctypes.byref(info))
            )
            if status != "ok":
                return
        state = int(info.state)
        if state == 0:  # NVML_GPU_FABRIC_STATE_NOT_SUPPORTED
            gpu.unsupported.add("fabric")
            return
        v["fabric_state"], v["fabric_status"] = state, int(info.status)
        v["fabric_clique_id"], v["fabric_health_mask"] = int(info.cliqueId), mask
        raw = bytes(info.clusterUuid)
        gpu.fabric_cluster = None if not any(raw) else str(uuid.UUID(bytes=raw))

    def _read_memory(self, gpu: NvmlGpu, v: dict[str, Any]) -> None:
        version = getattr(self._nvml, "nvmlMemory_v2", None)
        if version is not None:
            status, mem = self._qry.attempt(
                gpu, "memory_v2", "nvmlDeviceGetMemoryInfo", (gpu.handle,), {"version": version}
            )
            if status == "ok":
                v["mem_total_bytes"], v["mem_used_bytes"] = int(mem.total), int(mem.used)
                v["mem_reserved_bytes"] = int(mem.reserved)
                return
            if status == "error":  # not "not supported": v1 would most likely fail the same way
                return
        mem = self._qry.query(gpu, "memory", "nvmlDeviceGetMemoryInfo", gpu.handle)
        if mem is not None:
            v["mem_total_bytes"], v["mem_used_bytes"] = int(mem.total), int(mem.used)

    def _read_thresholds(self, gpu: NvmlGpu, v: dict[str, Any]) -> None:
        # NVML_TEMPERATURE_THRESHOLD_SHUTDOWN 0, SLOWDOWN 1, GPU_MAX 3 (max operating)
        # MEM_MAX 2: the HBM limit
        for attr, kind in (
            ("temp_shutdown_c", 0),
            ("temp_slowdown_c", 1),
            ("temp_max_operating_c", 3),
            ("temp_mem_max_c", 2),
        ):
            cached = gpu.thresholds.get(attr)
            if cached is None:
                t = self._qry.query(gpu, attr, "nvmlDeviceGetTemperatureThreshold", gpu.handle, kind)
                if t is not None and t > 0:
                    cached = gpu.thresholds[attr] = float(t)
            v[attr] = cached

    def _read_batch(self, gpu: NvmlGpu, v: dict[str, Any]) -> None:
        """The batched fields; those the batch does not give are read by their single call."""
        values = None
        failed: set[str] = set()
        if gpu.request:
            status, values = self._qry.attempt(
                gpu, "field_values", "nvmlDeviceGetFieldValues", (gpu.handle, gpu.request)
            )
            if status in ("missing", "unsupported"):  # no batching here: single calls from now on
                gpu.demoted.update(spec.attr for spec in gpu.specs)
                self._build_request(gpu)
            elif status == "error":  # counted once; these readings are absent this tick
                failed = {spec.attr for spec in gpu.specs}
        demote: set[str] = set()
        codes: dict[str, int] = {}
        by_link: dict[str, list[int]] = {}  # per-link answers, in link order
        if values is not None:
            for spec, fv in zip(gpu.specs, values, strict=False):
                ret = int(fv.nvmlReturn)
                if ret == _GPU_IS_LOST:
                    raise GpuLost("nvmlDeviceGetFieldValues")
                if ret in _UNSUPPORTED_CODES:
                    demote.add(spec.attr)
                elif ret != 0:
                    failed.add(spec.attr)
                    codes[spec.attr] = ret
                elif spec.per_link:
                    raw = nf.raw_value(fv)
                    by_link.setdefault(spec.attr, []).append(int(raw) if raw is not None and raw >= 0 else 0)
                else:
                    v[spec.attr] = nf.convert(spec, nf.raw_value(fv))
            for attr in failed:
                self._qry.count_error(f"field {attr}", f"NVML return code {codes[attr]}")
                v[attr] = None if attr in nf.SCALAR_FIELDS else ()
            for attr, answers in by_link.items():
                if attr in failed or attr in demote:
                    continue
                if attr == "nvlink_links_up":  # states: 1 active
                    v[attr] = sum(1 for a in answers if a == 1)
                    v["nvlink_down_links"] = tuple(i for i, a in enumerate(answers) if a != 1)
                else:
                    v[attr] = tuple(answers)
        if demote:
            gpu.demoted |= demote
            self._build_request(gpu)
        self._read_fallbacks(gpu, v, skip=failed)

    def _read_fallbacks(self, gpu: NvmlGpu, v: dict[str, Any], skip: set[str]) -> None:
        if not gpu.demoted:
            return
        q = partial(self._qry.query, gpu)
        done: set[str] = set()
        for spec in nf.BATCH:
            if spec.attr not in gpu.demoted or spec.attr in skip:
                continue
            needs = nf.FALLBACK_NEEDS.get(spec.fallback or "")
            if spec.fallback is None or (needs and not hasattr(self._nvml, needs)):
                gpu.unsupported.add(spec.attr)  # no single call gives it with this binding
                continue
            if spec.fallback in done:
                continue
            done.add(spec.fallback)
            got = nf.FALLBACKS[spec.fallback](q, self._nvml, gpu.handle, gpu.links)
            v.update(
                (k, val) for k, val in got.items() if k in gpu.demoted or nf.DERIVED.get(k) in gpu.demoted
            )

    # ------------------------------------------------------------------ lost / recovered

    def _mark_lost(self, gpu: NvmlGpu) -> None:
        if self._set_lost(gpu, True, "gpu_lost", "NVML: GPU is lost (fell off the bus)"):
            log.error("GPU %d (%s) is lost: NVML answers GPU_IS_LOST", gpu.index, gpu.uuid or "uuid unknown")

    def _mark_recovered(self, gpu: NvmlGpu) -> None:
        if self._set_lost(gpu, False, "gpu_recovered", None):
            log.warning("GPU %d (%s) answers again", gpu.index, gpu.uuid)

    def _set_lost(self, gpu: NvmlGpu, lost: bool, event: str, message: str | None) -> bool:
        """Flip ``gpu.lost`` to ``lost`` and queue ``event``; False if it already was."""
        with self._lock:
            if gpu.lost == lost:
                return False
            gpu.lost = lost
            self._queue.append(
                GpuEvent(
                    type=event,
                    ts=time.time(),
                    source="nvml",
                    gpu_index=gpu.index,
                    gpu_uuid=gpu.uuid or None,
                    message=message,
                )
            )
        self._wake.set()
        return True

    def _probe_all(self) -> None:
        """After the event wait said GPU_IS_LOST: find which GPUs are lost."""
        for gpu in self._gpus:
            if gpu.lost:
                continue
            try:
                self._qry.attempt(gpu, "probe", "nvmlDeviceGetPciInfo", (gpu.handle,), cache=False)
            except GpuLost:
                self._mark_lost(gpu)

    # ------------------------------------------------------------------ events

    def host_down(self) -> bool:
        """Real GPUs: the host is up whenever the agent runs."""
        return False

    def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """XID, ECC, page-retirement and recovery-action events, and queued GPU lost/recovered.

        Blocks up to ``timeout_s``; ``[]`` on timeout or after :meth:`close`.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            events = self._take_queued()
            if events or self._closed.is_set():
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            wait_s = min(_SLICE_S, remaining)
            if self._event_set is None:
                self._wake.wait(wait_s)
                continue
            with self._wait_lock:
                if self._event_set is None or self._closed.is_set():
                    continue
                events = self._wait_set(int(wait_s * 1000))
            if events:
                return self._take_queued() + events

    def _take_queued(self) -> list[GpuEvent]:
        with self._lock:
            self._wake.clear()
            events, self._queue = self._queue, []
        return events

    def _wait_set(self, timeout_ms: int) -> list[GpuEvent]:
        nvml = self._nvml
        events: list[GpuEvent] = []
        for _ in range(_MAX_EVENTS):
            try:
                status, data = self._qry.attempt(
                    None,
                    "event_wait",
                    "nvmlEventSetWait",
                    (self._event_set, timeout_ms),
                    quiet=(nvml.NVMLError_Timeout,),
                )
            except GpuLost:
                self._probe_all()
                break
            if status != "ok":
                if status != "quiet" and not events:  # a failing wait must not spin
                    self._closed.wait(timeout_ms / 1000.0)
                break
            ev = self._convert_event(data)
            if ev is not None:
                events.append(ev)
            timeout_ms = 0  # drain what is already queued, then return
        return events

    def _convert_event(self, data: Any) -> GpuEvent | None:
        kind = _EVENT_TYPES.get(int(data.eventType))
        if kind is None:
            return None
        gpu = self._by_handle.get(handle_key(data.device))
        raw = int(data.eventData)
        value: int | None = raw
        if kind == "xid":
            value = None
        elif kind == "page_retirement":
            value = 1 if int(data.eventType) == 0x800 else 0  # DramRetirementFailure
        return GpuEvent(
            type=kind,
            ts=time.time(),
            source="nvml",
            gpu_index=None if gpu is None else gpu.index,
            gpu_uuid=None if gpu is None else gpu.uuid or None,
            xid=raw if kind == "xid" else None,
            value=value,
        )
