"""The ``gpuwarden`` command: ``agent``, ``fleet``, ``collector`` (when installed) and ``demo``."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from typing import Annotated

import typer

from agent.cli import app as agent_app
from agent.cli import fleet_command, guarded, setup_logging
from gpuwarden import __version__

app = typer.Typer(
    help="gpuwarden: GPU fleet health monitor (agent, collector, demo).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help text: "[...]" is never read as rich markup
)
app.add_typer(agent_app, name="agent")
app.command("fleet")(fleet_command)


_COLLECTOR_MODULES = ("asyncpg", "aiohttp", "prometheus_client")  # the [collector] extra


def add_collector(target: typer.Typer) -> None:
    """Register ``gpuwarden collector`` from ``collector.cli`` (or say that it is not installed).

    Imported only when asked for, so an agent never loads the collector's dependencies.
    """
    try:
        absent = [m for m in _COLLECTOR_MODULES if importlib.util.find_spec(m) is None]
        if absent:
            raise ImportError(f"missing {', '.join(absent)}")
        from collector.cli import app as collector_app
    except ImportError as e:
        missing = str(e)

        @target.command(
            "collector", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
        )
        def collector_unavailable() -> None:
            """The central service (needs the collector extras)."""
            typer.echo(
                f"error: the collector is not available ({missing}); "
                "install it with: pip install 'gpuwarden[collector]'",
                err=True,
            )
            raise typer.Exit(1) from None
    else:
        target.add_typer(collector_app, name="collector")


@app.command("version")
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command("demo")
def demo(
    hosts: Annotated[int, typer.Option("--hosts", min=1, help="simulated hosts")] = 60,
    gpus: Annotated[int, typer.Option("--gpus", min=1, max=64, help="GPUs per host")] = 8,
    providers: Annotated[int, typer.Option("--providers", min=1, help="providers")] = 3,
    interval: Annotated[float, typer.Option("--interval", help="seconds between samples")] = 2.0,
    port: Annotated[int, typer.Option("--port", help="dashboard port (0: any free port)")] = 8080,
    duration: Annotated[float | None, typer.Option("--duration", help="stop after seconds")] = None,
) -> None:
    """Embedded NATS and PostgreSQL, the collector with its dashboard, and a simulated fleet
    with scripted faults; prints the dashboard URL and an API token. Ctrl-C stops it all."""
    try:
        from gpuwarden.demo import run_demo
    except ImportError as e:
        typer.echo(f"error: the demo needs the collector ({e}); pip install 'gpuwarden[demo]'", err=True)
        raise typer.Exit(1) from None
    setup_logging("warning")

    def echo(text: str) -> None:
        typer.echo(text)
        sys.stdout.flush()

    guarded(
        lambda: asyncio.run(
            run_demo(
                hosts=hosts,
                gpus=gpus,
                providers=providers,
                interval=interval,
                port=port,
                duration=duration,
                echo=echo,
            )
        )
    )


def main() -> None:
    first = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if first in (None, "collector"):
        add_collector(app)
    app()
