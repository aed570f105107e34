"""``gpuwarden collector``: ``run`` the collector, ``migrate`` the schema, ``forget-host``.

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
from shared.errors import ConfigError, GpuwardenError
from shared.redact import redact

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
    typer.echo(f"error: {redact(str(e))}", err=True)
    return typer.Exit(e.exit_code)


@app.command()
def run(
    config: ConfigOpt = None,
    nats: Annotated[str | None, typer.Option("--nats", help="NATS URL(s), comma separated")] = None,
    dsn: DsnOpt = None,
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT of the HTTP API")] = None,
    group: Annotated[
        bool | None,
        typer.Option(
            "--group/--no-group",
            help="join the collector group (the default unless --partitions > 1); --no-group: run alone",
        ),
    ] = None,
    partitions: Annotated[
        int | None, typer.Option("--partitions", help="static override: number of collectors (no group)")
    ] = None,
    partition: Annotated[
        int | None, typer.Option("--partition", help="static override: this one's index")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Run the collector until SIGTERM or Ctrl-C."""
    from collector.service import CollectorService, tune_gc  # noqa: TID251 (the one place that starts it)

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {
        "nats.servers": [s.strip() for s in nats.split(",")] if nats else None,
        "postgres.dsn": dsn,
        "collector.listen": listen,
        "collector.group": group,
        "collector.partitions": partitions,
        "collector.partition": partition,
    }
    try:
        cfg = _config(flags, config)
        tune_gc()
        service = CollectorService(cfg, api=True)  # the HTTP API, /metrics, dashboard on [collector] listen
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


@app.command("forget-host")
def forget_host(
    host: Annotated[str, typer.Argument(help="the host name, as the agent reports it")],
    config: ConfigOpt = None,
    url: Annotated[
        str | None, typer.Option("--url", help="the collector's API (default: http:// + [collector] listen)")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="API token, or env:NAME, file:/path (default: the first [api] write token)"
        ),
    ] = None,
) -> None:
    """Forget a decommissioned host: its alerts resolve (reason "forgotten"), it leaves the
    fleet and the expected state, its history stays in PostgreSQL. Asks the running collector
    that owns the host (DELETE /api/v1/hosts/HOST). If the host reports again it is a new host."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from shared.config import resolve_secret

    try:
        cfg = _config({}, config)
        if url is None:
            listen_host, _, port = cfg.collector.listen.rpartition(":")
            listen_host = listen_host.strip("[]")
            if listen_host in ("", "0.0.0.0", "::"):  # noqa: S104 (a wildcard: ask over loopback)
                listen_host = "127.0.0.1"
            url = f"http://{listen_host}:{port}"
        secret = resolve_secret(token, "--token") if token else None
        writers = [t for t in cfg.api_tokens if t.write]
        if secret is None and writers:
            secret = writers[0].secret
        if not url.startswith(("http://", "https://")):
            raise ConfigError("--url", f"expected an http:// or https:// URL, got {url!r}")
    except GpuwardenError as e:
        raise _fail(e) from None
    req = urllib.request.Request(  # noqa: S310 (checked above: http or https)
        f"{url.rstrip('/')}/api/v1/hosts/{urllib.parse.quote(host, safe='')}", method="DELETE"
    )
    if secret is not None:
        req.add_header("Authorization", f"Bearer {secret.reveal()}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (the operator's own URL)
            body = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message", e.reason)
        except ValueError:
            message = e.reason
        typer.echo(f"error: {host}: HTTP {e.code}: {message}", err=True)
        raise typer.Exit(1) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        typer.echo(f"error: cannot reach the collector at {url}: {reason}", err=True)
        raise typer.Exit(69) from None
    n = body.get("alerts_resolved", 0)
    typer.echo(f"forgot {host}: {n} alert(s) resolved; its history stays in PostgreSQL")
    if body.get("in_inventory"):
        typer.echo(f"note: the inventory source still lists {host}; it is ignored until the host reports")


if __name__ == "__main__":
    app()
