"""``--help`` of every command and subcommand, through the installed console script, as a user runs it.

The command tree is read from the Typer apps (so a new command is covered without editing this
file); each ``--help`` then runs as ``.venv/bin/gpuwarden ... --help`` in a subprocess. Help
text is printed through rich, which reads ``[...]`` as markup: ``HOST[/gpuN]`` once ended in a
``MarkupError`` traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import typer

from collector.cli import app as collector_app
from gpuwarden.cli import app as root_app

ROOT = Path(__file__).resolve().parents[1]


def walk(cmd: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Every command path under ``cmd`` (a click or Typer's vendored click command; duck-typed)."""
    yield path
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        if not getattr(sub, "hidden", False):
            yield from walk(sub, (*path, name))


def command_paths() -> list[tuple[str, ...]]:
    paths = list(walk(typer.main.get_command(root_app), ()))
    paths += list(walk(typer.main.get_command(collector_app), ("collector",)))
    return sorted(set(paths))


def console_script() -> str:
    script = shutil.which("gpuwarden", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.fail("the gpuwarden console script is not installed beside this Python: run `make install`")
    return script


def test_every_command_help_exits_0_without_a_traceback() -> None:
    paths = command_paths()
    named = {("agent", "run"), ("agent", "sample"), ("fleet",), ("collector",), ("demo",)}
    assert named <= set(paths), paths  # the walk found the tree, not an empty list
    script = console_script()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWARDEN_")}
    env["COLUMNS"] = "100"

    def run(path: tuple[str, ...]) -> tuple[tuple[str, ...], subprocess.CompletedProcess[str]]:
        proc = subprocess.run(
            [script, *path, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        return path, proc

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, paths))
    bad = []
    for path, proc in results:
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "Traceback" in out or "Error" in out.split("Usage", 1)[0]:
            bad.append(f"gpuwarden {' '.join(path)} --help: exit {proc.returncode}\n{out[-1500:]}")
        elif "Usage" not in proc.stdout:
            bad.append(f"gpuwarden {' '.join(path)} --help printed no usage:\n{out[-500:]}")
    assert not bad, "\n\n".join(bad)


def test_fault_help_shows_the_host_gpu_syntax_literally() -> None:
    proc = subprocess.run(
        [console_script(), "agent", "run", "--help"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HOST[/gpuN]" in proc.stdout
