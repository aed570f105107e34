"""NATS security with the nats role's own configuration, against a real nats-server.

The role's ``pki.yml`` and ``config.yml`` render the CA, the server certificate and
``nats.conf`` (via ``ansible-playbook``, as on a server) for three agents; a nats-server runs
that file unchanged. Then: each agent may publish its own host's subjects and nothing else,
anonymous, wrong-password and plain-text clients are refused, the collector consumes the
stream through a durable consumer, and TLS verifies against the generated CA only. The three
attacks of one agent on the others (read the collector's inbox, +TERM the collector's
messages, suppress another host's frame with its message id) are refused.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from agent.gpu.base import GpuEvent
from agent.publisher import Publisher
from agent.sampler import Sequencer, build_event
from agent.service import AgentService
from gpuwarden.servers import free_port, wait_port
from shared.config import AgentConfig, AgentSection, NatsConfig, NetworkChecksConfig, Secret, SimulateConfig
from shared.frames import decode, encode
from shared.natsconf import stream_settings
from shared.subjects import STREAM, inbox_prefix, sanitize_token
from tests.support.roles import BIN, COLLECTOR_PASSWORD, ROOT, run_playbook
from tests.support.tls import self_signed_ca
from tests.support.wait import reached, until

AGENT_SECRET = "agent-secret-for-tests-0123456789"


def agent_password(user: str) -> str:
    """The roles' derivation: sha256 of '<gpuwarden_nats_agent_secret>:<user>'."""
    return hashlib.sha256(f"{AGENT_SECRET}:{user}".encode()).hexdigest()


