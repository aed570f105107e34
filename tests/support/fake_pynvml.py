"""A recorded fake of the ``pynvml`` module, built from data (``tests/data/nvml_*.json``).

It exposes the constants, structures and exception classes of the REAL ``pynvml`` module
(nvidia-ml-py) and replaces only the functions: each answers from the recorded data, returns
the same ctypes structures the binding returns, and raises the real ``NVMLError`` subclasses.
Tests drive it: lose / recover a GPU, push NVML events, make a call fail, remove a function
(an older binding), make ``nvmlInit`` fail. ``calls`` counts every call per (function, GPU index).
"""

from __future__ import annotations

import copy
import ctypes
import json
import threading
import types
from collections import Counter, deque
from pathlib import Path
from typing import Any

import pynvml as real

DATA = Path(__file__).parent.parent / "data"

# Functions whose answer is a structure, built from the recorded dict / list.
_STRUCTS: dict[str, Any] = {
    "nvmlDeviceGetUtilizationRates": real.c_nvmlUtilization_t,
    "nvmlDeviceGetViolationStatus": real.c_nvmlViolationTime_t,
}


# Functions that fill a structure passed by reference (recorded as a dict of its fields).
_FILLS = frozenset({"nvmlDeviceGetGpuFabricInfoV", "nvmlDeviceGetGpuFabricInfo"})


