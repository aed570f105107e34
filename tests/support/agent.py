"""An agent's configuration for the tests (simulated GPUs, a test provider)."""

from __future__ import annotations

from shared.config import AgentConfig, AgentSection, NatsConfig, NetworkChecksConfig, SimulateConfig


def agent_config(
    url: str,
    host: str,
    *,
    interval: float,
    gpus: int = 2,
    faults: tuple[str, ...] = (),
    targets: tuple[str, ...] = (),
    kmsg_path: str | None = None,
) -> AgentConfig:
    """An agent's config for the tests; ``kmsg_path``: read the kernel log from that file."""
    if kmsg_path is None:
        agent = AgentSection(host=host, provider="test", interval=interval, kmsg=False)
    else:
        agent = AgentSection(host=host, provider="test", interval=interval, kmsg=True, kmsg_path=kmsg_path)
    return AgentConfig(
        agent=agent,
        nats=NatsConfig(servers=(url,), reconnect_wait=0.2, reconnect_wait_max=1.0, publish_timeout=2.0),
        network=NetworkChecksConfig(targets=targets, timeout=1.0),
        simulate=SimulateConfig(gpus=gpus, faults=faults, seed=7),
    )