@dataclass
class Rendered:
    dir: Path
    url: str
    proc: subprocess.Popen[bytes]
    ca: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ca = self.dir / "ca.pem"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendered]:
    out = tmp_path_factory.mktemp("nats-rendered")
    port = free_port()
    extra = out / "vars.json"
    extra.write_text(
        json.dumps(
            {
                "out_dir": str(out),
                "nats_port": port,
                "nats_bin": str(BIN / "nats-server"),
                "gpuwarden_nats_agent_secret": AGENT_SECRET,
                "gpuwarden_nats_collector_password": COLLECTOR_PASSWORD,
            }
        )
    )
    extra.chmod(0o600)
    run_playbook(str(ROOT / "tests" / "deploy" / "nats_inventory.yml"), f"@{extra}", "render_nats.yml")
    conf = out / "nats.conf"
    assert conf.stat().st_mode & 0o777 == 0o640
    assert AGENT_SECRET not in conf.read_text()  # only derived passwords land there
    log = (out / "nats.log").open("ab")
    proc = subprocess.Popen([str(BIN / "nats-server"), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_port("127.0.0.1", port, 15, proc)
        yield Rendered(dir=out, url=f"tls://127.0.0.1:{port}", proc=proc)
    finally:
        proc.terminate()
        proc.wait(10)


class Errors:
    """Collects the asynchronous errors (-ERR) the server sends a client."""

    def __init__(self) -> None:
        self.items: list[str] = []

    async def cb(self, e: Exception) -> None:
        self.items.append(str(e))

    def violations(self) -> list[str]:
        return [e for e in self.items if "permissions violation" in e.lower()]


async def connect(
    r: Rendered,
    user: str | None,
    password: str | None,
    errors: Errors | None = None,
    inbox: str | None = None,
) -> Client:
    opts: dict[str, object] = {
        "servers": [r.url],
        "tls": r.tls(),
        "allow_reconnect": False,
        "max_reconnect_attempts": 0,
        "connect_timeout": 3,
        "error_cb": (errors or Errors()).cb,
    }
    if user is not None:
        opts["user"] = user
        opts["password"] = password
    if inbox is not None:
        opts["inbox_prefix"] = inbox
    return await nats.connect(**opts)  # type: ignore[arg-type]


async def connect_and_close(pending: Awaitable[Client]) -> None:
    nc = await pending
    await nc.close()


async def collect_refused() -> None:
    """After a refused connection: nats-py leaves the failed attempt's stream writer unclosed, and
    its ResourceWarning, raised whenever the garbage collector gets to it, failed whichever test
    ran then (an "unraisable exception" under ``filterwarnings = error``: seen once in a full run,
    in the test after a refused TLS handshake). Collected here, in the test that refused it."""
    for _ in range(3):  # the transport's connection_lost callbacks first
        await asyncio.sleep(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def agent(r: Rendered, host: str, errors: Errors | None = None) -> Client:
    """An agent's connection, with its own inbox prefix as the agent sets it."""
    user = f"agent-{host}"
    return await connect(r, user, agent_password(user), errors, inbox=inbox_prefix(host))


def agent_config(r: Rendered, host: str) -> NatsConfig:
    user = f"agent-{host}"
    return NatsConfig(
        servers=(r.url,),
        user=user,
        password=Secret(agent_password(user)),
        tls_ca=str(r.ca),
        create_stream=False,
        publish_timeout=1.0,
    )


@pytest.fixture(scope="module")
async def collector(rendered: Rendered) -> AsyncIterator[Client]:
    nc = await connect(rendered, "collector", COLLECTOR_PASSWORD)
    js = nc.jetstream(timeout=5)
    await js.add_stream(StreamConfig(storage=StorageType.FILE, **stream_settings(NatsConfig())))
    yield nc
    await nc.drain()


async def stream_count(collector: Client) -> int:
    info = await collector.jetstream(timeout=5).stream_info(STREAM)
    return int(info.state.messages)


async def test_rendered_config_is_valid_and_private(rendered: Rendered) -> None:
    text = (rendered.dir / "nats.conf").read_text()
    for host in ("gpu-a", "gpu-b", "gpu-c_example_net"):
        assert f'"agent-{host}"' in text
    assert "no_auth_user" not in text.replace("# No no_auth_user", "")
    assert (rendered.dir / "server.key").stat().st_mode & 0o077 == 0o040
    assert (rendered.dir / "pki" / "ca.key").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), ("agent-gpu-a", "wrong-password"), ("collector", agent_password("agent-gpu-a"))],
    ids=["anonymous", "wrong-password", "other-users-password"],
)
async def test_refused_without_valid_credentials(
    rendered: Rendered, user: str | None, password: str | None
) -> None:
    with pytest.raises((nats.errors.Error, OSError)) as exc:
        await connect_and_close(connect(rendered, user, password))
    await collect_refused()
    assert "authorization" in str(exc.value).lower() or isinstance(exc.value, nats.errors.NoServersError)


async def test_plaintext_connection_refused(rendered: Rendered) -> None:
    user = "agent-gpu-a"
    plain = nats.connect(
        servers=[rendered.url.replace("tls://", "nats://")],
        user=user,
        password=agent_password(user),
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=3,
    )
    with pytest.raises((nats.errors.Error, OSError)):
        await connect_and_close(plain)
    await collect_refused()


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    return self_signed_ca(tmp_path / "other.key", tmp_path / "other-ca.pem", "other")


async def test_tls_refuses_a_server_not_signed_by_the_trusted_ca(rendered: Rendered, other_ca: Path) -> None:
    user = "agent-gpu-a"
    untrusted = nats.connect(
        servers=[rendered.url],
        user=user,
        password=agent_password(user),
        tls=ssl.create_default_context(cafile=str(other_ca)),
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=3,
    )
    with pytest.raises((nats.errors.Error, OSError, ssl.SSLError)):
        await connect_and_close(untrusted)
    await collect_refused()


