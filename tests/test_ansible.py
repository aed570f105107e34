"""The Ansible playbook: lint, syntax, a real apply to this machine (twice), then services.

The apply runs `site.yml` with `-c local` on an inventory whose only host, localhost, is in
both groups, with the secrets in a real Ansible Vault file and
`gpuwarden_manage_services: false` (systemd is not PID 1 here). PostgreSQL is a private
server (the role edits its pg_hba.conf); NATS and the services are then started by the test
from the rendered files, as the users the units would use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext

from gpuwarden.servers import PostgresServer, free_port, wait_port
from shared.subjects import STREAM
from tests.support.wait import reached, until

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
TARGET_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
PROVIDER = "test-prov"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["ANSIBLE_NOCOLOR"] = "1"
    e["ANSIBLE_FORCE_COLOR"] = "0"
    e["ANSIBLE_LOCALHOST_WARNING"] = "0"
    e["ANSIBLE_DEPRECATION_WARNINGS"] = "0"
    return e


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ANSIBLE, env=env(), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload, no-any-return]


def test_ansible_lint_production_profile() -> None:
    result = run([str(BIN / "ansible-lint"), "--offline", "--profile", "production", "--nocolor"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_syntax_check() -> None:
    result = run([str(BIN / "ansible-playbook"), "--syntax-check", "site.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("group", [None, True, False], ids=["default", "group", "static"])
def test_collector_role_deploys_group_members_behind_one_configuration(
    tmp_path: Path, group: bool | None
) -> None:
    """``gpuwarden_collector_group`` (true when unset): every central host gets the same
    configuration, a group member's (no partition); false: one static partition each."""
    from collector.config import load_collector_config  # noqa: PLC0415 (collector only here)
    from tests.support.roles import run_playbook  # noqa: PLC0415

    hosts = {
        f"c{i}": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        for i in range(3)
    }
    (tmp_path / "inventory.json").write_text(json.dumps({"all": {"children": {"central": {"hosts": hosts}}}}))
    extra = tmp_path / "vars.json"
    servers = [f"tls://n{i}:4222" for i in range(3)]
    # static: as many partitions as central hosts, by default
    settings = {} if group is None else {"gpuwarden_collector_group": group}
    extra.write_text(json.dumps({"out_dir": str(tmp_path), "gpuwarden_nats_servers": servers, **settings}))
    run_playbook(str(tmp_path / "inventory.json"), f"@{extra}", "render_collector.yml")
    rendered = [(tmp_path / f"c{i}.toml").read_text() for i in range(3)]
    # the secrets the role installs in /etc/gpuwarden, made here (the test must not lean on an
    # earlier apply to this machine having left them there)
    secrets = tmp_path / "etc"
    secrets.mkdir()
    (secrets / "collector-nats.pass").write_text("nats-secret\n")
    (secrets / "collector-postgres.dsn").write_text("postgresql://gpuwarden@db.example/gpuwarden\n")
    for i in range(8):
        (secrets / f"api-token-{i}").write_text(f"token-{i}-0123456789abcdef\n")
    configs = []
    for i, text in enumerate(rendered):
        local = tmp_path / f"c{i}.local.toml"
        local.write_text(text.replace("file:/etc/gpuwarden/", f"file:{secrets}/"))
        configs.append(load_collector_config(local, env={}).collector)
    if group is not False:
        assert rendered[0] == rendered[1] == rendered[2]
        assert all(c.group and c.partitions == 1 for c in configs)
    else:
        assert [(c.group, c.partitions, c.partition) for c in configs] == [(False, 3, i) for i in range(3)]


def test_roles_have_the_standard_layout() -> None:
    for role in ("gpuwarden_agent", "gpuwarden_collector", "nats", "postgresql"):
        for part in (
            "tasks/main.yml",
            "handlers/main.yml",
            "defaults/main.yml",
            "meta/main.yml",
            "README.md",
        ):
            assert (ANSIBLE / "roles" / role / part).is_file(), f"{role}/{part}"
        assert list((ANSIBLE / "roles" / role / "templates").glob("*.j2")), role


# ----------------------------------------------------------------------------- real apply


