"""A private Slurm for tests and benchmarks: munged, slurmctld and (optionally) slurmd.

Debian's ``munge``, ``slurmctld``, ``slurmd`` and ``slurm-client`` packages (``make test``
installs them). Everything lives in one temporary directory: a private munge key and socket,
a ``slurm.conf`` with free ports, nodes named after simulated hosts (``CPUs=1``), state and
spool directories. ``munged`` runs as the ``munge`` user (it refuses root), ``slurmctld``
and ``slurmd`` as root (they must be started as root here: tests run as root on the CI
machine). Commands reach it with ``SLURM_CONF`` (:attr:`PrivateSlurm.env`).

The controller alone can drain a node; resuming needs the node to answer, so
:meth:`PrivateSlurm.start_slurmd` runs one ``slurmd -N <node>`` for the nodes that must come
back.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from gpuwarden.servers import free_port


class SlurmUnavailable(RuntimeError):
    """Slurm or munge is not installed, or cannot run here (not root)."""


def available() -> str | None:
    """``None`` when a private Slurm can start here, else why not."""
    for cmd in ("munged", "slurmctld", "slurmd", "scontrol", "sinfo"):
        if shutil.which(cmd) is None and not Path("/usr/sbin", cmd).exists():
            return f"{cmd} not installed (apt-get install munge slurmctld slurmd slurm-client)"
    if os.geteuid() != 0:
        return "a private slurmctld must be started as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user (the munge package creates it)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class PrivateSlurm:
    def __init__(self, nodes: Sequence[str], cluster: str = "gpuwarden") -> None:
        self.nodes = list(nodes)
        self.cluster = cluster
        self.dir = Path(tempfile.mkdtemp(prefix="gw-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.socket = self.dir / "munge.socket"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.slurmds: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PrivateSlurm:
        why = available()
        if why is not None:
            raise SlurmUnavailable(why)
        try:
            self._start_munge(timeout)
            self._write_conf()
            self._start_ctld(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self, timeout: float) -> None:
        munge = pwd.getpwnam("munge")
        Path("/run/munge").mkdir(exist_ok=True)  # munged checks its default dirs exist
        os.chown("/run/munge", munge.pw_uid, munge.pw_gid)
        mdir = self.dir / "munge"
        mdir.mkdir(mode=0o700)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (self.dir, mdir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        self.dir.chmod(0o755)
        with open(mdir / "munged.out", "wb") as log:  # the child keeps its own descriptor
            self._spawn(
                [
                    _exe("munged"),
                    "--foreground",
                    "--force",
                    f"--key-file={key}",
                    f"--socket={self.socket}",
                    f"--pid-file={mdir / 'munged.pid'}",
                    f"--log-file={mdir / 'munged.log'}",
                    f"--seed-file={mdir / 'munged.seed'}",
                ],
                log,
                user=munge.pw_uid,
                group=munge.pw_gid,
            )
        self._wait(lambda: self.socket.exists(), timeout, "munged socket", mdir / "munged.out")

    def _write_conf(self) -> None:
        (self.dir / "state").mkdir()
        (self.dir / "spool").mkdir()
        self.ctld_port, self.d_port = free_port(), free_port()
        ports: set[int] = {self.ctld_port, self.d_port}
        self.node_ports: dict[str, int] = {}
        for n in self.nodes:  # each node its own free port: its slurmd listens there
            p = free_port()
            while p in ports:
                p = free_port()
            ports.add(p)
            self.node_ports[n] = p
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.node_ports[n]} "
            "CPUs=1 RealMemory=100 State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(
            f"""ClusterName={self.cluster}
SlurmctldHost=localhost
SlurmctldPort={self.ctld_port}
SlurmdPort={self.d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={self.dir / "state"}
SlurmdSpoolDir={self.dir / "spool"}/%n
SlurmctldPidFile={self.dir / "slurmctld.pid"}
SlurmdPidFile={self.dir / "slurmd-%n.pid"}
SlurmctldLogFile={self.dir / "slurmctld.log"}
SlurmdLogFile={self.dir / "slurmd-%n.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/linear
ReturnToService=0
SlurmdTimeout=300
SlurmctldTimeout=30
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_ctld(self, timeout: float) -> None:
        with open(self.dir / "slurmctld.out", "wb") as out:
            self._spawn([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], out, env=self.env)
        self._wait(self._ping, timeout, "slurmctld", self.dir / "slurmctld.log")

    def start_slurmd(self, node: str, timeout: float = 30.0) -> None:
        """Run ``slurmd -N node`` and wait until the controller sees the node respond."""
        if node not in self.nodes:
            raise ValueError(f"{node} is not a node of this Slurm")
        (self.dir / "spool" / node).mkdir(exist_ok=True)
        with open(self.dir / f"slurmd-{node}.out", "wb") as out:
            self.slurmds[node] = self._spawn(
                [_exe("slurmd"), "-D", "-N", node, "-f", str(self.conf)], out, env=self.env
            )
        self._wait(
            lambda: "NOT_RESPONDING" not in self.state(node) and "UNKNOWN" not in self.state(node),
            timeout,
            f"slurmd {node}",
            self.dir / f"slurmd-{node}.out",
        )

    def _spawn(self, argv: list[str], out: IO[bytes], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries ---------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(
            [_exe(args[0]), *args[1:]], env=self.env, capture_output=True, text=True, timeout=30
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def node(self, node: str) -> dict[str, str]:
        """``scontrol show node -o``'s fields (State, Reason, ...)."""
        line = self.run("scontrol", "-o", "show", "node", node)
        out: dict[str, str] = {}
        key = ""
        for tok in line.strip().split(" "):
            if "=" in tok:
                key, _, v = tok.partition("=")
                out[key] = v
            elif key:  # a value with spaces (Reason=gpuwarden: rule id)
                out[key] += " " + tok
        return out

    def state(self, node: str) -> str:
        return self.node(node).get("State", "")

    def reasons(self) -> dict[str, str]:
        """``sinfo -R``: node -> reason of every down or drained node."""
        out: dict[str, str] = {}
        for line in self.run("sinfo", "-R", "-h", "-N", "-o", "%N|%E").splitlines():
            node, _, reason = line.partition("|")
            if node:
                out[node.strip()] = reason.strip()
        return out

    def drain(self, node: str, reason: str) -> None:
        """What an operator does: ``scontrol update ... State=DRAIN Reason=...``."""
        self.run("scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}")

    def _ping(self) -> bool:
        r = subprocess.run(
            [_exe("scontrol"), "ping"], env=self.env, capture_output=True, text=True, timeout=10
        )
        return r.returncode == 0 and "UP" in r.stdout

    def _wait(self, cond: object, timeout: float, what: str, log: Path) -> None:
        assert callable(cond)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                if cond():
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise SlurmUnavailable(f"{what} did not start within {timeout} s: {tail}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