async def test_agent_publishes_its_own_subjects_and_collector_consumes(
    rendered: Rendered, collector: Client
) -> None:
    nc = await agent(rendered, "gpu-a")
    js = nc.jetstream(timeout=5)
    info = await js.stream_info(STREAM)  # agents may look the stream up (create_stream = false)
    assert info.config.name == STREAM
    sub = await collector.jetstream(timeout=5).pull_subscribe(
        "gpuwarden.v1.*.prov1.gpu-a", durable="sec-test", stream=STREAM
    )
    for kind in ("sample", "event", "inventory"):
        ack = await js.publish(
            f"gpuwarden.v1.{kind}.prov1.gpu-a", kind.encode(), headers={"Nats-Msg-Id": kind}
        )
        assert ack.stream == STREAM
    msgs = await sub.fetch(3, timeout=5)
    assert sorted(m.data for m in msgs) == [b"event", b"inventory", b"sample"]
    for m in msgs:
        await m.ack_sync()
    consumer = await sub.consumer_info()
    assert consumer.num_ack_pending == 0
    await sub.unsubscribe()
    await nc.close()


@pytest.mark.parametrize(
    "subject",
    [
        "gpuwarden.v1.sample.prov1.gpu-b",  # another host
        "gpuwarden.v1.event.prov2.gpu-a",  # another provider
        "gpuwarden.v1.alert.prov1.gpu-a",  # alerts are the collector's
        "gpuwarden.v1.sample.prov1.gpu-a.extra",
    ],
)
async def test_agent_publish_as_another_host_is_refused(
    rendered: Rendered, collector: Client, subject: str
) -> None:
    errors = Errors()
    nc = await agent(rendered, "gpu-a", errors)
    before = await stream_count(collector)
    tap = await collector.subscribe("gpuwarden.v1.>")
    with pytest.raises(nats.errors.TimeoutError):  # no ack: the server dropped it
        await nc.jetstream(timeout=1).publish(subject, b"forged")
    await nc.flush()
    await reached(lambda: any(subject in v for v in errors.violations()), 10)  # the server said so
    assert any(subject in v for v in errors.violations()), errors.items
    assert await stream_count(collector) == before
    with pytest.raises(nats.errors.TimeoutError):
        await tap.next_msg(timeout=0.2)
    await tap.unsubscribe()
    await nc.close()


async def test_agent_cannot_use_the_jetstream_api_beyond_its_lookup(
    rendered: Rendered, collector: Client
) -> None:
    errors = Errors()
    nc = await agent(rendered, "gpu-b", errors)
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(f"$JS.API.STREAM.DELETE.{STREAM}", b"", timeout=1)
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(f"$JS.API.STREAM.PURGE.{STREAM}", b"", timeout=1)
    assert len(errors.violations()) == 2, errors.items
    assert (await collector.jetstream(timeout=5).stream_info(STREAM)).config.name == STREAM
    await nc.close()


async def test_agent_cannot_subscribe_to_other_hosts(rendered: Rendered) -> None:
    errors = Errors()
    nc = await agent(rendered, "gpu-a", errors)
    await nc.subscribe("gpuwarden.v1.sample.>")
    await nc.subscribe("gpuwarden.v1.poll.gpu-b")
    await nc.flush()
    await reached(lambda: len(errors.violations()) >= 2, 10)  # both refusals reported
    assert len(errors.violations()) == 2, errors.items
    assert all("subscription" in v.lower() for v in errors.violations())
    await nc.close()


async def test_collector_polls_an_agent_which_may_answer(rendered: Rendered, collector: Client) -> None:
    nc = await agent(rendered, "gpu-c_example_net")

    async def answer(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"fresh sample")

    await nc.subscribe("gpuwarden.v1.poll.gpu-c_example_net", cb=answer)
    await nc.flush()
    replies: list[bytes] = []

    async def answered() -> bool:  # the agent's interest reaches the collector's side once known
        try:
            reply = await collector.request("gpuwarden.v1.poll.gpu-c_example_net", b"", timeout=3)
        except nats.errors.NoRespondersError:
            return False
        replies.append(reply.data)
        return True

    await until(answered, 10, "a responder to the poll")
    assert replies == [b"fresh sample"]
    ack = await nc.jetstream(timeout=5).publish("gpuwarden.v1.sample.prov2.gpu-c_example_net", b"x")
    assert ack.seq > 0
    await nc.close()


