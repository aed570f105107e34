"""The collector group as its NATS key-value bucket shows it, and real ``gpuwarden collector run``
members started as processes, for the group's tests and bench."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import nats.errors
import nats.js.errors

from agent.fleet import host_name
from collector.config import DEFAULT_GROUP_KV
from collector.group.assign import assign, bucket_of
from tests.support.cluster import STREAM_BYTES
from tests.support.collector import Receiver, webhook_toml
from tests.support.db import fetchval
from tests.support.wait import until

ROOT = Path(__file__).resolve().parents[2]
API_PORT = re.compile(rb"API and dashboard on port (\d+)")


def host_name_in_bucket(bucket: int) -> str:
    """A host name whose bucket (of 64) is ``bucket``."""
    return next(h for h in (f"host-{i:04d}" for i in range(10_000)) if bucket_of(h, 64) == bucket)


async def owners(url: str | list[str], kv_bucket: str = DEFAULT_GROUP_KV) -> dict[int, str]:
    """bucket -> the member holding its lease now (from the group's KV bucket). Read as the
    members read it (``collector.group.lease``): the KV stream's subjects, then one get each;
    not ``KeyValue.keys()``, whose watcher came back with nothing in a full test run while two
    live members held their buckets (read here as "nobody holds anything"), and which can wait
    forever when the bucket's last message is a delete marker."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        prefix = f"$KV.{kv_bucket}.b."
        try:
            kv = await js.key_value(kv_bucket)
            info = await js.stream_info(f"KV_{kv_bucket}", subjects_filter=f"{prefix}>")
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            return {}
        out = {}
        for subject in info.state.subjects or {}:
            key = subject[len(prefix) - 2 :]  # "b.<bucket>"
            with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                e = await kv.get(key)
                if e.value:
                    out[int(key[2:])] = json.loads(e.value)["member"]
        return out
    finally:
        await nc.close()


ALERTS = """
[alerts]
provider_incident_min_hosts = 100000
[health]
stale_after = "60s"  # a group restart under load leaves the hosts silent ~30 s
"""


class Members:
    """``gpuwarden collector run --group`` processes sharing one configuration file."""

    def __init__(self, tmp: Path, config: Path, nats_url: str | list[str]) -> None:
        self.tmp = tmp
        self.config = config
        self.nats_url = nats_url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}  # the API port of each member, once listening
        self.log_from: dict[str, int] = {}

    def start(self, name: str) -> None:
        """Start member ``name``; its API binds a port of its own choosing (port 0: a port picked
        here could be taken by another test before the child binds it), which it logs."""
        env = dict(os.environ, GPUWARDEN_COLLECTOR_MEMBER=name, PYTHONPATH=str(ROOT))
        path = self.tmp / f"{name}.log"
        self.log_from[name] = path.stat().st_size if path.exists() else 0  # a restart appends
        self.ports.pop(name, None)
        with path.open("ab") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "gpuwarden", "collector", "run", "--config", str(self.config),
                 "--listen", "127.0.0.1:0"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    async def listening(self) -> None:
        """Wait until every running member's API is up, and note its port (``ports``)."""

        def up() -> bool:
            for name, p in self.procs.items():
                if name in self.ports or p.poll() is not None:
                    continue
                with (self.tmp / f"{name}.log").open("rb") as f:
                    f.seek(self.log_from[name])
                    found = API_PORT.findall(f.read())
                if found:
                    self.ports[name] = int(found[-1])
            return all(name in self.ports for name, p in self.procs.items() if p.poll() is None)

        await until(up, timeout=60, what="every member's API listening")

    def signal(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].pid, sig)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


def group_config(tmp: Path, pg_dsn: str, url: str | list[str], hook: str, lease: str = "4s") -> Path:
    """The members' configuration; on a cluster (``url``: every node's), three replicas."""
    urls = [url] if isinstance(url, str) else url
    servers = ", ".join(f'"{u}"' for u in urls)
    cluster = (
        f'stream_replicas = 3\nstream_max_bytes = {STREAM_BYTES}\nreconnect_wait = "200ms"\n'
        if len(urls) > 1
        else ""
    )
    path = tmp / "group.toml"
    path.write_text(
        f"""
[collector]
group = true
lease = "{lease}"
batch = 200
fetch_timeout = "100ms"
[nats]
servers = [{servers}]
{cluster}[postgres]
dsn = "{pg_dsn}"
[alerting]
tick = "200ms"
health_snapshot = "1s"
{ALERTS}
{webhook_toml(hook)}
"""
    )
    return path


