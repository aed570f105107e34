"""Server URLs with embedded credentials are never logged: NATS URLs, PostgreSQL DSNs and
inventory URLs, through the real agent publisher, collector CLI and inventory loader."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.publisher import Publisher
from collector.inventory import InventorySourceError, load_expected
from gpuwarden.servers import NatsServer, free_port
from shared.config import NatsConfig
from shared.errors import ServiceUnavailableError
from shared.redact import redact

ROOT = Path(__file__).resolve().parent.parent
SECRET = "S3cret-Pa55word"  # noqa: S105 (a test value)


def test_redact_hides_userinfo_and_password_values() -> None:
    assert redact(f"nats://gw:{SECRET}@h:4222, tls://tok@h2") == "nats://***@h:4222, tls://***@h2"
    assert redact(f"postgresql://u:{SECRET}@db/gw?sslmode=verify-full") == (
        "postgresql://***@db/gw?sslmode=verify-full"
    )
    assert redact(f"host=db user=u password={SECRET} dbname=gw") == "host=db user=u password=*** dbname=gw"
    assert (
        redact("nats://127.0.0.1:4222 and https://h/p?x=a@b") == "nats://127.0.0.1:4222 and https://h/p?x=a@b"
    )


async def test_publisher_never_logs_the_credentials_of_its_server_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = f'authorization {{ users = [ {{user: gw, password: "{SECRET}"}} ] }}'
    with NatsServer(config=auth) as server:
        url = f"nats://gw:{SECRET}@127.0.0.1:{server.port}"
        pub = Publisher(NatsConfig(servers=(url,), publish_timeout=2.0), name="redact-test")
        with caplog.at_level(logging.DEBUG):
            await pub.start(wait=True)
            pub.publish("gpuwarden.v1.sample.p.redact", b"x")
            assert await pub.flush(10)
            await pub.close()
    assert "connected to 127.0.0.1" in caplog.text
    assert SECRET not in caplog.text


async def test_unreachable_nats_error_shows_no_credentials(caplog: pytest.LogCaptureFixture) -> None:
    url = f"nats://gw:{SECRET}@127.0.0.1:{free_port()}"
    pub = Publisher(NatsConfig(servers=(url,), connect_timeout=0.5, publish_timeout=0.5), name="redact-test")
    with caplog.at_level(logging.DEBUG), pytest.raises(ServiceUnavailableError) as exc:
        await pub.start(wait=True)
    await pub.close()
    assert "127.0.0.1" in str(exc.value)
    assert SECRET not in str(exc.value)
    assert SECRET not in caplog.text


async def test_inventory_url_errors_show_no_credentials() -> None:
    with pytest.raises(InventorySourceError) as exc:
        await load_expected(f"http://inv:{SECRET}@127.0.0.1:{free_port()}/hosts.json", 2.0)
    assert "127.0.0.1" in str(exc.value)
    assert SECRET not in str(exc.value)


def test_collector_cli_prints_no_dsn_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWARDEN_")}
    env["PYTHONPATH"] = str(ROOT)
    dsn = f"postgresql://gw:{SECRET}@127.0.0.1:{free_port()}/gpuwarden"
    proc = subprocess.run(
        [sys.executable, "-m", "collector.cli", "migrate", "--dsn", dsn],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "error:" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