async def test_agent_publisher_counts_a_refused_publish(rendered: Rendered, collector: Client) -> None:
    pub = Publisher(agent_config(rendered, "gpu-b"), name="sec-test", inbox_prefix=inbox_prefix("gpu-b"))
    await pub.start(wait=True)
    try:
        pub.publish("gpuwarden.v1.sample.prov1.gpu-b", b"own")
        pub.publish("gpuwarden.v1.sample.prov1.gpu-a", b"forged")
        pub.publish("gpuwarden.v1.event.prov1.gpu-b", b"own")
        assert await pub.flush(15)
        assert pub.stats.published == 2
        assert pub.stats.permission_errors == 1
    finally:
        await pub.close()


# ----------------------------------------------------------------------------- one agent against the others


async def test_agent_cannot_read_the_collectors_inbox(rendered: Rendered, collector: Client) -> None:
    """Attack 1: the collector's pull fetches are delivered to ``_INBOX.<...>``; an agent that
    could subscribe there would read every host's telemetry."""
    errors = Errors()
    spy = await agent(rendered, "gpu-b", errors)
    tap = await spy.subscribe("_INBOX.>")
    await spy.flush()
    sub = await collector.jetstream(timeout=5).pull_subscribe(
        "gpuwarden.v1.sample.prov1.gpu-a",
        durable="inbox-spy",
        stream=STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
    )
    victim = await agent(rendered, "gpu-a")
    await victim.jetstream(timeout=5).publish("gpuwarden.v1.sample.prov1.gpu-a", b"telemetry of gpu-a")
    msgs = await sub.fetch(1, timeout=5)
    assert msgs[0].data == b"telemetry of gpu-a"
    await msgs[0].ack_sync()
    await until(lambda: bool(errors.violations()), 10, "the subscription to be refused")
    assert any('subscription to "_inbox.>"' in v.lower() for v in errors.violations()), errors.items
    with pytest.raises(nats.errors.TimeoutError):
        await tap.next_msg(timeout=0.5)
    # The agent's own replies still arrive, under its own prefix.
    assert (await spy.jetstream(timeout=5).publish("gpuwarden.v1.sample.prov1.gpu-b", b"own")).seq > 0
    await sub.unsubscribe()
    await spy.close()
    await victim.close()


async def test_agent_cannot_terminate_or_ack_the_collectors_messages(
    rendered: Rendered, collector: Client
) -> None:
    """Attack 2: answer the collector's deliveries (reply ``$JS.ACK.GPUWARDEN...``) with ``+TERM``,
    via a subscription to its inbox and ``allow_responses``, or by publishing to the ack subject."""
    errors = Errors()
    attacker = await agent(rendered, "gpu-b", errors)

    async def terminate(msg: nats.aio.msg.Msg) -> None:
        if msg.reply:
            await attacker.publish(msg.reply, b"+TERM")

    await attacker.subscribe("_INBOX.>", cb=terminate)
    await attacker.flush()
    js = collector.jetstream(timeout=5)
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name="term-victim",
            ack_wait=120.0,
            filter_subject="gpuwarden.v1.event.prov1.gpu-a",
            deliver_policy=DeliverPolicy.NEW,
        ),
    )
    sub = await js.pull_subscribe_bind(durable="term-victim", stream=STREAM)
    victim = await agent(rendered, "gpu-a")
    await victim.jetstream(timeout=5).publish("gpuwarden.v1.event.prov1.gpu-a", b"XID 79 on gpu-a")
    [target] = await sub.fetch(1, timeout=5)
    assert target.data == b"XID 79 on gpu-a"
    assert target.reply.startswith(f"$JS.ACK.{STREAM}.")
    await attacker.publish(target.reply, b"+TERM")  # straight at the ack subject
    await attacker.flush()
    await until(lambda: any("publish" in v.lower() for v in errors.violations()), 10, "the +TERM refusal")
    assert any(target.reply.lower() in v.lower() for v in errors.violations()), errors.items
    info = await sub.consumer_info()
    assert info.num_ack_pending == 1  # neither terminated nor acknowledged by the attacker
    await target.ack_sync()
    assert (await sub.consumer_info()).num_ack_pending == 0
    await sub.unsubscribe()
    await attacker.close()
    await victim.close()


