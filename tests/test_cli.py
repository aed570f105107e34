"""The real ``gpuwarden`` command in a subprocess: exit codes, messages, SIGTERM, sample JSON, demo."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from shared.frames import decode
from tests.support.cli import ROOT, env, gpuwarden


def run(*args: str, timeout: float = 30, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gpuwarden(*args), cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["agent", "run", "--fault", "bogus"], "error: fault: 'bogus'"),
        (["agent", "run", "--simulate", "2", "--fault", "h/gpu0:melt@1s"], "error: fault: 'h/gpu0:melt@1s'"),
        (["agent", "run", "--interval", "fast"], "error: agent.interval: expected a duration"),
        (["agent", "run", "--simulate", "99"], "error: simulate.gpus: must be at most 64"),
        (["agent", "sample", "--simulate", "2", "--fault", "x:xid@"], "error: fault: 'x:xid@'"),
        (["fleet", "--hosts", "2", "--fault", "nope"], "error: fault: 'nope'"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_file_and_env_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[agent]\ninterval = "5s"\nhostname = "typo"\n')
    r = run("agent", "run", "--config", str(conf))
    assert r.returncode == 2
    assert "error: agent.hostname: unknown key" in r.stderr
    r = run("agent", "run", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2
    assert "config file not found" in r.stderr
    r = run("agent", "run", "--simulate", "1", GPUWARDEN_NATS_BUFFER_FRAMES="lots")
    assert r.returncode == 2
    assert "error: GPUWARDEN_NATS_BUFFER_FRAMES: expected an integer" in r.stderr


def test_sample_prints_inventory_sample_and_field_support() -> None:
    r = run("agent", "sample", "--simulate", "2", "--host", "node-7")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["inventory"]["kind"] == "inventory"
    assert len(out["inventory"]["gpus"]) == 2
    assert out["sample"]["kind"] == "sample"
    assert out["sample"]["host"] == "node-7"
    assert [g["index"] for g in out["sample"]["gpus"]] == [0, 1]
    assert out["sample"]["seq"] == out["inventory"]["seq"] + 1
    assert "temp_c" in out["fields"]["0"]["supported"]
    assert out["sample"]["system"]["cpu_count"] > 0


async def test_sigterm_stops_a_running_agent_cleanly(nats_url: str) -> None:
    host = f"cli-{os.getpid()}-{time.monotonic_ns() % 100000}"
    nc = await nats.connect(nats_url)
    seen: list[str] = []

    sampled = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        seen.append(decode(msg.data).kind)
        if seen[-1] == "sample":
            sampled.set()

    await nc.subscribe(f"gpuwarden.v1.*.*.{host}", cb=on_msg)
    await nc.flush()
    cmd = gpuwarden(
        "agent", "run", "--simulate", "2", "--interval", "0.5", "--nats", nats_url, "--host", host
    )
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, env=env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.wait_for(sampled.wait(), 20)
        proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
        took = time.monotonic() - t
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await nc.close()
    assert proc.returncode == 0, err.decode()
    assert took < 8
    assert seen[0] == "inventory"
    assert "agent stopped" in err.decode()


def test_sample_without_simulation_needs_nvml() -> None:
    r = run("agent", "sample")
    if r.returncode == 0:  # a machine with an NVIDIA driver: a real answer
        assert json.loads(r.stdout)["inventory"]["backend"] == "nvml"
    else:
        assert r.returncode == 3, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: NVML unavailable")


def test_fleet_without_nats_exits_4() -> None:
    r = run(
        "fleet",
        "--hosts",
        "2",
        "--gpus",
        "1",
        "--nats",
        "nats://127.0.0.1:1",
        GPUWARDEN_NATS_CONNECT_TIMEOUT="1s",
        GPUWARDEN_NATS_PUBLISH_TIMEOUT="1s",
    )
    assert r.returncode == 4, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot reach NATS at nats://127.0.0.1:1")
