"""Helpers for the benchmarks: the gpuwarden command, stream counts, percentiles, a webhook, a collector."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]


def gpuwarden_cmd(*args: str) -> list[str]:
    """The ``gpuwarden`` command (as ``python -m gpuwarden``, which needs no install)."""
    return [sys.executable, "-m", "gpuwarden", *args]


def spawn(
    *args: str, stdout: int | None = subprocess.DEVNULL, stderr: int | IO[bytes] | None = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        gpuwarden_cmd(*args), cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True
    )


def stream_count(url: str, subject: str) -> int:
    """Messages stored in the GPUWARDEN stream under ``subject`` (wildcards allowed)."""

    async def count() -> int:
        import nats

        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("GPUWARDEN", subjects_filter=subject)
            return sum((info.state.subjects or {}).values())
        finally:
            await nc.close()

    return asyncio.run(count())


def make_stream(url: str) -> None:
    """Create the GPUWARDEN stream as a collector would (agents only look it up)."""

    async def make() -> None:
        import nats

        from collector.stream import reconcile
        from shared.config import NatsConfig

        nc = await nats.connect(url)
        try:
            await reconcile(nc.jetstream(), NatsConfig(servers=(url,)))
        finally:
            await nc.close()

    asyncio.run(make())


def pct(xs: list[float], q: float) -> float:
    """The ``q``-th percentile of ``xs`` (nearest rank); NaN when there are none."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a :func:`spawn`-ed process group (if still running), then wait for it (up to 20 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(Exception):
        proc.wait(20)


@contextlib.contextmanager
def simulated_agent(
    nats_url: str, host: str, interval: float, warmup: float
) -> Iterator[subprocess.Popen[bytes]]:
    """An agent with 8 simulated GPUs publishing as ``host`` every ``interval`` s, given ``warmup``
    s to start; SIGTERM and a wait at the end (its ``returncode`` is then the exit code)."""
    args = ("agent", "run", "--simulate", "8", "--interval", str(interval), "--nats", nats_url)
    proc = spawn(*args, "--host", host, "--log-level", "warning")
    try:
        time.sleep(warmup)
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


async def webhook(handler: Callable[[Any], Awaitable[Any]]) -> tuple[Any, int]:
    """A local HTTP server taking POST /hook with ``handler``: its runner (to clean up) and port."""
    from aiohttp import web

    from gpuwarden.servers import free_port

    port = free_port()
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


class Receiver:
    """The webhook receiver and frame tap of :mod:`bench._receiver`, in a process of its own (a
    receiver in the collector's event loop would time arrivals when that loop lets it)::

        with Receiver(nats_url, {"host-0001": "xid"}) as rx:  # rx.url: the webhook's URL
            ...
        rx.hooks  # [(arrival time, POSTed JSON)], rx.taps: {host: ts of the fault's first frame}

    (read back when it stops, or as it goes with :meth:`poll`).
    """

    def __init__(self, nats_url: str, watch: dict[str, str]) -> None:
        self.nats_url, self.watch = nats_url, watch
        self.hooks: list[tuple[float, Any]] = []
        self.taps: dict[str, float] = {}
        self.tapped: dict[str, float] = {}  # host -> when the tap received that frame

    def __enter__(self) -> Receiver:
        self._dir = tempfile.TemporaryDirectory()
        self._out = Path(self._dir.name) / "received.jsonl"
        self._read = 0  # bytes of it read so far
        args = [sys.executable, "-m", "bench._receiver", "--nats", self.nats_url, "--out", str(self._out)]
        for host, kind in self.watch.items():
            args += ["--watch", f"{host}={kind}"]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"bench._receiver did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/hook"
        return self

    def poll(self) -> None:
        """Read what the receiver has written since the last call (whole lines only)."""
        if not self._out.exists():
            return
        with self._out.open("rb") as f:
            f.seek(self._read)
            data = f.read()
        done = data.rfind(b"\n") + 1
        self._read += done
        for line in data[:done].decode("utf-8").splitlines():
            d = json.loads(line)
            if "hook" in d:
                self.hooks.append((d["hook"], d["body"]))
            else:
                self.taps.setdefault(d["tap"], d["ts"])
                self.tapped.setdefault(d["tap"], d.get("at", d["ts"]))

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)
        self.poll()
        self._dir.cleanup()


