"""The ``gpuwarden`` command: ``agent``, ``fleet``, ``collector`` (when installed) and ``demo``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
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
)
app.add_typer(agent_app, name="agent")
app.command("fleet")(fleet_command)


def add_collector(target: typer.Typer) -> None:
    """Register ``gpuwarden collector`` from ``collector.cli`` (or say that it is not installed).

    Imported only when asked for, so an agent never loads the collector's dependencies.
    """
    try:
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


DEMO_FAULTS = (
    "host-0001/gpu2:xid=79@8s",
    "host-0002/gpu0:temp=94@5s+40s",
    "host-0003:host_down@15s+20s",
    "host-0000/gpu1:ecc_dbe@20s",
)


@app.command("demo")
def demo(
    hosts: Annotated[int, typer.Option("--hosts", min=1, help="simulated hosts")] = 4,
    gpus: Annotated[int, typer.Option("--gpus", min=1, max=64, help="GPUs per host")] = 4,
    interval: Annotated[float, typer.Option("--interval", help="seconds between samples")] = 2.0,
    duration: Annotated[float | None, typer.Option("--duration", help="stop after seconds")] = None,
) -> None:
    """Embedded NATS and a small simulated fleet with faults; prints each frame. Ctrl-C stops all."""
    setup_logging("warning")
    guarded(lambda: asyncio.run(_demo(hosts, gpus, interval, duration)))


async def _demo(hosts: int, gpus: int, interval: float, duration: float | None) -> None:
    import nats
    from nats.aio.msg import Msg

    from agent.fleet import Fleet
    from gpuwarden.servers import NatsServer
    from shared.config import NatsConfig
    from shared.errors import FrameDecodeError
    from shared.frames import EventFrame, InventoryFrame, SampleFrame, decode

    def line(msg: Msg) -> str:
        try:
            f = decode(msg.data)
        except FrameDecodeError as e:
            return f"{msg.subject}: undecodable frame: {e}"
        head = f"{f.kind:9} {f.provider}/{f.host} seq={f.seq:<4}"
        if isinstance(f, SampleFrame):
            temps = " ".join(f"{g.temp_c:.0f}" if g.temp_c is not None else "-" for g in f.gpus)
            return f"{head} gpus={len(f.gpus)} temp_c=[{temps}]"
        if isinstance(f, EventFrame):
            return f"{head} {f.type} gpu={f.gpu_index} xid={f.xid} count={f.count}"
        if isinstance(f, InventoryFrame):
            return f"{head} {len(f.gpus)} x {f.gpus[0].name if f.gpus else '-'} driver {f.driver_version}"
        return head

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = NatsServer()
    await asyncio.to_thread(server.start)
    fleet: Fleet | None = None
    tap = None
    try:
        typer.echo(f"demo: nats-server at {server.url}; {hosts} hosts x {gpus} GPUs every {interval:g}s")
        typer.echo(f"demo: faults {', '.join(DEMO_FAULTS)}; Ctrl-C to stop")

        async def show(msg: Msg) -> None:
            typer.echo(line(msg))

        tap = await nats.connect(server.url)
        await tap.subscribe("gpuwarden.v1.>", cb=show)
        fleet = Fleet(
            NatsConfig(servers=(server.url,)), hosts=hosts, gpus=gpus, interval=interval, faults=DEMO_FAULTS
        )
        await fleet.start()
        run = asyncio.create_task(fleet.run(duration))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
        fleet.stop()
        waiter.cancel()
        await run
    finally:
        if fleet is not None:
            await fleet.close(flush_timeout=2.0)
        if tap is not None:
            with contextlib.suppress(nats.errors.Error):
                await tap.close()
        await asyncio.to_thread(server.close)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        logging.getLogger(__name__).info("demo stopped")
        typer.echo("demo: stopped")


def main() -> None:
    first = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if first in (None, "collector"):
        add_collector(app)
    app()
