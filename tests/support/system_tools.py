"""Debian tools some tests drive (Prometheus, Alertmanager, Chromium, systemd-analyze).

Tests never install anything: ``make system-deps`` (run by ``make test`` and so by ``.ci/run``)
installs the Debian packages. A test whose tool is missing fails and says how to install it.
"""

from __future__ import annotations

import shutil

import pytest

# binary -> Debian package; the Makefile's SYSTEM_PACKAGES lists the same packages.
PACKAGES = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "chromium": "chromium",
    "systemd-analyze": "systemd",
}


def system_tool(binary: str) -> str:
    """The path of ``binary``; the test fails with the install command when it is missing."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.fail(
            f"{binary} not found: run `make system-deps` (as root: apt-get install {PACKAGES[binary]})"
        )
    return found
