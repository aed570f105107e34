"""A collector with a small fleet reported, for the API tests (and the metrics tests that
read the same fleet): its token, hosts and the module-scoped servers."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from collector.config import CollectorConfig
from collector.service import CollectorService
from tests.support.collector import collector, load_toml, send
from tests.support.records import event, inventory, sample
from tests.support.wait import until

TOKEN = "t0ken-for-tests-" + uuid.uuid4().hex
HOSTS = {"prov-a": ["a-0", "a-1", "a-2"], "prov-b": ["b-0", "b-1"]}
XID_HOST = "a-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def api_config(tmp: Path, dsn: str, nats_url: str, durable: str, token: str, batch: int) -> CollectorConfig:
    """A collector with its API on (``token`` allowed to write), a 200 ms tick and alerts
    that fire after 1 s."""
    return load_toml(
        tmp,
        dsn,
        nats_url,
        f"""durable = "{durable}"
[api]
tokens = ["{token}"]
[alerting]
tick = "200ms"
[alerts]
for = "1s"
""",
        batch=batch,
    )


@contextlib.asynccontextmanager
async def running(tmp: Path, dsn: str, nats_url: str) -> AsyncIterator[CollectorService]:
    """A started collector with the fleet of HOSTS reported (one XID 79 on XID_HOST, GPU 2)."""
    cfg = api_config(tmp, dsn, nats_url, f"api{uuid.uuid4().hex[:8]}", TOKEN, batch=200)
    async with collector(cfg) as svc:
        now = time.time()
        frames: list[Any] = []
        for provider, hosts in HOSTS.items():
            for h in hosts:
                frames.append(inventory(h, 0, now - 3, provider=provider))
                frames += [sample(h, i, now - 3 + i, provider=provider) for i in (1, 2, 3)]
        frames.append(event(XID_HOST, 4, now))
        await send(nats_url, frames)
        await until(lambda: len(svc.state) == 5 and svc.alerting.list_alerts(host=XID_HOST) != [])
        await until(lambda: len(svc.parts.live.current().hosts) == 5)
        yield svc
