"""An agent-only install (no collector extras) answers `gpuwarden collector` with how to install it."""

from __future__ import annotations

import importlib.util

import pytest
import typer
from typer.testing import CliRunner

from gpuwarden import cli


def test_collector_without_its_extras_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "asyncpg" else real(name, *a)
    )
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Test root."""

    cli.add_collector(app)
    result = CliRunner().invoke(app, ["collector", "run", "--dsn", "x"])
    assert result.exit_code == 1
    assert "missing asyncpg" in result.output
    assert "pip install 'gpuwarden[collector]'" in result.output


def test_collector_with_its_extras_is_the_real_sub_app() -> None:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Test root."""

    cli.add_collector(app)
    result = CliRunner().invoke(app, ["collector", "--help"])
    assert result.exit_code == 0
    assert "migrate" in result.output