async def split_in(
    url: str | list[str], members: set[str], group: Members | None = None, within: float = 60
) -> dict[int, str]:
    """Wait until the 64 buckets are held by ``members`` as their rebalancing settles (each
    holds what ``assign`` gives it: every member holding some buckets is not enough, a late
    joiner takes its share a round later and a bucket's judge can move); the table. On failure
    with ``group``: which members still run, and the tail of each one's log."""
    table: dict[int, str] = {}
    settled = {b: m for m, bs in assign(members, 64).items() for b in bs}

    async def done() -> bool:
        nonlocal table
        try:
            table = await owners(url)
        except nats.errors.TimeoutError:  # a loaded cluster answering late: asked again
            return False
        return table == settled

    try:
        await until(done, timeout=within)
    except AssertionError:
        if group is not None:
            for name, p in group.procs.items():
                print(f"--- member {name}: exit code {p.poll()}; its log's end:")
                print(group.log(name)[-6000:])
        raise AssertionError(f"buckets not held by {sorted(members)}: {Counter(table.values())}") from None
    return table


def hosts_of(table: dict[int, str], member: str, n: int) -> list[int]:
    """Fleet host indexes (of ``n``) whose bucket ``member`` holds in ``table``."""
    return [i for i in range(n) if table[bucket_of(host_name(i), 64)] == member]


def write_access(token: str, escalate_after: str) -> str:
    """Configuration for members that take API writes (the token of ``ops``) and escalate every
    alert: told on ``hook`` at once, escalated ``escalate_after`` later unless acknowledged."""
    return f"""
[api]
named_tokens = ["ops={token}"]

[[escalation.policy]]
name = "all"
match_re = {{ severity = ".*" }}
levels = [{{ after = "0s", notify = ["hook"] }}, {{ after = "{escalate_after}", notify = ["hook"] }}]
"""


@contextlib.asynccontextmanager
async def three_members(
    tmp: Path, pg_dsn: str, url: str | list[str], hook: str, extra: str = "", alerts: str = ALERTS
) -> AsyncIterator[tuple[Members, dict[int, str]]]:
    """Members m0, m1 and m2 started (``extra``: more configuration; ``alerts``: the [alerts]
    and [health] tables instead of :data:`ALERTS`), each holding its share of the buckets
    (yielded with the table); every member is stopped on the way out."""
    config = group_config(tmp, pg_dsn, url, hook)
    config.write_text(config.read_text().replace(ALERTS, alerts) + extra)
    group = Members(tmp, config, url)
    try:
        for name in ("m0", "m1", "m2"):
            group.start(name)
        table = await split_in(url, {"m0", "m1", "m2"}, group)
        await group.listening()
        yield group, table
    finally:
        group.stop_all()


def xid_keys(rx: Receiver) -> dict[str, set[str]]:
    """host -> the delivery ids of the firing gpu.xid notifications received (a receiver drops
    a second copy of one delivery id: docs/operations.md says when one can come)."""
    out: dict[str, set[str]] = {}
    for headers, raw, _ in rx.received:
        for a in json.loads(raw)["alerts"]:
            if a["labels"]["alertname"] == "gpu.xid" and a["status"] == "firing":
                out.setdefault(a["labels"]["host"], set()).add(headers.get("X-Gpuwarden-Delivery", ""))
    return out


def xids(rx: Receiver) -> Counter[str]:
    """host -> firing gpu.xid notifications received, one per delivery id."""
    return Counter({h: len(keys) for h, keys in xid_keys(rx).items()})


def deliveries(rx: Receiver) -> Counter[str]:
    return Counter(h.get("X-Gpuwarden-Delivery", "") for h, _, _ in rx.received)


async def pending_rows(pg_dsn: str) -> int:
    return int(await fetchval(pg_dsn, "SELECT count(*) FROM notification_outbox WHERE status = 'pending'"))


def none_pending(pg_dsn: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await pending_rows(pg_dsn) == 0

    return check


def spread(per_member: list[list[int]], total: int, cap: int) -> list[int]:
    """``total`` items taken from the lists in turn, at most ``cap`` from one."""
    out: list[int] = []
    for k in range(cap):
        for items in per_member:
            if k < len(items) and len(out) < total:
                out.append(items[k])
    return out
