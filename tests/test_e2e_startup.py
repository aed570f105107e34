"""End to end: several agents of one provider started together, real nats-server
(JetStream), PostgreSQL, the collector with its alerting and a webhook receiver, with
``[alerts] for = "0s"``. The agents' first frames are sent before their NATS connection is
up; an unmeasured NATS round trip is not a failure, so nothing fires and no incident opens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.service import AgentService
from collector.health.model import HEALTHY
from gpuwarden.servers import NatsServer
from tests.test_agent_service import agent_config
from tests.test_alerting import Receiver, collector, until, webhook_toml, write_config

AGENTS = 5
CONFIG = """
[alerts]
for = "0s"
provider_incident_min_hosts = 2
"""
# The collector takes the agents' network checks at face value: no network `for`, no
# sustained NATS rule; what is left to prove is that the agent does not report what it has
# not measured.
STRICT = """
[alerts]
for = "0s"
network_for = "0s"
provider_incident_min_hosts = 2
[health.network]
nats_sustained = "0s"
"""


@pytest.mark.parametrize("config", [CONFIG, STRICT], ids=["for-0s", "strict-network"])
async def test_agents_started_together_with_for_0s_page_nothing(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer, config: str
) -> None:
    url = private_nats.url
    hosts = [f"start-{i}" for i in range(AGENTS)]
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, url, config + webhook_toml(rx.url))
        async with collector(cfg) as svc:
            agents = [AgentService(agent_config(url, h, interval=0.5)) for h in hosts]
            tasks = [asyncio.create_task(a.serve(signals=False)) for a in agents]

            def measured() -> bool:  # every host's NATS round trip judged healthy, 6 samples in
                st = svc.alerting.health.hosts
                for h in hosts:
                    hs = st.get(h)
                    cs = hs.checks.get("net.target:nats_rtt") if hs is not None else None
                    if cs is None or cs.status != HEALTHY or hs is None or hs.last_sample_seq < 8:
                        return False
                return True

            try:
                await until(measured, timeout=60)
            finally:
                for a in agents:
                    a.stop()
                await asyncio.gather(*tasks)
            alerts = svc.alerting.alerts_state
            stats = svc.alerting.stats
        problems = [
            (a.rule, a.labels.get("host"), a.state, a.summary)
            for a in alerts.alerts.values()
            if a.severity in ("critical", "warning")
        ]
        assert problems == []
        assert alerts.incidents == {}
        assert rx.bodies() == []
        assert stats["notifications"] == 0