def told(hooks: list[tuple[float, Any]], want: dict[str, str]) -> dict[str, tuple[float, str]]:
    """Host -> (arrival, how) of the first webhook (``hooks``: (arrival, POSTed JSON)) telling
    the alert of rule ``want[host]`` firing: on its own (``own``), or as a member of a provider
    incident (``incident``: its first notification or an update naming the host among its hosts
    and the rule among its rules, docs/alerts.md)."""
    got: dict[str, tuple[float, str]] = {}
    for t, body in hooks:
        for a in body["alerts"]:
            if a["status"] != "firing":
                continue
            ann = a["annotations"]
            if a["fingerprint"].startswith("incident-"):
                rules = set(ann.get("rules", "").split(","))
                for host in ann.get("hosts", "").split(","):
                    if want.get(host) in rules and host not in got:
                        got[host] = (t, "incident")
                continue
            host = a["labels"].get("host", "")
            if a["labels"]["alertname"] == want.get(host) and host not in got:
                got[host] = (t, "own")
    return got


async def start_collector(tmp: str, toml: str, pg_dsn: str, nats_url: str) -> tuple[Any, asyncio.Task[None]]:
    """A collector in this process configured by ``toml`` (written to ``tmp``): the service, its run task."""
    from collector.config import load_collector_config
    from collector.service import CollectorService

    path = Path(tmp) / "collector.toml"
    path.write_text(toml)
    cfg = load_collector_config(path, env={}, flags={"postgres.dsn": pg_dsn, "nats.servers": [nats_url]})
    svc = CollectorService(cfg)
    await svc.startup()
    return svc, asyncio.create_task(svc.run())


async def stop_collector(svc: Any, run: asyncio.Task[None]) -> None:
    """Stop a collector from :func:`start_collector`: ask it to stop, await its run (60 s), shut it down."""
    svc.request_stop()
    await asyncio.wait_for(run, 60)
    await svc.shutdown()


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every process below it, from ``/proc``.

    Live descendants are summed as they stand; those that ended were reaped by their parents,
    whose ``cutime``/``cstime`` carry them up to ``root``: so children that come and go (e.g.
    PostgreSQL's backends and workers) are counted, and the difference of two calls is the CPU
    the whole tree spent in between.
    """
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is None:
            continue
        stats[int(entry)] = st
        children.setdefault(int(st[1]), []).append(int(entry))
    if root not in stats:
        return 0.0
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        st = stats.get(pid)
        if st is not None:  # utime + stime, and cutime + cstime of the children it reaped
            total += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
        todo.extend(children.get(pid, ()))
    return total / _TICK


async def stored_sizes(conn: Any) -> dict[str, int]:
    """GPU-sample rows stored and bytes on disk (tables with their indexes): ``gpu`` is the
    ``gpu_samples`` partitions and ``gpu_facts`` (what samples share), ``host`` the
    ``host_samples`` partitions, ``rollup`` ``gpu_rollup_1m``."""
    size = (
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_inherits i JOIN pg_class c"
        " ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1"
    )
    return {
        "rows": int(await conn.fetchval("SELECT count(*) FROM gpu_samples")),
        "gpu": int(await conn.fetchval(size, "gpu_samples"))
        + int(await conn.fetchval("SELECT pg_total_relation_size('gpu_facts')")),
        "host": int(await conn.fetchval(size, "host_samples")),
        "rollup": int(await conn.fetchval("SELECT pg_total_relation_size('gpu_rollup_1m')")),
    }