async def test_another_hosts_message_id_cannot_suppress_a_frame(
    rendered: Rendered, collector: Client
) -> None:
    """Attack 3: JetStream's duplicate window is stream-wide; agent gpu-b publishes, on its own
    subject, with every message id gpu-a's next XID frame could carry. The real publisher of
    gpu-a sends none, so its frame is stored and reaches the collector."""
    seqr = Sequencer(host="gpu-a", provider="prov1")
    frame = build_event(seqr, GpuEvent(type="xid", ts=1.7e9, source="kmsg", gpu_index=0, xid=79), 1)
    attacker = await agent(rendered, "gpu-b")
    ajs = attacker.jetstream(timeout=5)
    for forged in (f"gpu-a:{seqr.boot_id}:{frame.seq}", f"{seqr.boot_id}:{frame.seq}", str(frame.seq)):
        ack = await ajs.publish("gpuwarden.v1.event.prov1.gpu-b", b"decoy", headers={"Nats-Msg-Id": forged})
        assert not ack.duplicate
    pub = Publisher(agent_config(rendered, "gpu-a"), name="sec-test-a", inbox_prefix=inbox_prefix("gpu-a"))
    await pub.start(wait=True)
    try:
        pub.publish(seqr.subjects[1], encode(frame), urgent=True)
        assert await pub.flush(15)
        assert pub.stats.published == 1
    finally:
        await pub.close()
    sub = await collector.jetstream(timeout=5).pull_subscribe(
        "gpuwarden.v1.event.prov1.gpu-a", durable="msgid-victim", stream=STREAM
    )
    stored = [m.data for m in await sub.fetch(100, timeout=5) if m.data == encode(frame)]
    assert len(stored) == 1, "gpu-a's XID frame was suppressed"
    assert (decode(stored[0]).host, decode(stored[0]).seq) == ("gpu-a", frame.seq)
    await sub.unsubscribe()
    await attacker.close()


async def test_agent_cannot_roll_up_the_stream(rendered: Rendered, collector: Client) -> None:
    """A header an agent may always send: ``Nats-Rollup: all`` would purge every host's frames;
    the stream does not allow rollups (the collector keeps ``allow_rollup_hdrs`` off)."""
    attacker = await agent(rendered, "gpu-b")
    before = await stream_count(collector)
    assert before > 0
    with pytest.raises(nats.js.errors.APIError):
        await attacker.jetstream(timeout=5).publish(
            "gpuwarden.v1.sample.prov1.gpu-b", b"rollup", headers={"Nats-Rollup": "all"}
        )
    assert await stream_count(collector) == before
    await attacker.close()