class FakeNvml:
    """State of the fake; ``module`` is what the backend gets as ``nvml``."""

    def __init__(self, data: dict[str, Any], gpus: int | None = None, *, cache_fields: bool = False) -> None:
        self.data = copy.deepcopy(data)
        # cache_fields: build each field-value batch once and return copies (for the benchmark,
        # so it measures the backend more than the fake); answers must not change afterwards.
        self._field_cache: dict[tuple[int, tuple[Any, ...]], Any] | None = {} if cache_fields else None
        recorded = self.data["gpus"]
        if gpus is not None:  # more GPUs: clone the recorded ones with new UUIDs and bus ids
            self.data["gpus"] = [self._clone(recorded[i % len(recorded)], i) for i in range(gpus)]
        self.calls: Counter[tuple[str, int | None]] = Counter()
        self.lost: set[int] = set()
        self.init_error: str | None = None
        self.initialized = 0
        self.shutdowns = 0
        self.registered: dict[int, int] = {}  # GPU index -> event mask
        self._events: deque[tuple[int, int, int]] = deque()
        self._cond = threading.Condition()
        self._structs = [real.struct_c_nvmlDevice_t() for _ in self.data["gpus"]]
        self._handles = [real.c_nvmlDevice_t(s) for s in self._structs]
        # MIG devices: (GPU index, MIG index) -> handle, answered from gpus[i]["mig"][k]["calls"]
        self._mig_structs = {
            (i, k): real.struct_c_nvmlDevice_t()
            for i, g in enumerate(self.data["gpus"])
            for k in range(len(g.get("mig", ())))
        }
        self._mig_handles = {key: real.c_nvmlDevice_t(st) for key, st in self._mig_structs.items()}
        self._event_set_struct = real.struct_c_nvmlEventSet_t()
        self.module = self._build_module()

    @classmethod
    def load(
        cls, name: str = "nvml_h100x2.json", gpus: int | None = None, *, cache_fields: bool = False
    ) -> FakeNvml:
        return cls(json.loads((DATA / name).read_text()), gpus, cache_fields=cache_fields)

    @staticmethod
    def _clone(gpu: dict[str, Any], i: int) -> dict[str, Any]:
        g = copy.deepcopy(gpu)
        calls = g["calls"]
        calls["nvmlDeviceGetUUID"] = f"GPU-00000000-0000-4000-8000-{i:012x}"
        calls["nvmlDeviceGetMinorNumber"] = i
        calls["nvmlDeviceGetPciInfo"] = dict(
            calls["nvmlDeviceGetPciInfo"], busId=f"00000000:{0x18 + i * 0x11:02X}:00.0"
        )
        return g

    # ------------------------------------------------------------------ test controls

    def gpu(self, index: int) -> dict[str, Any]:
        """The recorded answers of one GPU (tests change them in place)."""
        gpu: dict[str, Any] = self.data["gpus"][index]
        return gpu

    def set_call(self, index: int, key: str, answer: Any) -> None:
        """Answer ``key`` (``fn`` or ``fn/arg``) on GPU ``index`` with ``answer`` (or ``{"error": name}``)."""
        self.gpu(index)["calls"][key] = answer

    def set_field(self, index: int, key: str, answer: dict[str, Any]) -> None:
        self.gpu(index)["fields"][key] = answer

    def remove(self, *names: str) -> None:
        """Delete functions from the module, as an older binding lacks them."""
        for name in names:
            delattr(self.module, name)

    def lose(self, index: int) -> None:
        self.lost.add(index)

    def recover(self, index: int) -> None:
        self.lost.discard(index)

    def push_event(self, index: int, event_type: int, data: int = 0) -> None:
        """Queue an NVML event for GPU ``index`` (delivered only if registered for that type)."""
        with self._cond:
            self._events.append((index, event_type, data))
            self._cond.notify_all()

    def events_pending(self) -> int:
        """Events pushed and not yet taken by ``nvmlEventSetWait``."""
        with self._cond:
            return len(self._events)

    def lose_during_wait(self, index: int) -> None:
        """Lose GPU ``index`` and make the next ``nvmlEventSetWait`` raise ``GpuIsLost``."""
        self.lose(index)
        self.push_event(index, 0)

    def count(self, fn: str, index: int | None = None) -> int:
        return self.calls[(fn, index)]

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _error(name: str) -> Exception:
        cls: type[Exception] = getattr(real, f"NVMLError_{name}")
        return cls()

    def _index(self, handle: Any) -> int:
        return self._resolve(handle)[0]

    def _resolve(self, handle: Any) -> tuple[int, dict[str, Any]]:
        """(GPU index, recorded calls) of a device handle or of one of its MIG devices."""
        addr = ctypes.cast(handle, ctypes.c_void_p).value
        for i, s in enumerate(self._structs):
            if ctypes.addressof(s) == addr:
                calls: dict[str, Any] = self.gpu(i)["calls"]
                return i, calls
        for (i, k), s in self._mig_structs.items():
            if ctypes.addressof(s) == addr:
                mig_calls: dict[str, Any] = self.gpu(i)["mig"][k]["calls"]
                return i, mig_calls
        raise self._error("InvalidArgument")

    def _mig_handle(self, handle: Any, index: int) -> Any:
        parent = self._index(handle)
        self.calls[("nvmlDeviceGetMigDeviceHandleByIndex", parent)] += 1
        if parent in self.lost:
            raise self._error("GpuIsLost")
        if (parent, index) not in self._mig_handles:
            raise self._error("NotFound")
        return self._mig_handles[(parent, index)]

    def _answer(self, table: dict[str, Any], key: str, fallback_key: str) -> Any:
        answer = table.get(key, table.get(fallback_key, {"error": "NotSupported"}))
        if isinstance(answer, dict) and set(answer) == {"error"}:
            raise self._error(answer["error"])
        return copy.deepcopy(answer)

    def _device(self, name: str, handle: Any, *args: Any) -> Any:
        self._need_init()
        index, table = self._resolve(handle)
        self.calls[(name, index)] += 1
        if index in self.lost:
            raise self._error("GpuIsLost")
        if name in _FILLS:  # the caller passes byref(structure): fill it as the library does
            answer = self._answer(table, name, name)
            target = args[0]._obj
            for k, val in answer.items():
                if k == "clusterUuid":
                    val = (ctypes.c_uint8 * 16)(*bytes.fromhex(val.replace("-", "")))
                setattr(target, k, val)
            return real.NVML_SUCCESS
        key = "/".join([name, *(str(a) for a in args)])
        answer = self._answer(table, key, name)
        if name in _STRUCTS:
            return _STRUCTS[name](**answer)
        if name == "nvmlDeviceGetPciInfo":
            answer["busId"] = answer["busId"].encode()
            answer["busIdLegacy"] = answer["busId"][4:]
            return real.nvmlPciInfo_t(**answer)
        if name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            return [self._process(p) for p in answer]
        if name == "nvmlDeviceGetRemappedRows":
            return tuple(answer)
        return answer

    @staticmethod
    def _process(p: dict[str, Any]) -> Any:
        mem = p.get("usedGpuMemory")
        c = real.c_nvmlProcessInfo_v3_t(
            pid=p["pid"],
            usedGpuMemory=(1 << 64) - 1 if mem is None else mem,
            gpuInstanceId=p.get("gpuInstanceId", 0xFFFFFFFF),  # NVML's "not in a MIG device"
            computeInstanceId=p.get("computeInstanceId", 0xFFFFFFFF),
        )
        obj = real.nvmlStructToFriendlyObject(c)
        if obj.usedGpuMemory == (1 << 64) - 1:  # as the binding does
            obj.usedGpuMemory = None
        return obj

    def _need_init(self) -> None:
        if self.initialized <= 0:
            raise self._error("Uninitialized")

    def _build_module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        for name in dir(real):  # constants, structures, exception classes: the real ones
            value = getattr(real, name)
            if not (isinstance(value, types.FunctionType) and name.startswith("nvml")):
                setattr(mod, name, value)
        device_calls = {
            k.split("/")[0]
            for g in self.data["gpus"]
            for table in [g["calls"], *(m["calls"] for m in g.get("mig", ()))]
            for k in table
            if k.startswith("nvmlDevice")
        }
        for name in device_calls:
            setattr(mod, name, self._bind(name))
        for name, value in self.data["system"].items():
            setattr(mod, name, self._system(name, value))
        mod.nvmlInit = self._init
        mod.nvmlShutdown = self._shutdown
        mod.nvmlDeviceGetCount = self._count
        mod.nvmlDeviceGetHandleByIndex = self._by_index
        mod.nvmlDeviceGetHandleByUUID = self._by_uuid
        mod.nvmlDeviceGetMemoryInfo = self._memory
        mod.nvmlDeviceGetFieldValues = self._field_values
        mod.nvmlDeviceGetMigDeviceHandleByIndex = self._mig_handle
        mod.nvmlEventSetCreate = self._event_set_create
        mod.nvmlDeviceRegisterEvents = self._register
        mod.nvmlEventSetWait = self._event_wait
        mod.nvmlEventSetFree = self._event_free
        return mod

    def _bind(self, name: str) -> Any:
        def call(handle: Any, *args: Any) -> Any:
            return self._device(name, handle, *args)

        call.__name__ = name
        return call

    def _system(self, name: str, value: Any) -> Any:
        def call() -> Any:
            self._need_init()
            self.calls[(name, None)] += 1
            return value

        return call

    # ------------------------------------------------------------------ special functions

    def _init(self) -> None:
        self.calls[("nvmlInit", None)] += 1
        if self.init_error:
            raise self._error(self.init_error)
        self.initialized += 1

    def _shutdown(self) -> None:
        self.calls[("nvmlShutdown", None)] += 1
        self._need_init()
        self.initialized -= 1
        self.shutdowns += 1

    def _count(self) -> int:
        self._need_init()
        return len(self.data["gpus"])

    def _by_index(self, index: int) -> Any:
        self._need_init()
        self.calls[("nvmlDeviceGetHandleByIndex", index)] += 1
        if not 0 <= index < len(self._handles):
            raise self._error("InvalidArgument")
        if index in self.lost:
            raise self._error("GpuIsLost")
        return self._handles[index]

    def _by_uuid(self, uuid: Any) -> Any:
        self._need_init()
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for i, g in enumerate(self.data["gpus"]):
            if g["calls"]["nvmlDeviceGetUUID"] == uuid:
                self.calls[("nvmlDeviceGetHandleByUUID", i)] += 1
                if i in self.lost:
                    raise self._error("GpuIsLost")
                return self._handles[i]
        raise self._error("NotFound")

    def _memory(self, handle: Any, version: int | None = None) -> Any:
        answer = self._device("nvmlDeviceGetMemoryInfo", handle)
        if version:
            return real.c_nvmlMemory_v2_t(version=version, **answer)
        return real.c_nvmlMemory_t(**{k: answer[k] for k in ("total", "free", "used")})

    def _field_values(self, handle: Any, field_ids: list[Any]) -> Any:
        self._need_init()
        index = self._index(handle)
        self.calls[("nvmlDeviceGetFieldValues", index)] += 1
        if index in self.lost:
            raise self._error("GpuIsLost")
        fields = self.gpu(index)["fields"]
        if "error" in fields:  # the whole call fails
            raise self._error(fields["error"])
        key = (index, tuple(field_ids))
        if self._field_cache is not None and key in self._field_cache:
            template = self._field_cache[key]
            return type(template).from_buffer_copy(template)
        values = (real.c_nvmlFieldValue_t * len(field_ids))()
        for i, fid in enumerate(field_ids):
            fid, scope = fid if isinstance(fid, tuple) else (fid, 0)
            values[i].fieldId, values[i].scopeId = fid, scope
            self.calls[(f"field {fid}", index)] += 1
            answer = fields.get(f"{fid}/{scope}", fields.get(str(fid), {"error": "NotSupported"}))
            if "error" in answer:
                values[i].nvmlReturn = getattr(real, "NVMLError_" + answer["error"])().value
                continue
            values[i].nvmlReturn = 0
            values[i].valueType = answer["type"]
            member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
            setattr(values[i].value, member[answer["type"]], answer["value"])
        if self._field_cache is not None:
            self._field_cache[key] = values
        return values

    def _event_set_create(self) -> Any:
        self._need_init()
        self.calls[("nvmlEventSetCreate", None)] += 1
        return real.c_nvmlEventSet_t(self._event_set_struct)

    def _register(self, handle: Any, mask: int, event_set: Any) -> None:
        index = self._index(handle)
        self.calls[("nvmlDeviceRegisterEvents", index)] += 1
        if index in self.lost:
            raise self._error("GpuIsLost")
        self.registered[index] = self.registered.get(index, 0) | mask

    def _event_wait(self, event_set: Any, timeout_ms: int) -> Any:
        self._need_init()
        self.calls[("nvmlEventSetWait", None)] += 1
        with self._cond:
            if not self._events:
                self._cond.wait(timeout_ms / 1000.0)
            while self._events:
                index, etype, data = self._events.popleft()
                if index in self.lost and etype == 0:
                    raise self._error("GpuIsLost")
                if self.registered.get(index, 0) & etype:
                    return real.c_nvmlEventData_t(
                        device=self._handles[index], eventType=etype, eventData=data
                    )
        raise self._error("Timeout")

    def _event_free(self, event_set: Any) -> None:
        self.calls[("nvmlEventSetFree", None)] += 1
