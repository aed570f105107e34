"""Push to a real Prometheus Alertmanager (Debian's ``prometheus-alertmanager``, installed by
the fixture when missing and running as root): a firing alert shows in its v2 API with our
labels and annotations; the resolved push (with ``endsAt``) removes it from the active list."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpuwarden.servers import NatsServer, free_port
from tests.support.collector import collector, send, write_config
from tests.support.records import event
from tests.support.system_tools import system_tool
from tests.support.wait import until, until_blocking

BINARY = "prometheus-alertmanager"
AM_CONFIG = """
route:
  receiver: blackhole
  group_wait: 0s
receivers:
  - name: blackhole
"""


def _binary() -> str:
    return system_tool(BINARY)


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    binary = _binary()
    (tmp_path / "am.yml").write_text(AM_CONFIG)
    port = free_port()
    log = (tmp_path / "am.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'am.yml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        return True
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "am.log").read_text()
            return False

        until_blocking(ready, 30, "alertmanager ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def am_alerts(url: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v2/alerts") as r:
        assert r.status == 200
        alerts: list[dict[str, Any]] = await r.json()
        return alerts


async def test_alerts_are_pushed_to_alertmanager_and_resolved_there(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, alertmanager: str
) -> None:
    body = f"""
[health.gpu]
xid_window = "3s"
[[notify.alertmanager]]
name = "am"
url = "{alertmanager}"
backoff = "50ms"
"""
    cfg = write_config(tmp_path, pg_dsn, private_nats.url, body)
    seen: list[dict[str, Any]] = []

    async def present() -> bool:
        seen[:] = [a for a in await am_alerts(alertmanager) if a["labels"].get("alertname") == "gpu.xid"]
        return bool(seen)

    async def gone() -> bool:
        return not await present()

    async with collector(cfg) as svc:
        await send(private_nats.url, [event("am-01", 1, time.time())])
        await until(present)
        (a,) = seen
        assert a["labels"]["host"] == "am-01"
        assert a["labels"]["severity"] == "critical"
        assert a["labels"]["xid"] == "79"
        assert a["labels"]["provider"] == "prov-a"
        assert "XID 79" in a["annotations"]["summary"]
        assert a["status"]["state"] == "active"
        fp = next(x.fingerprint for x in svc.alerting.list_alerts(state="firing"))
        await until(gone, timeout=20)  # the XID window passes: resolved, pushed with endsAt
        assert svc.alerting.get_alert(fp).state == "resolved"  # type: ignore[union-attr]
        st = svc.alerting.stats["channels"]["am"]
    assert st["sent"] == 2
    assert st["failed"] == 0