def test_roles_make_host_tokens_as_the_code_does(tmp_path: Path) -> None:
    """The nats role's users and the agent role's default host name agree with
    shared.subjects.sanitize_token for long, dotted, starred, spaced and control-character
    names (Jinja's truncate() kept up to 133 characters where the code keeps 128)."""
    long130, long141 = "n" * 130, "x" * 140 + ".y"
    hosts: dict[str, dict[str, str]] = {
        "gpu-a.example.net": {},
        long130: {},
        long141: {"gpuwarden_provider": " acme east "},
        "gpu*star>gt": {"gpuwarden_provider": "p.1\t"},
        "gpu-explicit": {"gpuwarden_agent_host": " gpu\tspaced\x01name "},
    }
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {"children": {"gpu_nodes": {"hosts": hosts}}}}))
    run_playbook(str(inventory), json.dumps({"out_dir": str(tmp_path)}), "host_tokens.yml")
    nats_agents = {a["user"]: a for a in json.loads((tmp_path / "nats_agents.json").read_text())}
    agent_default = {
        d["inventory"]: d["host"] for d in (json.loads(p.read_text()) for p in tmp_path.glob("agent-*.json"))
    }
    assert set(agent_default) == set(hosts)
    for name, hv in hosts.items():
        host = sanitize_token(hv.get("gpuwarden_agent_host", name))
        provider = sanitize_token(hv.get("gpuwarden_provider", "default"))
        assert nats_agents[f"agent-{host}"] == {"user": f"agent-{host}", "host": host, "provider": provider}
        assert sanitize_token(agent_default[name]) == agent_default[name] == sanitize_token(name)
    assert len(sanitize_token(long130)) == 128


async def test_real_agent_publishes_under_the_roles_permissions(
    rendered: Rendered, collector: Client
) -> None:
    """The agent service as deployed (its user, the role's CA, create_stream = false, simulated
    GPUs): its inbox prefix comes from its host name, so its publishes are acknowledged and its
    frames reach the collector's consumer."""
    sub = await collector.jetstream(timeout=5).pull_subscribe(
        "gpuwarden.v1.sample.prov1.gpu-b",
        durable="real-agent",
        stream=STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
    )
    agent_svc = AgentService(
        AgentConfig(
            agent=AgentSection(host="gpu-b", provider="prov1", interval=0.2, kmsg=False),
            nats=agent_config(rendered, "gpu-b"),
            network=NetworkChecksConfig(),
            simulate=SimulateConfig(gpus=2),
        )
    )
    task = asyncio.create_task(agent_svc.serve(signals=False))
    try:
        await until(lambda: agent_svc.publisher.stats.published >= 3, 30, "acknowledged publishes")
        msgs = await sub.fetch(2, timeout=10)
        frames = [decode(m.data) for m in msgs]
        assert all(f.host == "gpu-b" and f.kind == "sample" for f in frames)
        assert agent_svc.publisher.stats.permission_errors == 0
    finally:
        agent_svc.stop()
        await task
        await sub.unsubscribe()


async def test_collector_user_may_run_a_group_member(rendered: Rendered) -> None:
    """Under the role's permissions a collector can be a group member: create the group's KV
    bucket, take and renew and release every bucket's lease, and tell the other members on
    ``gpuwarden.control.>`` and ``gpuwarden.group.>``; an agent may do none of it."""
    from collector.group.lease import Membership

    errors = Errors()
    nc = await connect(rendered, "collector", COLLECTOR_PASSWORD, errors)
    member = Membership(nc, "m0", buckets=8, lease=4.0)
    try:
        await member.start()
        assert member.owned() == frozenset(range(8))
        assert await member.renew()
        got: list[bytes] = []

        async def heard(msg: nats.aio.msg.Msg) -> None:
            got.append(msg.data)

        for subject in ("gpuwarden.control.gpuwarden-collector-group", "gpuwarden.group.summary.x"):
            sub = await nc.subscribe(subject, cb=heard)
            await nc.flush()
            await nc.publish(subject, b"notice")
            await until(lambda: len(got) == 1, 5, f"the notice on {subject}")
            got.clear()
            await sub.unsubscribe()
        await member.stop(release=True)
        assert errors.violations() == []
    finally:
        await nc.close()
    agent_errors = Errors()
    a = await agent(rendered, "gpu-c_example_net", agent_errors)
    try:
        await a.publish("gpuwarden.control.gpuwarden-collector-group", b"forged")
        await a.publish("$KV.gpuwarden-collector-group.b.0", b"forged")
        await a.flush()
        await until(lambda: len(agent_errors.violations()) >= 2, 5, "the agent refused")
    finally:
        await a.close()
