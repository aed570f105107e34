from __future__ import annotations

from pathlib import Path

import pytest

from collector.notify.config import notify_config_from
from shared.config import Secret, load_agent_config, parse_bool, parse_duration, resolve_secret
from shared.errors import ConfigError

AGENT_TOML = """
[agent]
host = "gpu-node-17"
provider = "acme-east"
interval = "5s"
[nats]
servers = ["nats://nats-1:4222", "nats://nats-2:4222"]
user = "agent-gpu-node-17"
password = "file:{pwfile}"
tls_ca = "/etc/gpuwarden/ca.pem"
buffer_frames = 20000
[checks.network]
targets = ["10.0.0.1:22", "storage-1:2049"]
[simulate]
gpus = 8
faults = ["gpu2:xid=79@10s"]
"""


@pytest.fixture
def agent_toml(tmp_path: Path) -> Path:
    pw = tmp_path / "nats.pass"
    pw.write_text("s3cret\n")
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML.format(pwfile=pw))
    return path


def test_design_example_loads(agent_toml: Path) -> None:
    cfg = load_agent_config(agent_toml, env={})
    assert cfg.agent.host == "gpu-node-17"
    assert cfg.agent.interval == 5.0
    assert cfg.nats.servers == ("nats://nats-1:4222", "nats://nats-2:4222")
    assert cfg.nats.password is not None
    assert cfg.nats.password.reveal() == "s3cret"
    assert cfg.network.targets == ("10.0.0.1:22", "storage-1:2049")
    assert cfg.simulate.gpus == 8
    assert cfg.simulate.faults == ("gpu2:xid=79@10s",)


def test_precedence_flag_over_env_over_file_over_default(agent_toml: Path) -> None:
    env = {"GPUWARDEN_AGENT_INTERVAL": "2s", "GPUWARDEN_AGENT_PROVIDER": "from-env"}
    cfg = load_agent_config(agent_toml, env=env, flags={"agent.provider": "from-flag", "agent.host": None})
    assert cfg.agent.provider == "from-flag"  # flag beats env
    assert cfg.agent.interval == 2.0  # env beats file
    assert cfg.agent.host == "gpu-node-17"  # a None flag means "not given"
    assert cfg.agent.kmsg_path == "/dev/kmsg"  # default
    assert load_agent_config(None, env={}).nats.buffer_frames == 20_000


def test_env_lists_and_nested_sections() -> None:
    env = {"GPUWARDEN_CHECKS_NETWORK_TARGETS": "a:1, b:2", "GPUWARDEN_NATS_SERVERS": "nats://x:1"}
    cfg = load_agent_config(None, env=env)
    assert cfg.network.targets == ("a:1", "b:2")
    assert cfg.nats.servers == ("nats://x:1",)


def test_secrets_never_print(agent_toml: Path) -> None:
    cfg = load_agent_config(agent_toml, env={})
    assert "s3cret" not in repr(cfg)
    assert "s3cret" not in str(cfg.nats.password)
    assert resolve_secret("env:TOKEN", "k", {"TOKEN": "abc"}) == Secret("abc")


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ('[agent]\nintervl = "5s"', {}, "agent.intervl"),
        ('[agent]\ninterval = "5 parsecs"', {}, "agent.interval"),
        ("[agent]\ninterval = true", {}, "agent.interval"),
        ("[nats]\nbuffer_frames = -1", {}, "nats.buffer_frames"),
        ("[nats]\nbuffer_frames = 1.5", {}, "nats.buffer_frames"),
        ('[nats]\nservers = "nats://x"', {}, "nats.servers"),
        ('[nats]\npassword = "env:NOPE"', {}, "nats.password"),
        ('[nats]\npassword = "file:/nonexistent/pw"', {}, "nats.password"),
        ("[bogus]\nx = 1", {}, "bogus"),
        ('[simulate]\ngpus = "eight"', {}, "simulate.gpus"),
        ("[simulate]\ngpus = 65", {}, "simulate.gpus"),
        ("", {"GPUWARDEN_AGENT_POLL": "perhaps"}, "GPUWARDEN_AGENT_POLL"),
        ("", {"GPUWARDEN_NATS_BUFFER_FRAMES": "lots"}, "GPUWARDEN_NATS_BUFFER_FRAMES"),
        ("[agent\n", {}, "agent.toml"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], key: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path, env=env)
    assert key in str(err.value)
    assert err.value.exit_code == 2


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_agent_config(Path("/nonexistent/agent.toml"), env={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("2m", 120.0), ("500ms", 0.5), ("1h", 3600.0), ("14d", 1_209_600.0), (3, 3.0)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5 s s", "-1s", "fast", True, None])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(bad)


BOOL_WORDS = [
    *((w, True) for w in ("1", "true", "yes", "on", "TRUE", " On ")),
    *((w, False) for w in ("0", "false", "no", "off", "False", "OFF")),
]


@pytest.mark.parametrize(("word", "value"), BOOL_WORDS)
def test_one_boolean_reading_in_every_section(word: str, value: bool) -> None:
    """The agent's sections and the collector's [notify] read an environment boolean alike."""
    agent = load_agent_config(None, env={"GPUWARDEN_AGENT_POLL": word}, flags={})
    notify = notify_config_from({}, env={"GPUWARDEN_NOTIFY_LOG_ENABLED": word})
    assert parse_bool(word) is value
    assert agent.agent.poll is value
    assert ("log" in notify.names()) is value


@pytest.mark.parametrize("bad", ["", "maybe", "2", "enabled", 1, None])
def test_parse_bool_rejects_naming_the_key(bad: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_bool(bad, "agent.poll")
    assert e.value.key == "agent.poll"
