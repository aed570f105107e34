"""Running the Ansible roles from the tests: the environment, the collector's NATS password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COLLECTOR_PASSWORD = "collector-password-for-tests-0123"


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_ROLES_PATH"] = str(ROOT / "ansible" / "roles")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_LOCALHOST_WARNING"] = "0"
    env["ANSIBLE_INVENTORY_UNPARSED_WARNING"] = "0"
    return env


def run_playbook(inventory: str, extra: str, playbook: str) -> None:
    """``ansible-playbook -i inventory -e extra tests/deploy/<playbook>`` from ``ansible/``, as on a
    server; a failed run fails the test with the playbook's output."""
    run = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", inventory, "-e", extra, str(ROOT / "tests/deploy" / playbook)],
        cwd=ROOT / "ansible",
        env=ansible_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
