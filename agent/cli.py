"""``gpuwarden agent ...`` and ``gpuwarden fleet``: build the configuration, call run.

Flags map onto config keys (``--host`` is ``agent.host``, ``--nats`` is ``nats.servers``...);
precedence is flag > ``GPUWARDEN_*`` environment > config file > default. Errors of the
gpuwarden error tree print ``error: <message>`` and exit with their documented code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from shared.config import AgentConfig, load_agent_config
from shared.errors import GpuwardenError
from shared.frames import to_wire
from shared.redact import redact

# rich_markup_mode=None: help text is plain text; rich read "HOST[/gpuN]" as a closing markup tag.
app = typer.Typer(
    help="The GPU host agent.", no_args_is_help=True, add_completion=False, rich_markup_mode=None
)

T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="agent TOML file", dir_okay=False, show_default=False)
]
NatsOpt = Annotated[
    str | None, typer.Option("--nats", help="NATS URL(s), comma-separated", show_default=False)
]
SimulateOpt = Annotated[
    int | None, typer.Option("--simulate", help="simulate this many GPUs instead of NVML", show_default=False)
]
FaultOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--fault", help="simulated fault HOST[/gpuN]:KIND[=VALUE]@AFTER[+DURATION]", show_default=False
    ),
]
LogOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; a gpuwarden error becomes ``error: ...`` on stderr and its exit code."""
    try:
        return fn()
    except GpuwardenError as e:
        typer.echo(f"error: {redact(str(e))}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def servers_flag(nats: str | None) -> list[str] | None:
    return [s.strip() for s in nats.split(",") if s.strip()] if nats else None


def agent_config(config: Path | None, flags: dict[str, Any]) -> AgentConfig:
    return load_agent_config(config, os.environ, {k: v for k, v in flags.items() if v is not None})


@app.command("run")
def run_command(
    config: ConfigOpt = None,
    nats: NatsOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="host name (default: hostname)")] = None,
    provider: Annotated[
        str | None, typer.Option("--provider", help="provider (site, cloud, cluster)")
    ] = None,
    interval: Annotated[
        str | None, typer.Option("--interval", help="sampling interval: 5s, 500ms, 1")
    ] = None,
    simulate: SimulateOpt = None,
    fault: FaultOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Sample GPUs, host and network every interval and publish to NATS until SIGTERM."""
    from agent.service import AgentService

    setup_logging(log_level)

    def go() -> None:
        cfg = agent_config(
            config,
            {
                "agent.host": host,
                "agent.provider": provider,
                "agent.interval": interval,
                "nats.servers": servers_flag(nats),
                "simulate.gpus": simulate,
                "simulate.faults": fault or None,
            },
        )
        if cfg.agent.interval <= 0:
            raise_config("agent.interval", "must be positive")
        asyncio.run(AgentService(cfg).serve())

    guarded(go)


def raise_config(key: str, message: str) -> None:
    from shared.errors import ConfigError

    raise ConfigError(key, message)


@app.command("sample")
def sample_command(
    config: ConfigOpt = None,
    simulate: SimulateOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="host name (default: hostname)")] = None,
    fault: FaultOpt = None,
    log_level: LogOpt = "warning",
) -> None:
    """Print one sample (with the inventory and the fields each GPU supports) as JSON, then exit."""
    setup_logging(log_level)

    def go() -> None:
        cfg = agent_config(
            config, {"agent.host": host, "simulate.gpus": simulate, "simulate.faults": fault or None}
        )
        typer.echo(json.dumps(sample_once(cfg), indent=2, sort_keys=False))

    guarded(go)


def sample_once(cfg: AgentConfig) -> dict[str, Any]:
    """Open the sources once and return inventory, sample and per-GPU field support as plain data."""
    from agent.gpu.auto import make_sources
    from agent.sampler import Sequencer, build_inventory, build_sample

    backend, system = make_sources(cfg)
    backend.open()
    try:
        inv = backend.inventory()
        gpus = backend.sample()
        sys_sample = system.sample()
        facts = system.host_facts()
    finally:
        backend.close()
    seqr = Sequencer(host=cfg.agent.host, provider=cfg.agent.provider)
    inventory = build_inventory(seqr, inv, facts)
    sample = build_sample(seqr, interval_s=cfg.agent.interval, gpus=gpus, system=sys_sample)
    fields: dict[str, dict[str, list[str]]] = {}
    for g in to_wire(sample)["gpus"]:
        info = next((i for i in inv.gpus if i.index == g["index"]), None)
        skip = {"index", "uuid", "lost", "processes"}
        fields[str(g["index"])] = {
            "supported": sorted(k for k, v in g.items() if v is not None and k not in skip),
            "unavailable": sorted(k for k, v in g.items() if v is None),
            "unsupported": sorted(info.unsupported) if info else [],
        }
    return {"inventory": to_wire(inventory), "sample": to_wire(sample), "fields": fields}


def fleet_command(
    hosts: Annotated[int, typer.Option("--hosts", min=1, help="number of simulated hosts")] = 10,
    gpus: Annotated[int, typer.Option("--gpus", min=0, max=64, help="GPUs per host")] = 8,
    providers: Annotated[int, typer.Option("--providers", min=1, help="number of providers")] = 1,
    interval: Annotated[str, typer.Option("--interval", help="sampling interval per host")] = "5s",
    nats: NatsOpt = None,
    fault: FaultOpt = None,
    duration: Annotated[
        str | None, typer.Option("--duration", help="stop after this long (default: until Ctrl-C)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="simulation seed")] = 0,
    config: ConfigOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Many simulated agents in one process, sharing one NATS connection (demo and load)."""
    from agent.fleet import run_fleet
    from shared.config import parse_duration

    setup_logging(log_level)

    def go() -> None:
        cfg = agent_config(config, {"nats.servers": servers_flag(nats)})
        every = parse_duration(interval, "--interval")
        if every <= 0:
            raise_config("--interval", "must be positive")
        limit = parse_duration(duration, "--duration") if duration is not None else None
        summary = asyncio.run(
            run_fleet(
                cfg.nats,
                hosts=hosts,
                gpus=gpus,
                providers=providers,
                interval=every,
                faults=fault or (),
                duration=limit,
                seed=seed,
            )
        )
        typer.echo(json.dumps(summary))

    guarded(go)
