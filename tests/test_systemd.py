"""The systemd units: `systemd-analyze verify` passes, exposure scores match docs/deployment.md.

`verify` checks that ExecStart= is executable and loads the default dependencies
(sysinit.target...), so it runs with --root on a temporary tree: the host's unit directory,
the two units and a stub /opt/gpuwarden/bin/gpuwarden.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.system_tools import system_tool

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("gpuwarden-agent.service", "gpuwarden-collector.service")


def analyze() -> str:
    """systemd-analyze; the test fails with the install command when it is missing."""
    return system_tool("systemd-analyze")


def host_units() -> Path:
    analyze()  # the unit directory comes with the same package
    return next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())


def make_root(tmp: Path, units: dict[str, str]) -> Path:
    root = tmp / "root"
    shutil.copytree(host_units(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    stub = root / "opt/gpuwarden/bin/gpuwarden"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


def verify(root: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze(), "verify", f"--root={root}", *names],
        capture_output=True,
        text=True,
        check=False,
    )


def exposure(root: Path, name: str) -> float:
    out = subprocess.run(
        [analyze(), "security", "--offline=true", f"--root={root}", f"/etc/systemd/system/{name}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out
    return float(m.group(1))


@pytest.fixture
def units() -> dict[str, str]:
    return {name: (ROOT / "systemd" / name).read_text() for name in UNITS}


def test_units_verify_cleanly(tmp_path: Path, units: dict[str, str]) -> None:
    result = verify(make_root(tmp_path, units), *UNITS)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # not even a warning


def test_verify_catches_a_broken_unit(tmp_path: Path, units: dict[str, str]) -> None:
    units["gpuwarden-agent.service"] = units["gpuwarden-agent.service"].replace(
        "ExecStart=/opt/gpuwarden/bin/gpuwarden", "ExecStart=/opt/gpuwarden/bin/missing"
    )
    result = verify(make_root(tmp_path, units), "gpuwarden-agent.service")
    assert result.returncode != 0
    assert "missing" in result.stderr


def test_verify_warns_on_an_unknown_option(tmp_path: Path, units: dict[str, str]) -> None:
    units["gpuwarden-collector.service"] += "\n[Service]\nProtectEverything=yes\n"
    result = verify(make_root(tmp_path, units), "gpuwarden-collector.service")
    assert "ProtectEverything" in result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_exposure_score_is_low_and_documented(tmp_path: Path, units: dict[str, str], name: str) -> None:
    score = exposure(make_root(tmp_path, units), name)
    assert score <= 2.5  # "OK" on systemd's scale (10 = unprotected root service)
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert f"`{name}` | {score:.1f}" in doc, f"docs/deployment.md must record {name}'s exposure {score:.1f}"


def test_agent_unit_keeps_what_nvml_and_kmsg_need(units: dict[str, str]) -> None:
    agent = units["gpuwarden-agent.service"]
    for line in (
        "Type=notify",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/nvidiactl rw",
        "DeviceAllow=char-nvidia-frontend rw",
        "DeviceAllow=char-nvidia-uvm rw",
        "DeviceAllow=/dev/kmsg r",
        "CapabilityBoundingSet=CAP_SYSLOG",
        "User=gpuwarden",
        "EnvironmentFile=-/etc/default/gpuwarden-agent",
    ):
        assert re.search(rf"^{re.escape(line)}$", agent, re.M), line
    assert not re.search(r"^ProtectKernelLogs=yes", agent, re.M)  # would deny /dev/kmsg
    assert not re.search(r"^PrivateDevices=yes", agent, re.M)  # would hide /dev/nvidia*
    assert not re.search(r"^ProtectClock=yes", agent, re.M)  # would deny read-only adjtimex (clock check)
