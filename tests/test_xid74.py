"""XID 74 (NVLink) details decoded from kernel-log lines, and judged with them."""

from __future__ import annotations

import pytest

from agent.kmsg import parse_xid_line
from collector.health import HealthEngine, HealthState
from shared import xid74
from shared.frames import EventFrame

# Lines as the driver prints them, copied from public sources:
# - NVIDIA NVSentinel, docs on WORKFLOW_NVLINK_ERR (health-events-analyzer), message format example;
# - AWS SageMaker HyperPod workshop, instance-failure emulation (the /var/log/messages line);
# - an older driver that prints the link only (AWS HyperPod health-monitoring-agent example, XID 71 form).
NVSENTINEL = (
    "[449410.332316] NVRM: Xid (PCI:0003:00:00): 74, pid='<unknown>', name=<unknown>, "
    "NVLink: fatal error detected on link 14(0x0, 0x0, 0x10000, 0x0, 0x0, 0x0, 0x0)"
)
HYPERPOD = (
    "NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, name=<unknown>, "
    "NVLink: fatal error detected on link 6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)"
)
LINK_ONLY = (
    "NVRM: Xid (PCI:0000:65:00): 74, pid=<n/a>, name=<unknown>, NVLink: fatal error detected on link 2"
)


@pytest.mark.parametrize(
    ("line", "link", "registers", "first_class", "benign"),
    [
        (NVSENTINEL, 14, (0, 0, 0x10000, 0, 0, 0, 0), xid74.MECHANICAL, False),  # register 3 bit 16
        (HYPERPOD, 6, (0x10000, 0, 0, 0, 0, 0, 0), xid74.MECHANICAL, False),  # register 1 bit 16
        (LINK_ONLY, 2, (), None, False),
    ],
)
def test_decode_real_lines(
    line: str, link: int, registers: tuple[int, ...], first_class: str | None, benign: bool
) -> None:
    ev = parse_xid_line(line, 1.0)
    assert ev is not None
    assert ev.xid == 74
    d = xid74.decode(ev.message)
    assert d is not None
    assert (d.link, d.registers, d.benign) == (link, registers, benign)
    assert (d.classes[0] if d.classes else None) == first_class
    assert f"link {link}" in d.describe()


def test_classes_and_unknown_bits() -> None:
    threshold = xid74.decode("link 3(0x0, 0x0, 0x0, 0x0, 0x100000, 0x0, 0x0)")  # register 5 bit 20
    assert threshold is not None
    assert threshold.classes == (xid74.ECC_THRESHOLD,)
    assert threshold.benign
    fabric = xid74.decode("link 0(0x2, 0x0, 0x0, 0x40000, 0x0, 0x0, 0x0)")  # sympathetic + fabric reset
    assert fabric is not None
    assert fabric.classes == (xid74.FABRIC_RESET, xid74.SYMPATHETIC)
    odd = xid74.decode("link 1(0x8, 0xffff, 0x0, 0x0, 0x0, 0xffff, 0x1)")  # register 1 bit 3 undocumented
    assert odd is not None
    assert odd.unknown_bits == ((0, 3),)  # registers 2, 6, 7 are not analysed
    assert "undocumented" in odd.describe()
    assert not odd.benign
    assert xid74.decode("link 1(0x1, 0x2)") == xid74.Xid74(1, (), (), ())  # not the 7-register form
    assert xid74.decode(None) is None
    assert xid74.decode("Xid 74, pid=1") is None


def judge(message: str | None) -> tuple[str, str, int]:
    engine, state = HealthEngine(), HealthState()
    frame = EventFrame(
        host="n",
        provider="p",
        boot_id="b",
        seq=1,
        ts=1.0,
        type="xid",
        source="kmsg",
        gpu_index=0,
        xid=74,
        message=message,
    )
    state, obs = engine.observe(state, frame, 1.0)
    (o,) = [o for o in obs if o.check == "gpu.xid"]
    return o.status, o.summary, len(state.hosts["n"].gpus[0].fatal_xids)


def test_xid74_alert_names_the_link_and_the_catalogue_action() -> None:
    status, summary, fatal = judge(NVSENTINEL.split("): 74, ", 1)[1])
    assert status == "critical"
    assert "NVLink link 14 (0x0, 0x0, 0x10000" in summary
    assert "reseat" in summary
    assert fatal == 1
    # an ECC threshold only: a warning, and not counted towards the RMA advice
    status, summary, fatal = judge(
        "NVLink: fatal error detected on link 3(0x0, 0x0, 0x0, 0x0, 0x100000, 0x0, 0x0)"
    )
    assert (status, fatal) == ("warning", 0)
    assert "continue" in summary
    # from NVML (no details): as before
    status, summary, fatal = judge(None)
    assert (status, fatal) == ("critical", 1)
    assert "NVLink link" not in summary
