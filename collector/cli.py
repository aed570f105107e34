"""``gpuwarden collector``: ``run`` the collector, ``migrate`` the schema.

A thin layer: it builds the configuration (flag > env > file > default) and calls the service.
Errors print ``error: ...`` and exit with the error's documented code.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from collector.config import CollectorConfig, load_collector_config
from shared.errors import GpuwardenError

# rich_markup_mode=None: help text is plain text, so "[...]" in it is never read as rich markup.
app = typer.Typer(
    name="collector",
    help="Consume agent frames into PostgreSQL.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="collector.toml")]
DsnOpt = Annotated[str | None, typer.Option("--dsn", help="PostgreSQL DSN (or env:NAME, file:/path)")]


def _config(flags: dict[str, Any], config: Path | None) -> CollectorConfig:
    return load_collector_config(config, flags=flags)


def _fail(e: GpuwardenError) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(e.exit_code)


@app.command()
def run(
    config: ConfigOpt = None,
    nats: Annotated[str | None, typer.Option("--nats", help="NATS URL(s), comma separated")] = None,
    dsn: DsnOpt = None,
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT of the HTTP API")] = None,
    partitions: Annotated[int | None, typer.Option("--partitions", help="number of collectors")] = None,
    partition: Annotated[int | None, typer.Option("--partition", help="this collector's index")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Run the collector until SIGTERM or Ctrl-C."""
    from collector.api import install as install_api
    from collector.service import CollectorService, tune_gc

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {
        "nats.servers": [s.strip() for s in nats.split(",")] if nats else None,
        "postgres.dsn": dsn,
        "collector.listen": listen,
        "collector.partitions": partitions,
        "collector.partition": partition,
    }
    try:
        cfg = _config(flags, config)
        tune_gc()
        service = CollectorService(cfg)
        install_api(service)  # the HTTP API, /metrics and the dashboard on [collector] listen
        asyncio.run(service.serve())
    except GpuwardenError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        pass


@app.command()
def migrate(config: ConfigOpt = None, dsn: DsnOpt = None) -> None:
    """Apply pending schema migrations, then exit."""
    from collector.store import db
    from collector.store import migrate as migrations

    async def go(cfg: CollectorConfig) -> list[int]:
        try:
            conn = await db.connect(cfg.postgres)
        except db.TRANSIENT as e:
            from shared.errors import ServiceUnavailableError

            raise ServiceUnavailableError(f"cannot reach PostgreSQL: {e}") from e
        try:
            return await migrations.migrate(conn)
        finally:
            await conn.close()

    try:
        applied = asyncio.run(go(_config({"postgres.dsn": dsn}, config)))
    except GpuwardenError as e:
        raise _fail(e) from None
    typer.echo(f"applied migrations {applied}" if applied else "schema up to date")


if __name__ == "__main__":
    app()
