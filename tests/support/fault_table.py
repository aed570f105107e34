"""The alert each fault kind gives (rule, severity, subject labels, a word of its advice),
held by the pure engines (test_alerts_faults) and end to end (test_e2e_alerts)."""

from __future__ import annotations

# fault -> (rule, severity, extra labels that name the subject, a word of the advice)
EXPECTED: dict[str, tuple[str, str, dict[str, str], str]] = {
    "temp=95": ("gpu.temperature", "critical", {"gpu": "2"}, "cooling"),
    "ecc_dbe": ("gpu.ecc_dbe", "critical", {"gpu": "2"}, "reset"),
    "ecc_sbe=120": ("gpu.ecc_sbe_rate", "warning", {"gpu": "2"}, "reset"),
    "throttle=hw_slowdown": ("gpu.clock_events", "warning", {"gpu": "2"}, "power"),
    "lost": ("gpu.lost", "critical", {"gpu": "2"}, "reboot"),
    "power=800": ("gpu.power", "warning", {"gpu": "2"}, "power cap"),
    "pcie_replay=120": ("gpu.pcie_replay", "warning", {"gpu": "2"}, "reseat"),
    "nvlink_err": ("gpu.nvlink", "warning", {"gpu": "2"}, "trend"),
    "row_remap_fail": ("gpu.row_remap", "critical", {"gpu": "2"}, "RMA"),
    "mem_full": ("gpu.memory_full", "warning", {"gpu": "2"}, "out-of-memory"),
    "nvlink_down=2": ("gpu.nvlink", "critical", {"gpu": "2"}, "link 16, 17"),
    "pcie_width=8": ("gpu.pcie_link", "warning", {"gpu": "2"}, "reseat"),
    "hbm_temp=100": ("gpu.hbm_temp", "critical", {"gpu": "2"}, "cooling"),
    "fabric=not_started": ("gpu.fabric", "critical", {"gpu": "2"}, "nvidia-fabricmanager"),
    "fabric=in_progress": ("gpu.fabric", "warning", {"gpu": "2"}, "nvidia-fabricmanager"),
    "fabric=failed": ("gpu.fabric", "critical", {"gpu": "2"}, "registration failed"),
    "fabric=degraded": ("gpu.fabric", "warning", {"gpu": "2"}, "degraded bandwidth"),
    "cpu=99": ("host.cpu", "warning", {}, "runaway"),
    "disk_full": ("host.disk", "critical", {"mount": "/"}, "grow"),
    "xid=79": ("gpu.xid", "critical", {"gpu": "2", "xid": "79"}, "reboot"),
    "xid=13": ("gpu.xid", "warning", {"gpu": "2", "xid": "13"}, "restart the application"),
    "xid=74": ("gpu.xid", "critical", {"gpu": "2", "xid": "74"}, "NVLink link 0 (0x0, 0x0, 0x10000"),
    "host_down": ("host.unreachable", "critical", {}, "agent"),
}


# Node faults (issue 14): the system part comes from the agent's simulated DGX-like host
# (agent.system.SimulatedSystem) with the fault applied, so the simulator and the checks meet.
NODE_EXPECTED: dict[str, tuple[str, str, dict[str, str], str]] = {
    "ib_down": ("host.ib_port", "critical", {"port": "mlx5_0/1"}, "cable"),
    "ib_down=5": ("host.ib_port", "critical", {"port": "mlx5_5/1"}, "switch port"),
    "ib_rate=200": ("host.ib_port", "warning", {"port": "mlx5_0/1"}, "expected 400"),
    "ib_errors=600": ("host.ib_errors", "warning", {"port": "mlx5_0/1"}, "cable"),
    "ib_flap": ("host.ib_flap", "warning", {"port": "mlx5_0/1"}, "flapping"),
    "sxid=20034": ("host.sxid", "critical", {"sxid": "20034"}, "reset GPUs and NVSwitches"),
    "sxid=22013": ("host.sxid", "warning", {"sxid": "22013"}, "trend"),
    "sxid=12028": ("host.sxid", "warning", {"sxid": "12028"}, "not in the catalogue"),
    "kmsg=oom_kill": ("host.kmsg", "warning", {"class": "oom_kill"}, "memory limits"),
    "kmsg=mce": ("host.kmsg", "critical", {"class": "mce"}, "rasdaemon"),
    "kmsg=aer_corrected": ("host.kmsg", "warning", {"class": "aer_corrected"}, "reseat"),
    "kmsg=nvme_timeout": ("host.kmsg", "warning", {"class": "nvme_timeout"}, "smart-log"),
    "kmsg=fs_readonly": ("host.kmsg", "critical", {"class": "fs_readonly"}, "checkpoints"),
    "kmsg=peermem": ("host.kmsg", "warning", {"class": "peermem"}, "GPUDirect"),
    "module_missing=nvidia_peermem": ("host.module", "critical", {"module": "nvidia_peermem"}, "modprobe"),
    "service_down=nvidia-fabricmanager": (
        "host.service", "critical", {"service": "nvidia-fabricmanager"}, "journalctl",
    ),
    "service_down=nvidia-persistenced": (
        "host.service", "warning", {"service": "nvidia-persistenced"}, "restart",
    ),
    "clock_skew=2": ("host.clock", "critical", {}, "chrony"),
    "clock_skew=-0.5": ("host.clock", "warning", {}, "chrony"),
    "fs_readonly": ("host.fs_readonly", "critical", {"mount": "/raid"}, "remount"),
    "dstate=3": ("host.dstate", "warning", {}, "D state"),
    "dstate=12": ("host.dstate", "critical", {}, "hung"),
}  # fmt: skip


EXPECTED.update(NODE_EXPECTED)
