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
from tests.support.agent import agent_config
from tests.support.collector import Receiver, collector, webhook_toml, write_config
from tests.support.wait import until

AGENTS = 5
# A slow round trip is a measurement, not an unmeasured check: a loaded test machine (load 19
# on 2 cores) makes NATS answer in over 100 ms, which the default limit rightly calls a
# warning. The latency limits are set for such a machine, so that what is judged here is only
# what the agents report before they have measured.
LIMITS = """
[health.network]
latency_warning_ms = 2000
latency_critical_ms = 5000
"""
CONFIG = f"""
[alerts]
for = "0s"
provider_incident_min_hosts = 2
{LIMITS}"""
# The collector takes the agents' network checks at face value: no network `for`, no
# sustained NATS rule; what is left to prove is that the agent does not report what it has
# not measured.
STRICT = f"""
[alerts]
for = "0s"
network_for = "0s"
provider_incident_min_hosts = 2
{LIMITS}nats_sustained = "0s"
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


async def test_a_driver_that_cannot_initialise_is_a_driver_alert_not_an_unreachable_host(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    """An agent (and a ``gpuwarden fleet`` host) whose NVML cannot initialise for its first
    seconds (``nvml_init_fail``) keeps reporting: the collector notifies ``host.gpu_driver``
    with the driver advice, never ``host.unreachable``, and resolves it when NVML is back."""
    from agent.fleet import Fleet, host_name
    from shared.config import NatsConfig

    url = private_nats.url
    agent_host, fleet_host = "driver-0", host_name(0)
    body = '[alerts]\nfor = "0s"\n[health]\nstale_after = "2s"\n'
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, url, body + webhook_toml(rx.url))
        async with collector(cfg) as svc:
            agent = AgentService(
                agent_config(url, agent_host, interval=0.5, faults=("nvml_init_fail@0s+3s",))
            )
            agent.nvml_retry = (0.5, 1.0)
            fleet = Fleet(
                NatsConfig(servers=(url,)),
                hosts=1,
                gpus=2,
                interval=0.5,
                faults=(f"{fleet_host}:nvml_init_fail@0s+3s",),
            )
            await fleet.start()
            tasks = [asyncio.create_task(agent.serve(signals=False)), asyncio.create_task(fleet.run())]

            def seen(host: str) -> list[tuple[str, str]]:
                return [
                    (a["labels"]["alertname"], a["status"])
                    for b in rx.bodies()
                    for a in b["alerts"]
                    if a["labels"].get("host") == host
                ]

            try:
                await until(
                    lambda: all(("host.gpu_driver", "resolved") in seen(h) for h in (agent_host, fleet_host)),
                    timeout=60,
                )
                # and the GPUs report again
                await until(
                    lambda: all(len(svc.alerting.health.hosts[h].gpus) == 2 for h in (agent_host, fleet_host))
                )
            finally:
                agent.stop()
                fleet.stop()
                await asyncio.gather(*tasks)
                await fleet.close()
        for h in (agent_host, fleet_host):
            assert seen(h) == [("host.gpu_driver", "firing"), ("host.gpu_driver", "resolved")], h
        fired = next(
            a
            for b in rx.bodies()
            for a in b["alerts"]
            if a["labels"]["host"] == agent_host and a["status"] == "firing"
        )
        assert fired["labels"]["severity"] == "critical"
        assert (
            "NVML cannot initialise: Driver Not Loaded; check the driver and library versions"
            in (fired["annotations"]["summary"])
        )
