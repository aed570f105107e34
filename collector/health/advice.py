"""The advice of every check: the longer text an observation (and its alert) carries beside
its one-line summary, keyed by check id.

A check with more than one kind of problem has one entry per kind, ``<check>/<kind>``; a
problem whose advice depends on the reading (an XID, an SXid, a kernel-log class, the RMA
evidence, the memory-trend window) builds it where it is judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

ADVICE: Final[Mapping[str, str]] = {
    "gpu.lost": "The GPU no longer answers (GPU_IS_LOST, XID 79). Its last values are stale. "
    "Drain the node and reboot; if it recurs, RMA the GPU.",
    "gpu.persistence": "Without persistence mode the driver tears down and re-initialises the GPU "
    "between clients, which adds latency and hides state; enable it or run "
    "nvidia-persistenced.",
    "gpu.temperature": "The GPU is near or past its thermal limits: it will slow down, then shut down. "
    "Check the fans, inlet temperature and airflow; drain the node if it persists.",
    "gpu.ecc_sbe_rate": "Corrected errors are absorbed, but a high rate often precedes page retirement, "
    "row remapping or double-bit errors. Track the trend; schedule a GPU reset.",
    "gpu.ecc_dbe": "Volatile double-bit ECC errors > 0 (DCGM fails this). Data on the GPU may be "
    "corrupt: stop its jobs, reset the GPU; RMA if it recurs.",
    "gpu.retired_pages": "The retired-page table is full or nearly so (DCGM fails at 63): the GPU can no "
    "longer retire bad memory. Take it out of service and RMA it.",
    "gpu.retired_pages/pending": "Pages are marked for retirement; they are retired at the next GPU reset or "
    "reboot. Drain the GPU and reset it.",
    "gpu.row_remap": "The GPU could not remap a failing memory row (DCGM fails this). Its memory can no "
    "longer be repaired in the field.",
    "gpu.clock_events": "Hardware slowdown, HW thermal slowdown or the power brake cut the clocks. "
    "Check the PSUs, power cabling and cooling; if it is sustained, drain the node.",
    "gpu.clock_events/thermal": "The thermal violation time grew since the last sample (DCGM warns on any "
    "thermal violation in the last minute). Check fans and airflow.",
    "gpu.pcie_replay": "The PCIe link retransmits more than its bit-error rate allows (DCGM warns above "
    "ceil(1e-12 x lane rate x 60 s x lanes)). Reseat the card, check risers and "
    "cables, update the firmware.",
    "gpu.nvlink": "A link down or CRC errors at 100/s or more (DCGM fails both) break or slow "
    "multi-GPU jobs. Drain, reset the GPUs; if it recurs, service the baseboard.",
    "gpu.nvlink/errors": "NVLink error counters grew (DCGM warns on any increase). Occasional errors are "
    "retried; a growing rate points at a failing link (the per-link counters name it).",
    "gpu.power": "Power above the enforced limit means the limit is not holding (firmware or "
    "sensor fault) or the limit changed. Check nvidia-smi -q -d POWER.",
    "gpu.memory_full": "GPU memory is nearly exhausted; new allocations will fail. Look at the "
    "processes on the GPU; a leaked or orphaned process may hold the memory.",
    "gpu.recovery_action": "The NVIDIA driver reported the recovery action it needs (NVML recovery action, "
    "XID 154). Until it is done the GPU may misbehave.",
    "gpu.pcie_link": "The link trained below its maximum (a narrower width at any time, or a lower "
    "generation while the GPU is busy; idle GPUs lower their generation to save power, "
    "which is not judged). Host-GPU bandwidth is cut. Reseat the card, check risers, "
    "retimers and cables, update the firmware.",
    "gpu.hbm_temp": "The memory (HBM) temperature is near or past the limit NVML reports for it "
    "(NVML_TEMPERATURE_THRESHOLD_MEM_MAX): the GPU slows its memory down, then errors "
    "follow. Check the cold plate or heatsink, fans and inlet temperature.",
    "gpu.sm_clock": "The GPU is busy, NVML reports no clock-event (throttle) reason, yet the SM clock is "
    "far below the application clock: a forgotten clock lock (nvidia-smi -q -d CLOCK), "
    "a firmware problem or a failing board. Reset the clocks (nvidia-smi -rgc -rac); "
    "run diagnostics if it persists.",
    "gpu.fan": "The GPU is hot but its fan does not turn. Check the fan and its connector; "
    "replace the fan or the board before the GPU throttles or shuts down.",
    "gpu.row_remap/pending": "A memory row is waiting to be remapped; the remap takes effect at the next GPU "
    "reset. Drain the GPU and reset it.",
    "gpu.row_remap/uncorrectable": "Many rows have been remapped for uncorrectable errors (DCGM warns at "
    "512). Spare rows are running out; plan a replacement.",
    "gpu.rma": "repeated fatal XIDs on this GPU: take it out of service for hardware inspection / RMA "
    "(run field diagnostics, collect nvidia-bug-report.sh)",
    "gpu.fabric": "On NVSwitch systems the fabric manager (nvidia-fabricmanager) registers every GPU "
    "with the NVLink fabric; until it has, CUDA jobs fail to start (error 802, system "
    "not yet initialised) or lose NVLink bandwidth. Check systemctl status "
    "nvidia-fabricmanager and its log; restart it, then reset the GPUs.",
    "host.cpu": "CPU saturated: data loaders and the GPU driver starve; look for runaway processes.",
    "host.memory": "Host memory nearly exhausted: the OOM killer may take jobs or the agent; "
    "look at the largest processes.",
    "host.swap": "The host is swapping: jobs slow down badly; reduce memory use or add memory.",
    "host.disk": "The filesystem is nearly full: checkpoints, logs and containers will fail "
    "to write; clean up or grow it.",
    "host.load": "Load average per core is high: processes wait for CPU or I/O (look at "
    "iowait and stuck NFS mounts).",
    "host.fds": "Open file descriptors near the system limit: new connections and files will fail.",
    "host.nic": "The interface reports errors, drops or is down: check cables, optics, switch "
    "port and driver; collective operations will stall.",
    "net.target": "A configured network target is unreachable or slow from this host: check "
    "routing, firewalls and the target itself.",
    "host.ib_port": "An InfiniBand port is down or links below its expected rate: its rail is lost or "
    "slowed, collective operations stall or slow down; check the cable, transceiver and switch port "
    "(ibstat, mlxlink), reseat or replace the cable.",
    "host.ib_ports": "Fewer InfiniBand ports than this host class has: an HCA is missing (driver not "
    "loaded, firmware, PCIe): check lspci, mst status and dmesg.",
    "host.ib_errors": "The InfiniBand port counts link errors (symbol, receive, recovery, integrity): a "
    "marginal cable or transceiver; check with mlxlink, clean or replace the cable.",
    "host.ib_flap": "The InfiniBand link went down and came back (link_downed increased): jobs using it "
    "may have failed; check the cable, transceiver and switch port for flapping.",
    "host.sxid": "An NVSwitch reported an SXid error (see the SXid tables of NVIDIA's Fabric Manager "
    "User Guide).",
    "host.module": "An expected kernel module is not loaded: GPUs, UVM or GPUDirect RDMA do not work; "
    "load it (modprobe) or reinstall the driver matching the kernel.",
    "host.service": "An expected systemd service is not running: restart it (systemctl restart) and read "
    "its journal (journalctl -u); nvidia-fabricmanager down leaves NVSwitch GPUs unusable.",
    "host.clock": "The clock is off or not synchronised: logs, tokens and distributed jobs disagree on "
    "time; check chrony/ntpd/timesyncd and its servers (chronyc tracking).",
    "host.fs_readonly": "A file system is mounted read-only: jobs cannot write checkpoints or logs; find "
    "why (dmesg: errors forced a remount), fsck and remount it read-write.",
    "host.inodes": "The file system is running out of inodes: file creation fails although space is "
    "left; remove small files (caches, logs) or grow it.",
    "host.dstate": "Processes are stuck in uninterruptible sleep (D state), usually on a hung NFS or "
    "Lustre mount, a failing disk or a stuck driver call; find what they wait on (/proc/<pid>/stack).",
}
