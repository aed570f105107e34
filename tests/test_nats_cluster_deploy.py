"""The ``nats`` role deploys a three-node JetStream cluster with TLS between the nodes.

The role's own ``pki.yml`` and ``config.yml`` render the CA, the certificate and each node's
``nats.conf`` (``ansible-playbook`` on an inventory of three nodes, as on three servers); three
nats-servers run those files unchanged. They form one cluster over routes with mutual TLS,
the collector's user creates the ``GPUWARDEN``-like stream with three replicas on it, and a
route connection without a certificate of the CA is refused.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from gpuwarden.servers import free_port, wait_port
from tests.support.roles import BIN, COLLECTOR_PASSWORD, run_playbook
from tests.support.wait import until

NODES = 3


@dataclass
class Cluster:
    dir: Path
    clients: list[int]
    routes: list[int]
    monitors: list[int]

    @property
    def urls(self) -> list[str]:
        return [f"tls://127.0.0.1:{p}" for p in self.clients]

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.pem"))


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:  # noqa: S310
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    out = tmp_path_factory.mktemp("nats-cluster-rendered")
    c = Cluster(out, *([free_port() for _ in range(NODES)] for _ in range(3)))
    hosts = {
        f"n{i}": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "nats_port": c.clients[i],
            "nats_cluster_port": c.routes[i],
            "nats_monitor_port": c.monitors[i],
            "nats_route_address": f"127.0.0.1:{c.routes[i]}",
        }
        for i in range(NODES)
    }
    (out / "inventory.json").write_text(json.dumps({"all": {"children": {"nats_nodes": {"hosts": hosts}}}}))
    extra = out / "vars.json"
    extra.write_text(
        json.dumps(
            {
                "out_dir": str(out),
                "nats_bin": str(BIN / "nats-server"),
                "gpuwarden_nats_collector_password": COLLECTOR_PASSWORD,
            }
        )
    )
    extra.chmod(0o600)
    run_playbook(str(out / "inventory.json"), f"@{extra}", "render_nats_cluster.yml")
    procs = []
    try:
        for i in range(NODES):
            log = (out / f"n{i}.log").open("ab")
            procs.append(
                subprocess.Popen(
                    [str(BIN / "nats-server"), "-c", str(out / f"n{i}" / "nats.conf")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        for i in range(NODES):
            wait_port("127.0.0.1", c.clients[i], 15, procs[i])
        yield c
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_each_node_routes_to_every_node_over_verified_tls(cluster: Cluster) -> None:
    for i in range(NODES):
        conf = (cluster.dir / f"n{i}" / "nats.conf").read_text()
        block = conf[conf.index("cluster {") :]
        for port in cluster.routes:
            assert f'"nats-route://127.0.0.1:{port}"' in block
        assert "verify: true" in block
        assert f'server_name: "n{i}"' in conf


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], check=True, capture_output=True, text=True).stdout


def test_each_node_has_a_certificate_of_its_own_signed_by_the_ca(cluster: Cluster) -> None:
    """One key and certificate per node, naming it: a node's stolen key is only that node's."""
    keys = set()
    for i in range(NODES):
        pem = cluster.dir / f"n{i}" / "server.pem"
        assert "OK" in openssl("verify", "-CAfile", str(cluster.dir / "pki" / "ca.pem"), str(pem))
        assert f"CN=n{i}" in openssl("x509", "-noout", "-subject", "-in", str(pem)).replace(" ", "")
        names = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", str(pem))
        assert f"DNS:n{i}" in names
        assert "IP Address:127.0.0.1" in names
        keys.add((cluster.dir / f"n{i}" / "server.key").read_text())
    assert len(keys) == NODES


async def test_the_nodes_form_one_jetstream_cluster_for_a_three_replica_stream(cluster: Cluster) -> None:
    await until(lambda: all(healthy(p) for p in cluster.monitors), timeout=60)
    nc = await nats.connect(
        servers=cluster.urls,
        tls=cluster.tls(),
        user="collector",
        password=COLLECTOR_PASSWORD,
        connect_timeout=5,
    )
    try:
        js = nc.jetstream(timeout=10)
        # the collector's user may create only the GPUWARDEN stream
        await js.add_stream(name="GPUWARDEN", subjects=["gpuwarden.v1.sample.>"], num_replicas=3)

        async def replicated() -> bool:
            info = await js.stream_info("GPUWARDEN")
            peers = info.cluster.replicas if info.cluster else None
            return len(peers or []) == NODES - 1 and all(p.current for p in peers or [])

        await until(replicated, timeout=60)
        info = await js.stream_info("GPUWARDEN")
        assert info.cluster is not None
        assert {info.cluster.leader, *(p.name for p in info.cluster.replicas or [])} == {"n0", "n1", "n2"}
    finally:
        await nc.close()


def _route_handshake(port: int, ctx: ssl.SSLContext) -> bytes:
    """Connect to a route port as a node would, over TLS, and read what the server says first
    (a server that announces itself in plain text first gets its INFO read before TLS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.settimeout(1)
        try:
            plain = raw.recv(5, socket.MSG_PEEK)
        except TimeoutError:
            plain = b""  # TLS first: the server waits for our handshake
        raw.settimeout(10)
        if plain.startswith(b"INFO"):
            assert json.loads(raw.recv(4096)[5:])["tls_required"] is True
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"PING\r\n")
            return tls.recv(4096)


async def test_a_route_without_a_certificate_of_the_ca_is_refused(cluster: Cluster) -> None:
    node = cluster.dir / "n0"
    member = cluster.tls()
    member.load_cert_chain(node / "server.pem", node / "server.key")  # as a node presents itself
    assert await asyncio.to_thread(_route_handshake, cluster.routes[0], member)  # the server talks
    stranger = cluster.tls()  # trusts the CA, presents no certificate
    try:
        got = await asyncio.to_thread(_route_handshake, cluster.routes[0], stranger)
    except (ssl.SSLError, ConnectionError):
        got = b""
    assert got == b""  # refused in the handshake, or closed without a word
