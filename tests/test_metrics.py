"""/metrics: the fleet and collector figures on an injected registry (asserted with
``get_sample_value``), ``promtool check metrics`` on the exposition, and a real Prometheus
scraping the endpoint (Debian's ``prometheus`` package, installed when missing)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from collector.api import make_app
from collector.metrics import FleetCollector
from collector.service import CollectorService
from gpuwarden.servers import NatsServer, free_port
from tests.system_tools import system_tool
from tests.test_alerting import until
from tests.test_api import XID_HOST, module_dsn, module_nats, running

__all__ = ["module_dsn", "module_nats"]


@pytest.fixture(scope="module")
async def service(
    tmp_path_factory: pytest.TempPathFactory, module_dsn: str, module_nats: NatsServer
) -> AsyncIterator[CollectorService]:
    async with running(tmp_path_factory.mktemp("metrics"), module_dsn, module_nats.url) as svc:
        yield svc


@pytest.fixture
def registry(service: CollectorService) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(FleetCollector(service))
    return reg


def test_gpu_gauges_come_from_the_latest_sample(
    service: CollectorService, registry: CollectorRegistry
) -> None:
    hs = service.state.host("a-0")
    assert hs is not None
    assert hs.sample is not None
    g = hs.sample.gpus[3]
    labels = {"provider": "prov-a", "host": "a-0", "gpu": "3", "uuid": g.uuid}
    assert registry.get_sample_value("gpuwarden_gpu_temperature_celsius", labels) == g.temp_c
    assert registry.get_sample_value("gpuwarden_gpu_power_watts", labels) == g.power_w
    assert registry.get_sample_value("gpuwarden_gpu_memory_used_bytes", labels) == g.mem_used_bytes
    assert g.util_gpu_pct is not None
    assert registry.get_sample_value("gpuwarden_gpu_utilization_ratio", labels) == pytest.approx(
        g.util_gpu_pct / 100
    )
    assert registry.get_sample_value("gpuwarden_gpu_ecc_dbe_errors_total", labels) == g.ecc_dbe_volatile


def test_health_xids_rollups_and_alerts(service: CollectorService, registry: CollectorRegistry) -> None:
    uuid2 = f"GPU-{XID_HOST}-2"
    gpu2 = {"provider": "prov-a", "host": XID_HOST, "gpu": "2", "uuid": uuid2}
    assert registry.get_sample_value("gpuwarden_gpu_xid_errors_total", {**gpu2, "xid": "79"}) == 1.0
    assert registry.get_sample_value("gpuwarden_gpu_health_status", gpu2) == 4.0  # critical
    assert (
        registry.get_sample_value("gpuwarden_host_health_status", {"provider": "prov-a", "host": XID_HOST})
        == 4.0
    )
    hosts = [
        registry.get_sample_value("gpuwarden_provider_hosts", {"provider": "prov-a", "status": s})
        for s in ("critical", "warning", "unknown", "info", "healthy")
    ]
    assert sum(h or 0 for h in hosts) == 3
    assert (
        registry.get_sample_value("gpuwarden_provider_hosts", {"provider": "prov-a", "status": "critical"})
        == 1
    )
    usable = registry.get_sample_value("gpuwarden_provider_gpus_usable", {"provider": "prov-a"})
    assert usable == service.alerting.rollup().providers["prov-a"].gpus_usable
    firing = registry.get_sample_value("gpuwarden_alerts", {"state": "firing", "severity": "critical"})
    assert firing is not None
    assert firing >= 1


def test_collector_figures(service: CollectorService, registry: CollectorRegistry) -> None:
    st = service.ingest.stats
    assert registry.get_sample_value("gpuwarden_collector_frames_received_total") == st.frames_in
    assert st.frames_in >= 5 * 4 + 1
    assert registry.get_sample_value("gpuwarden_collector_frames_stored_total") == st.frames_stored
    assert registry.get_sample_value("gpuwarden_collector_batches_total") == st.batches
    assert registry.get_sample_value("gpuwarden_collector_db_up") == 1.0
    assert registry.get_sample_value("gpuwarden_collector_hosts") == 5
    assert registry.get_sample_value("gpuwarden_collector_stream_lost_messages_total") == st.stream_lost == 0
    assert registry.get_sample_value("gpuwarden_collector_stream_max_bytes") == st.stream_max_bytes > 0
    for hs in service.state.hosts.values():
        if hs.sample is not None and hs.sample.agent is not None:
            labels = {"provider": hs.provider, "host": hs.host}
            got = registry.get_sample_value("gpuwarden_agent_dropped_frames_total", labels)
            assert got == hs.sample.agent.dropped_frames


def test_the_global_registry_is_untouched(registry: CollectorRegistry) -> None:
    text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "gpuwarden_" not in text


@contextlib.asynccontextmanager
async def serving(svc: CollectorService) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(make_app(svc))) as c:
        yield c


async def test_promtool_accepts_the_exposition(service: CollectorService, tmp_path: Path) -> None:
    promtool = system_tool("promtool")
    async with serving(service) as c:
        r = await c.get("/metrics")
        assert r.status == 200
        body = await r.read()
    assert b"gpuwarden_gpu_temperature_celsius{" in body
    proc = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-2000:]


@pytest.fixture
def prometheus_binary() -> str:
    return system_tool("prometheus")


@contextlib.contextmanager
def prometheus(binary: str, tmp: Path, target: str) -> Iterator[str]:
    port = free_port()
    cfg = tmp / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: gpuwarden\n    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(base: str, q: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': q})}"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (local test server)
            body = json.load(r)
    except OSError:
        return []
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_a_real_prometheus_scrapes_the_endpoint(
    service: CollectorService, tmp_path: Path, prometheus_binary: str
) -> None:
    async with serving(service) as c:
        target = f"127.0.0.1:{c.port}"
        with prometheus(prometheus_binary, tmp_path, target) as base:

            async def scraped() -> bool:
                up = await asyncio.to_thread(query, base, 'up{job="gpuwarden"}')
                temp = await asyncio.to_thread(query, base, 'gpuwarden_gpu_temperature_celsius{host="a-0"}')
                return bool(up) and up[0]["value"][1] == "1" and len(temp) == 8

            await until(scraped, timeout=60)
            hosts = await asyncio.to_thread(query, base, "sum(gpuwarden_provider_hosts)")
            assert float(hosts[0]["value"][1]) == 5


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_direct_renderer_writes_exactly_what_the_collector_yields(
    service: CollectorService, registry: CollectorRegistry
) -> None:
    fc = FleetCollector(service)
    slow = samples(prometheus_client.generate_latest(registry).decode())
    fast = samples(fc.render().decode())
    assert fast.keys() == slow.keys()
    differ = {k for k in fast if k[0] != "gpuwarden_stream_subscribers" and fast[k] != slow[k]}
    assert differ == set()
    assert len([k for k in fast if k[0] == "gpuwarden_gpu_temperature_celsius"]) == 5 * 8