@dataclass
class Applied:
    runs: list[subprocess.CompletedProcess[str]]
    nats_port: int
    api_port: int
    pg: PostgresServer


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    m = re.search(r"^localhost\s*:\s*(.*)$", result.stdout, re.M)
    assert m, result.stdout[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def write_inventory(d: Path, nats_port: int, api_port: int, pg: PostgresServer) -> list[str]:
    inv = d / "inventory"
    (inv / "group_vars" / "all").mkdir(parents=True)
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": TARGET_PYTHON,
        "ansible_become": False,
    }
    (inv / "hosts.yml").write_text(
        json.dumps(
            {
                "all": {
                    "children": {
                        "central": {"hosts": {"localhost": host}},
                        "gpu_nodes": {"hosts": {"localhost": host}, "vars": {"gpuwarden_provider": PROVIDER}},
                    }
                }
            }
        )
    )
    example = (ANSIBLE / "inventory" / "example" / "group_vars" / "all" / "vars.yml").read_text()
    overrides = {
        "gpuwarden_nats_servers": [f"tls://127.0.0.1:{nats_port}"],
        "gpuwarden_pki_dir": str(d / "pki"),
        "gpuwarden_manage_services": False,
        "gpuwarden_db_host": "127.0.0.1",
        "gpuwarden_db_port": pg.port,
        "gpuwarden_common_wheelhouse": str(d / "wheelhouse"),
        "gpuwarden_common_python": TARGET_PYTHON,
        "nats_port": nats_port,
        "nats_monitor_port": 0,
        "postgresql_admin_host": "127.0.0.1",
        "postgresql_admin_port": pg.port,
        "postgresql_hba_file": str(pg.datadir / "pg_hba.conf"),
        "gpuwarden_agent_simulate_gpus": 2,
        "gpuwarden_agent_interval": "1s",
        "gpuwarden_collector_listen": f"127.0.0.1:{api_port}",
    }
    vars_yml = (
        example + "\n# test overrides\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in overrides.items())
    )
    (inv / "group_vars" / "all" / "vars.yml").write_text(vars_yml)
    vault = inv / "group_vars" / "all" / "vault.yml"
    vault.write_text(
        json.dumps(
            {
                "vault_gpuwarden_nats_agent_secret": "test-agent-secret-0123456789abcdef",
                "vault_gpuwarden_nats_collector_password": "test-collector-pw-0123456789",
                "vault_gpuwarden_db_password": "test-db-pw-'quoted'-0123456789",
                "vault_gpuwarden_api_tokens": ["test-api-token-0123456789abcdefgh"],
            }
        )
    )
    password = d / "vault-password"
    password.write_text("vault-password-for-tests\n")
    password.chmod(0o600)
    enc = run([str(BIN / "ansible-vault"), "encrypt", "--vault-password-file", str(password), str(vault)])
    assert enc.returncode == 0, enc.stderr
    assert vault.read_text().startswith("$ANSIBLE_VAULT;")
    return ["-i", str(inv / "hosts.yml"), "--vault-password-file", str(password)]


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Applied]:
    if os.geteuid() != 0:
        pytest.fail("the playbook test applies site.yml to this machine and must run as root")
    d = tmp_path_factory.mktemp("ansible-apply")
    nats_port, api_port = free_port(), free_port()
    with PostgresServer() as pg:
        args = write_inventory(d, nats_port, api_port, pg)
        runs = [run([str(BIN / "ansible-playbook"), *args, "site.yml"], timeout=600) for _ in range(2)]
        runs.append(run([str(BIN / "ansible-playbook"), *args, "--check", "--diff", "site.yml"], timeout=600))
        yield Applied(runs=runs, nats_port=nats_port, api_port=api_port, pg=pg)


@pytest.mark.slow
# the module's two applies and its check run in this test's setup: ~300 s alone on 2 cores, past
# 480 s beside the rest of the suite
@pytest.mark.timeout(1200)
def test_first_apply_succeeds(applied: Applied) -> None:
    first = applied.runs[0]
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
    counts = recap(first)
    assert counts["failed"] == 0
    assert counts["unreachable"] == 0
    assert counts["changed"] > 0


def test_second_apply_changes_nothing(applied: Applied) -> None:
    second = applied.runs[1]
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-2000:]
    changed = [line for line in second.stdout.splitlines() if line.startswith("changed:")]
    assert recap(second)["changed"] == 0, changed


def test_check_mode_runs_and_reports_no_change(applied: Applied) -> None:
    check = applied.runs[2]
    assert check.returncode == 0, check.stdout[-6000:] + check.stderr[-2000:]
    counts = recap(check)
    assert counts["failed"] == 0
    # pip with a requirements file always reports a change in check mode (it cannot tell)
    changed = [line for line in check.stdout.splitlines() if line.startswith("changed:")]
    assert counts["changed"] <= 2, changed


def test_no_secret_in_a_world_readable_file(applied: Applied) -> None:
    secrets = ("test-collector-pw", "test-db-pw", "test-api-token")
    for folder in (Path("/etc/gpuwarden"), Path("/etc/nats-gpuwarden"), Path("/etc/default")):
        for path in folder.rglob("*") if folder.name != "default" else folder.glob("gpuwarden-*"):
            if path.is_file() and path.stat().st_mode & 0o004:
                text = path.read_text(errors="replace")
                assert not any(s in text for s in secrets), path
    assert Path("/etc/gpuwarden/agent-nats.pass").stat().st_mode & 0o777 == 0o640
    for out in applied.runs:
        assert not any(s in out.stdout for s in secrets)


