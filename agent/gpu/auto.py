"""Pick the sources from the configuration: NVML and the real host, or simulated GPUs on a
simulated host (with the fault schedule of ``[simulate] faults``)."""

from __future__ import annotations

from typing import Final

from agent.faults import FaultSchedule
from agent.gpu.base import GpuBackend
from agent.gpu.simulated import SimulatedBackend
from agent.node import NodeSource
from agent.system import PsutilSystem, SimulatedSystem, SystemSource
from shared.config import AgentConfig
from shared.errors import ConfigError

BACKENDS: Final = ("auto", "nvml", "simulated")
DEFAULT_MODEL: Final = "NVIDIA H100 80GB HBM3"


def make_backend(
    kind: str,
    *,
    simulate_gpus: int,
    host: str,
    seed: int,
    faults: FaultSchedule,
    proc_root: str = "/proc",
    processes: bool = True,
    events: bool = True,
    model: str = DEFAULT_MODEL,
) -> GpuBackend:
    """The backend for ``kind`` (``auto``, ``nvml`` or ``simulated``), not yet opened.

    ``simulate_gpus > 0`` (``--simulate N``) selects simulated GPUs whatever ``kind`` says;
    ``auto`` otherwise means NVML. Raises :class:`~shared.errors.ConfigError` for an unknown
    kind, a negative GPU count, ``simulated`` without GPUs, or faults given to real GPUs.
    The NVML module is imported only when NVML is chosen, so simulated agents need no driver.
    """
    if kind not in BACKENDS:
        raise ConfigError(
            "agent.backend", f"unknown backend {kind!r} (expected one of: {', '.join(BACKENDS)})"
        )
    if simulate_gpus < 0:
        raise ConfigError("simulate.gpus", f"must not be negative, got {simulate_gpus}")
    if kind == "simulated" or simulate_gpus > 0:
        if simulate_gpus == 0:
            raise ConfigError("simulate.gpus", "backend 'simulated' needs simulate.gpus > 0 (--simulate N)")
        return SimulatedBackend(simulate_gpus, host=host, seed=seed, faults=faults, model=model)
    if faults:
        raise ConfigError("fault", "fault injection works on simulated GPUs only (--simulate N)")
    from agent.gpu.nvml import NvmlBackend  # lazy: pynvml only where NVML is used

    return NvmlBackend(proc_root=proc_root, processes=processes, events=events)


def make_sources(config: AgentConfig) -> tuple[GpuBackend, SystemSource]:
    """The GPU backend and system source ``config`` asks for, not yet opened: simulated GPUs
    (``simulate.gpus``) come with a simulated host, both following ``simulate.faults``."""
    a, sim = config.agent, config.simulate
    faults = FaultSchedule.parse(sim.faults).for_host(a.host)
    backend = make_backend(
        "simulated" if sim.gpus > 0 else a.backend,
        simulate_gpus=sim.gpus,
        host=a.host,
        seed=sim.seed,
        faults=faults,
        proc_root=a.proc_root,
        processes=a.processes,
        events=a.nvml_events,
        model=sim.model,
    )
    system: SystemSource
    if backend.name == "simulated":
        system = SimulatedSystem(host=a.host, seed=sim.seed, faults=faults)
    else:
        system = PsutilSystem(a.host, node=NodeSource(config.node, proc_root=a.proc_root))
    return backend, system
