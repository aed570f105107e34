"""Machine-readable actions: what an observation or alert asks someone (or something) to do.

Every check id has an ``action`` (one of :data:`ACTIONS`) in :data:`CHECK_ACTIONS`; checks
whose subject names its own cause take the action from it: ``gpu.xid`` from the XID
catalogue (``shared/xid_catalog.csv``, its ``action`` and ``fatal`` columns, see
:func:`xid_action`), ``host.sxid`` from the SXid catalogue, ``gpu.recovery_action`` from the
recovery code NVML reports. Remediation rules (``[[remediation.rule]]``) match on it; the
API, the webhook, Alertmanager and NATS messages carry it. Documented in docs/health.md
("Actions").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from shared import sxid, xid

NONE: Final = "none"
ACTIONS: Final = (
    "none",
    "check_application",
    "restart_job",
    "reset_gpu",
    "reboot",
    "drain_and_reset_gpu",
    "drain_and_reboot",
    "hardware_inspection",
    "check_cooling",
    "check_power",
    "check_network",
    "check_software",
    "check_host",
)

# The check table's action column: one per check id (a check missing here is a bug, tested).
CHECK_ACTIONS: Final[Mapping[str, str]] = {
    "gpu.temperature": "check_cooling",
    "gpu.hbm_temp": "check_cooling",
    "gpu.fan": "check_cooling",
    "gpu.xid": "check_application",  # refined per code: xid_action
    "gpu.rma": "hardware_inspection",
    "gpu.ecc_dbe": "drain_and_reset_gpu",
    "gpu.ecc_sbe_rate": "hardware_inspection",
    "gpu.retired_pages": "drain_and_reset_gpu",
    "gpu.row_remap": "drain_and_reset_gpu",
    "gpu.clock_events": "check_cooling",
    "gpu.pcie_replay": "hardware_inspection",
    "gpu.pcie_link": "hardware_inspection",
    "gpu.nvlink": "drain_and_reset_gpu",
    "gpu.power": "check_power",
    "gpu.memory_full": "check_application",
    "gpu.recovery_action": "drain_and_reset_gpu",  # refined per code: recovery_action
    "gpu.persistence": "check_software",
    "gpu.memory_trend": "hardware_inspection",
    "gpu.sm_clock": "check_cooling",
    "gpu.fabric": "check_software",
    "gpu.lost": "drain_and_reboot",
    "gpu.stale": "check_host",
    "host.cpu": "check_application",
    "host.memory": "check_application",
    "host.swap": "check_application",
    "host.disk": "check_host",
    "host.load": "check_application",
    "host.fds": "check_application",
    "host.nic": "check_network",
    "net.target": "check_network",
    "host.unreachable": "check_host",
    "host.clock_skew": "check_software",
    "host.clock": "check_software",
    "host.driver_drift": "check_software",
    "host.gpu_missing": "drain_and_reboot",
    "host.gpu_driver": "drain_and_reboot",
    "host.ib_port": "check_network",
    "host.ib_ports": "check_network",
    "host.ib_errors": "check_network",
    "host.ib_flap": "check_network",
    "host.sxid": "drain_and_reset_gpu",  # refined per code: sxid_action
    "host.kmsg": "check_host",
    "host.module": "check_software",
    "host.service": "check_software",
    "host.fs_readonly": "check_host",
    "host.inodes": "check_host",
    "host.dstate": "check_host",
    "provider.incident": "check_network",
    "remediation.breaker": NONE,
    "collector.pipeline": "check_software",  # the collector's own (collector/selfcheck.py)
    "collector.notify": "check_software",
}

# XID catalogue action (NVIDIA's resolution bucket, condensed) -> action; fatal codes ask
# for the node to be drained first.
_XID: Final[Mapping[tuple[str, bool], str]] = {
    ("ignore", False): NONE,
    ("ignore", True): NONE,
    ("restart_app", False): "restart_job",
    ("restart_app", True): "restart_job",
    ("reset_gpu", False): "reset_gpu",
    ("reset_gpu", True): "drain_and_reset_gpu",
    ("reboot", False): "reboot",
    ("reboot", True): "drain_and_reboot",
    ("contact_support", False): "hardware_inspection",
    ("contact_support", True): "hardware_inspection",
    ("follow_linked", False): NONE,  # gpu.recovery_action carries what to do
    ("follow_linked", True): NONE,
}
# NVIDIA buckets that name a more precise action than their catalogue action.
_XID_BUCKET: Final[Mapping[str, str]] = {"CHECK_MECHANICALS": "check_power"}
_SXID: Final[Mapping[str, str]] = {
    "monitor": NONE,
    "reset_fabric": "drain_and_reset_gpu",
    "reboot": "drain_and_reboot",
}
# NVML recovery action codes (gpu.recovery_action's value).
_RECOVERY: Final[Mapping[int, str]] = {
    0: NONE,
    1: "drain_and_reset_gpu",  # GPU_RESET
    2: "drain_and_reboot",  # NODE_REBOOT
    3: "drain_and_reset_gpu",  # DRAIN_P2P
    4: "drain_and_reset_gpu",  # DRAIN_AND_RESET
    5: "check_network",  # RECOVER_IMEX_DOMAIN
    6: "drain_and_reset_gpu",  # BUS_RESET
    7: "drain_and_reboot",  # SYSTEM_REBOOT
}


def xid_action(code: int) -> str:
    """The action of XID ``code``, derived from its catalogue row (``action``, ``fatal``,
    ``nvidia_bucket``)."""
    info = xid.lookup(code)
    return _XID_BUCKET.get(info.nvidia_bucket) or _XID.get((info.action, info.fatal), "hardware_inspection")


def sxid_action(code: int) -> str:
    return _SXID.get(sxid.lookup(code).action, "drain_and_reset_gpu")


def recovery_action(code: float | None) -> str:
    if code is None:
        return CHECK_ACTIONS["gpu.recovery_action"]
    return _RECOVERY.get(int(code), "drain_and_reset_gpu")


def action_for(
    check: str, labels: Mapping[str, str], value: float | None = None, healthy: bool = False
) -> str:
    """The action of ``check`` on the subject named by ``labels`` (``none`` when healthy)."""
    if healthy:
        return NONE
    if check == "gpu.xid":
        code = labels.get("xid", "")
        return xid_action(int(code)) if code.isdigit() else CHECK_ACTIONS[check]
    if check == "host.sxid":
        code = labels.get("sxid", "")
        return sxid_action(int(code)) if code.isdigit() else CHECK_ACTIONS[check]
    if check == "gpu.recovery_action":
        return recovery_action(value)
    return CHECK_ACTIONS.get(check, "check_host")