def test_units_and_files_are_installed(applied: Applied) -> None:
    for unit in ("gpuwarden-agent.service", "gpuwarden-collector.service"):
        assert Path("/etc/systemd/system", unit).read_text() == (ROOT / "systemd" / unit).read_text()
    assert Path("/etc/systemd/system/nats-gpuwarden.service").is_file()
    out = subprocess.run(
        ["/opt/gpuwarden/bin/python", "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(out.stdout)}
    assert {"gpuwarden", "nats-py", "asyncpg", "psutil", "nvidia-ml-py"} <= names


# ----------------------------------------------------------------------------- services


# What systemd gives a service of a system user: no inherited environment, HOME from passwd.
UNIT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}


def spawn(cmd: list[str], user: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            user=user,
            group=user,
            extra_groups=[],
            env=UNIT_ENV | {"USER": user, "LOGNAME": user},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def collector_js(port: int, password: str) -> AsyncIterator[JetStreamContext]:
    """JetStream on the installed NATS server, as the collector's user."""
    nc = await nats.connect(
        servers=[f"tls://127.0.0.1:{port}"],
        user="collector",
        password=password,
        tls=ssl.create_default_context(cafile="/etc/gpuwarden/ca.pem"),
        allow_reconnect=False,
        max_reconnect_attempts=0,
    )
    try:
        yield nc.jetstream(timeout=5)
    finally:
        await nc.close()


async def has_stream(js: JetStreamContext) -> bool:
    try:
        await js.stream_info(STREAM)
    except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):  # (JetStream starting)
        return False
    return True


async def progress(js: JetStreamContext) -> tuple[int, int, int]:
    """(frames of our host in the stream, the stream's last sequence, highest stream sequence
    a collector consumer acked). The JetStream store outlives a test run, so the caller
    compares with a baseline."""
    # (a group member's stream stores frames under their bucket: ``...localhost.<bucket>``)
    info = await js.stream_info(STREAM, subjects_filter=f"gpuwarden.v1.*.{PROVIDER}.>")
    stored = sum((info.state.subjects or {}).values())
    consumers = await js.consumers_info(STREAM)
    acked = max((c.ack_floor.stream_seq for c in consumers if c.ack_floor), default=0)
    return stored, int(info.state.last_seq), acked


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_installed_agent_and_collector_exchange_frames(applied: Applied, tmp_path: Path) -> None:
    assert recap(applied.runs[0])["failed"] == 0
    logs = {name: tmp_path / f"{name}.log" for name in ("nats", "collector", "agent")}
    nats_proc = spawn(
        ["/usr/local/lib/nats-gpuwarden/nats-server", "-c", "/etc/nats-gpuwarden/nats.conf"],
        "gpuwarden-nats",
        logs["nats"],
    )
    procs = [nats_proc]
    try:
        await asyncio.to_thread(wait_port, "127.0.0.1", applied.nats_port, 15, nats_proc)
        gw = "/opt/gpuwarden/bin/gpuwarden"
        procs.append(
            spawn(
                [gw, "collector", "run", "--config", "/etc/gpuwarden/collector.toml"],
                "gpuwarden",
                logs["collector"],
            )
        )
        password = (await asyncio.to_thread(Path("/etc/gpuwarden/collector-nats.pass").read_text)).strip()
        async with collector_js(applied.nats_port, password) as js:

            async def stream_created() -> bool:  # the collector creates it; agents may only look it up
                assert procs[1].poll() is None, logs["collector"].read_text()[-3000:]
                return await has_stream(js)

            await until(stream_created, timeout=60, what="the collector's stream")
            base_stored, base_last, _ = await progress(js)
            procs.append(
                spawn(
                    [gw, "agent", "run", "--config", "/etc/gpuwarden/agent.toml"], "gpuwarden", logs["agent"]
                )
            )
            want = (base_stored + 3, base_last + 3)  # frames newer than any before
            stored = acked = 0

            async def exchanged() -> bool:
                nonlocal stored, acked
                stored, _, acked = await progress(js)
                return stored >= want[0] and acked >= want[1]

            await reached(exchanged, 60)
            seen = stored

            async def one_more() -> bool:  # one more tick, so that SIGTERM meets a running agent
                return (await progress(js))[0] > seen

            await reached(one_more, 30)
        for p in procs[1:]:
            assert p.poll() is None, {k: v.read_text()[-3000:] for k, v in logs.items()}
        assert stored >= want[0], {k: v.read_text()[-3000:] for k, v in logs.items()}
        assert acked >= want[1], {k: v.read_text()[-3000:] for k, v in logs.items()}
    finally:
        for p in reversed(procs):
            await asyncio.to_thread(stop, p)
    assert procs[2].returncode == 0, logs["agent"].read_text()[-3000:]  # clean stop on SIGTERM
    shutil.rmtree(tmp_path, ignore_errors=True)
