"""``gpuwarden demo`` in a subprocess: it prints the dashboard URL and a token, the API serves
the simulated fleet's 3 providers, Ctrl-C (SIGINT) stops it and leaves no process behind, and
it starts again right after."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request

import psutil

from tests.support.cli import ROOT, env, gpuwarden
from tests.support.wait import until_blocking


def providers(url: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{url}api/v1/providers", timeout=2) as r:  # noqa: S310 (local)
            return [p["name"] for p in json.load(r)["items"]]
    except OSError:
        return []


def run_once() -> tuple[str, list[str]]:
    proc = subprocess.Popen(
        gpuwarden("demo", "--port", "0", "--hosts", "12", "--interval", "1"),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children: list[psutil.Process] = []
    lines: list[str] = []
    url = token = None
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and token is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.match(r"\s+dashboard\s+(http://\S+/)", line):
                url = m.group(1)
            if m := re.match(r"\s+API token\s+(\S+)", line):
                token = m.group(1)
        assert url is not None, "".join(lines)
        assert token is not None
        assert len(token) >= 24
        children = psutil.Process(proc.pid).children(recursive=True)

        def all_providers() -> bool:
            nonlocal seen
            seen = providers(url)
            return len(seen) >= 3

        until_blocking(all_providers, max(1.0, deadline - time.monotonic()), "the three providers served")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        survivors = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for c in survivors:  # only if the demo failed to clean up; asserted below
            c.kill()
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == "demo: stopped"
    assert len(children) >= 2, "the demo runs its own nats-server and PostgreSQL"
    assert survivors == []
    return url, seen


def test_demo_serves_the_fleet_stops_cleanly_and_starts_again() -> None:
    _, first = run_once()
    assert first == ["provider-0", "provider-1", "provider-2"]
    _, second = run_once()
    assert second == first
