"""/metrics: the fleet and collector figures on an injected registry (asserted with
``get_sample_value``), ``promtool check metrics`` on the exposition, and a real Prometheus
scraping the endpoint (Debian's ``prometheus`` package, installed when missing)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import prometheus_client
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from collector.api import make_app
from collector.health.rollup import FleetHealth, rollup
from collector.ingest import IngestStats
from collector.metrics import (
    HOST_FAMILIES,
    MAX_SELECTIONS,
    Exposition,
    FleetCollector,
    Select,
    Snapshot,
    gzip_pieces,
    plain_pieces,
    shard_of,
)
from collector.service import CollectorService
from gpuwarden.servers import NatsServer, free_port
from shared.frames import GpuSample
from tests.support.api import XID_HOST, running
from tests.support.collector import send
from tests.support.records import gpu_sample, sample
from tests.support.system_tools import system_tool
from tests.support.wait import until


def fresh_collector(svc: CollectorService) -> FleetCollector:
    """A metrics collector of ``svc``'s parts, apart from the one its API uses."""
    p = svc.parts
    return FleetCollector(
        p.state, p.live, lambda: p.alerting.health, lambda: p.ingest.stats, lambda: p.alerting.stats
    )


@pytest.fixture(scope="module")
async def service(
    tmp_path_factory: pytest.TempPathFactory, module_dsn: str, module_nats: NatsServer
) -> AsyncIterator[CollectorService]:
    async with running(tmp_path_factory.mktemp("metrics"), module_dsn, module_nats.url) as svc:
        yield svc


@pytest.fixture
def registry(service: CollectorService) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(service.parts.api_deps.metrics)
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
    judged = rollup(service.alerting.health, service.alerting.health_engine.config.provider)  # the pure one
    assert usable == judged.providers["prov-a"].gpus_usable
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
    async with TestClient(TestServer(make_app(svc.parts.api_deps))) as c:
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
    fc = service.parts.api_deps.metrics
    slow = samples(prometheus_client.generate_latest(registry).decode())
    fast = samples(fc.render().decode())
    assert fast.keys() == slow.keys()
    differ = {k for k in fast if k[0] != "gpuwarden_stream_subscribers" and fast[k] != slow[k]}
    assert differ == set()
    assert len([k for k in fast if k[0] == "gpuwarden_gpu_temperature_celsius"]) == 5 * 8


# ------------------------------------------------------------------ the scrape path: blocks, gzip, splits

HOST_FAMILY_NAMES = {f[0] for f in HOST_FAMILIES}


def host_series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in samples(text).items() if k[0] in HOST_FAMILY_NAMES}


def snapshot_of(hosts: dict[str, tuple[str, tuple[GpuSample, ...]]]) -> Snapshot:
    """A snapshot of samples only (no health), for the block cache alone."""
    rows = [(provider, name, gpus) for name, (provider, gpus) in hosts.items()]
    return Snapshot(rows, FleetHealth(), {}, {}, IngestStats(), len(rows), [])


def test_a_host_block_is_rendered_again_only_when_its_values_change() -> None:
    expo = Exposition()
    a = tuple(gpu_sample("h-a", i, 1) for i in range(4))
    b = tuple(gpu_sample("h-b", i, 1) for i in range(4))
    expo.update(snapshot_of({"h-a": ("p", a), "h-b": ("p", b)}))
    expo.pieces(Select())  # blocks are rendered for the hosts a scrape selects
    before = {name: list(e.frags) for name, e in expo.hosts.items()}
    temp = [n for n, _, _ in HOST_FAMILIES].index("gpuwarden_gpu_temperature_celsius")
    total = [n for n, _, _ in HOST_FAMILIES].index("gpuwarden_gpu_memory_total_bytes")
    a2 = tuple(gpu_sample("h-a", i, 2) for i in range(4))  # a new sample: temperature and more change
    expo.update(snapshot_of({"h-a": ("p", a2), "h-b": ("p", b)}))
    rendered = expo.rendered
    expo.pieces(Select(None, shard_of("h-b", 2), 2))  # the shard without h-a: nothing to render
    if shard_of("h-a", 2) != shard_of("h-b", 2):
        assert expo.rendered == rendered
    expo.pieces(Select())
    fields = (
        "temp_c",
        "util_gpu_pct",
        "mem_used_bytes",
        "mem_total_bytes",
        "power_w",
        "ecc_sbe_volatile",
        "ecc_dbe_volatile",
    )
    moved = [f for f in fields if [getattr(g, f) for g in a] != [getattr(g, f) for g in a2]]
    assert "mem_total_bytes" not in moved
    assert expo.rendered - rendered == len(moved)  # h-a's families whose values changed, nothing else
    after = expo.hosts
    assert all(x is y for x, y in zip(after["h-b"].frags, before["h-b"], strict=True))  # untouched
    assert after["h-a"].frags[total] is before["h-a"][total]  # same values: the old block is kept
    assert after["h-a"].frags[temp] != before["h-a"][temp]
    text = b"".join(after["h-a"].frags).decode()
    for g in a2:
        assert f'gpu="{g.index}",uuid="{g.uuid}"}} {g.temp_c!r}\n' in text
    expo.update(snapshot_of({"h-a": ("p", a2)}))  # h-b left the fleet
    assert set(expo.hosts) == {"h-a"}
    out = b"".join(plain_pieces(expo.pieces(Select()))).decode()
    assert 'host="h-b"' not in out
    assert 'host="h-a"' in out


def test_the_gzip_stream_decodes_to_the_plain_text(service: CollectorService) -> None:
    fc = fresh_collector(service)
    snap = fc.snapshot()
    plain = b"".join(plain_pieces(fc.scrape(snap, Select(), gzip=False)))
    for _ in range(2):  # the second time from the kept compressed chunks
        z = b"".join(gzip_pieces(fc.scrape(snap, Select(), gzip=True)))  # type: ignore[arg-type]
        assert z[:2] == b"\x1f\x8b"
        assert gzip.decompress(z) == plain
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one member, nothing after it
        assert d.decompress(z) == plain
        assert d.eof
        assert d.unused_data == b""


def test_shards_partition_the_hosts_and_carry_the_totals_once(service: CollectorService) -> None:
    fc = fresh_collector(service)
    snap = fc.snapshot()
    whole = samples(b"".join(plain_pieces(fc.scrape(snap, Select()))).decode())
    n = 3
    parts = [samples(b"".join(plain_pieces(fc.scrape(snap, Select(None, i, n)))).decode()) for i in range(n)]
    assert sum(len(p) for p in parts) == len(whole)  # no series twice
    union = {k: v for p in parts for k, v in p.items()}
    assert union == {k: v for k, v in whole.items() if k[0] != "gpuwarden_stream_subscribers"} | {
        k: v for k, v in union.items() if k[0] == "gpuwarden_stream_subscribers"
    }
    for i, p in enumerate(parts):
        hosts = {dict(k[1])["host"] for k in p if k[0] == "gpuwarden_gpu_temperature_celsius"}
        assert all(shard_of(h, n) == i for h in hosts)
        fleet_wide = [k for k in p if k[0].startswith(("gpuwarden_provider_", "gpuwarden_collector_"))]
        assert bool(fleet_wide) == (i == 0)


def test_the_provider_filter(service: CollectorService) -> None:
    fc = fresh_collector(service)
    snap = fc.snapshot()
    got = samples(b"".join(plain_pieces(fc.scrape(snap, Select("prov-b")))).decode())
    hosts = {dict(k[1])["host"] for k in got if k[0] == "gpuwarden_gpu_temperature_celsius"}
    assert hosts == {"b-0", "b-1"}
    assert {dict(k[1])["provider"] for k in got if k[0].startswith("gpuwarden_provider_")} == {"prov-b"}
    assert not [k for k in got if k[0].startswith("gpuwarden_collector_")]  # collector-wide: not here
    whole = samples(b"".join(plain_pieces(fc.scrape(snap, Select()))).decode())
    assert {k: v for k, v in whole.items() if ("provider", "prov-b") in k[1]} == got


async def promtool_check(body: bytes) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        [system_tool("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-2000:]


async def test_the_endpoint_gzips_splits_and_promtool_accepts_every_answer(service: CollectorService) -> None:
    async with TestClient(TestServer(make_app(service.parts.api_deps)), auto_decompress=False) as c:
        r = await c.get("/metrics", headers={"Accept-Encoding": "gzip"})
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(await r.read())
        await promtool_check(body)
        r = await c.get("/metrics", headers={"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in r.headers
        plain = await r.read()
        assert host_series(plain.decode()).keys() == host_series(body.decode()).keys()
        shards = []
        for i in range(2):
            r = await c.get(f"/metrics?shards=2&shard={i}", headers={"Accept-Encoding": "gzip"})
            shards.append(gzip.decompress(await r.read()))
            await promtool_check(shards[-1])
        union = host_series(shards[0].decode()) | host_series(shards[1].decode())
        assert union.keys() == host_series(plain.decode()).keys()
        r = await c.get("/metrics?provider=prov-a", headers={"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in r.headers
        await promtool_check(await r.read())
        for bad in ("shards=2&shard=2", "shards=0", "shard=x", "shards=5000"):
            r = await c.get(f"/metrics?{bad}")
            assert r.status == 400, bad


async def test_a_new_sample_shows_in_the_next_scrape(
    service: CollectorService, module_nats: NatsServer
) -> None:
    async with serving(service) as c:
        first = host_series(await (await c.get("/metrics")).text())
        hs = service.state.host("a-0")
        assert hs is not None
        assert hs.sample is not None
        new = sample("a-0", hs.sample.seq + 1, time.time(), provider="prov-a")
        await send(module_nats.url, [new])
        await until(
            lambda: (
                (s := service.state.host("a-0")) is not None
                and s.sample is not None
                and s.sample.seq == new.seq
            )
        )
        second = host_series(await (await c.get("/metrics")).text())
    for g in new.gpus:
        labels = {"provider": "prov-a", "host": "a-0", "gpu": str(g.index), "uuid": g.uuid}
        key = ("gpuwarden_gpu_temperature_celsius", tuple(sorted(labels.items())))
        assert second[key] == g.temp_c
    assert first.keys() == second.keys()
    changed = {k[0] for k in first if first[k] != second[k] and dict(k[1]).get("host") == "a-0"}
    assert "gpuwarden_gpu_temperature_celsius" in changed


def test_the_documented_scrape_config_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    section = doc[doc.index("### Splitting the scrape") :]
    block = section[section.index("```yaml\n") + 8 :]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(block[: block.index("```")])
    proc = subprocess.run(
        [system_tool("promtool"), "check", "config", str(cfg)], capture_output=True, timeout=60
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-2000:]
    assert cfg.read_text().count("shard: [") == 4


async def test_values_are_written_exactly_whatever_their_form() -> None:
    odd = (1e16, 1e-5, 0.1 + 0.2, 57, 65.0, 1.7976931348623157e308, -0.0, float("nan"), None)
    gpus = tuple(
        GpuSample(
            index=i,
            uuid=f"GPU-odd-{i}",
            temp_c=v,
            util_gpu_pct=v if v is None or v == v else 50.0,
            power_w=v,
            mem_used_bytes=2**64 - 1 - i,
            ecc_sbe_volatile=i,
        )
        for i, v in enumerate(odd)
    )
    expo = Exposition()
    expo.update(snapshot_of({'h"%1': ("p\\%", gpus)}))  # label values that need escaping, and a %
    text = b"".join(plain_pieces(expo.pieces(Select()))).decode()
    await promtool_check(text.encode())
    got = samples(text)
    for g, v in zip(gpus, odd, strict=True):
        labels = tuple(
            sorted({"provider": "p\\%", "host": 'h"%1', "gpu": str(g.index), "uuid": g.uuid}.items())
        )
        temp = got.get(("gpuwarden_gpu_temperature_celsius", labels))
        if v is None:
            assert temp is None  # no reading: no line
        elif v != v:
            assert temp is not None
            assert math.isnan(temp)
        else:
            assert temp == v
            assert got[("gpuwarden_gpu_power_watts", labels)] == v
            assert got[("gpuwarden_gpu_utilization_ratio", labels)] == v * 0.01
        assert float(got[("gpuwarden_gpu_memory_used_bytes", labels)]) == float(g.mem_used_bytes or 0)
    line = 'gpuwarden_gpu_memory_used_bytes{provider="p\\\\%",host="h\\"%1",gpu="0",uuid="GPU-odd-0"} '
    assert f"{line}{2**64 - 1}\n" in text  # an integer is written as it is, every digit


def test_blocks_rendered_again_are_what_a_fresh_cache_writes() -> None:
    """Hosts whose blocks are rendered again from a new sample (only the families whose values
    changed), with values of every form and GPUs that go or get lost, write byte for byte what
    a fresh cache writes (every block rendered from nothing), and a block whose values did not
    change is kept as it was."""
    replace = msgspec.structs.replace

    def gpus(host: str, seq: int) -> tuple[GpuSample, ...]:
        return tuple(replace(gpu_sample(host, i, seq), ecc_sbe_volatile=3) for i in range(8))

    def odd(gs: tuple[GpuSample, ...], **change: Any) -> tuple[GpuSample, ...]:
        return tuple(replace(g, **change) if g.index == 2 else g for g in gs)

    names = [f"h-{n}" for n in range(300)] + ['h"%1']  # more than a batch, and a label with a %
    expo = Exposition()
    expo.update(snapshot_of({n: ("p", gpus(n, 1)) for n in names}))
    first = b"".join(plain_pieces(expo.pieces(Select())))
    total = [n for n, _, _ in HOST_FAMILIES].index("gpuwarden_gpu_memory_total_bytes")
    kept = expo.hosts["h-0"].frags[total]
    second = {n: ("p", gpus(n, 2)) for n in names}
    for name, change in {
        "h-3": {"power_w": None},
        "h-4": {"temp_c": float("nan")},
        "h-5": {"mem_used_bytes": 65.0},  # a float where an integer is written
        "h-6": {"lost": True},
        "h-9": {"ecc_sbe_volatile": 4},
        "h-11": {"mem_used_bytes": 2**64 + 5},  # over 64 bits: not msgspec's
        "h-12": {"util_gpu_pct": float("inf")},
    }.items():
        second[name] = ("p", odd(second[name][1], **change))
    second["h-7"] = ("p", second["h-7"][1][:4])  # GPUs gone
    second["h-8"] = ("q", second["h-8"][1])  # another provider
    for snap in (second, {n: ("p", gpus(n, 3)) for n in names}):  # odd, then plain again
        expo.update(snapshot_of(snap))
        got = b"".join(plain_pieces(expo.pieces(Select())))
        fresh = Exposition()
        fresh.update(snapshot_of(snap))
        assert got == b"".join(plain_pieces(fresh.pieces(Select())))
        assert got != first
        assert expo.hosts["h-0"].frags[total] is kept  # the same values: the block is not replaced
    assert 'gpuwarden_gpu_temperature_celsius{provider="p",host="h-4",gpu="2",uuid="GPU-h-4-2"} NaN' in (
        second_text := b"".join(plain_pieces(fresh_of(second).pieces(Select()))).decode()
    )
    assert (
        'gpuwarden_gpu_memory_used_bytes{provider="p",host="h-11",gpu="2",uuid="GPU-h-11-2"} '
        + str(2**64 + 5)
        in second_text
    )


def fresh_of(hosts: dict[str, tuple[str, tuple[GpuSample, ...]]]) -> Exposition:
    expo = Exposition()
    expo.update(snapshot_of(hosts))
    return expo


def test_the_kept_selections_are_bounded() -> None:
    expo = Exposition()
    expo.update(snapshot_of({"h-a": ("p", (gpu_sample("h-a", 0, 1),))}))
    for n in range(1, MAX_SELECTIONS + 11):
        expo.deflated(Select(None, 0, n), now=float(n))
    kept = set(expo._selections)
    assert len(kept) == MAX_SELECTIONS
    assert Select(None, 0, MAX_SELECTIONS + 10) in kept  # the most recent stay
    assert Select(None, 0, 1) not in kept


async def test_concurrent_scrapes_of_shards_add_up(service: CollectorService) -> None:
    async with serving(service) as c:

        async def text(q: str) -> str:
            r = await c.get(f"/metrics{q}", headers={"Accept-Encoding": "gzip"})  # decoded by the client
            assert r.status == 200
            return await r.text()

        whole, *parts = await asyncio.gather(text(""), *(text(f"?shards=3&shard={i}") for i in range(3)))
        head = await c.head("/metrics")
        assert head.status == 200
        assert await head.read() == b""
    union: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for p in parts:
        series = host_series(p)
        assert not union.keys() & series.keys()
        union |= series
    assert union.keys() == host_series(whole).keys()


def test_a_steadily_scraped_selection_is_rendered_ahead_of_its_next_scrape(service: CollectorService) -> None:
    fc = fresh_collector(service)
    sel = Select(None, 1, 2)
    fc.scraped(sel, True, 100.0, 0.2)
    assert fc.due(114.0) == []  # one scrape: no cadence yet
    fc.scraped(sel, True, 115.0, 0.2)  # every 15 s: the next at 130
    assert fc.due(128.5) == []
    assert fc.due(128.7) == [(sel, True)]  # from 130 - AHEAD_LEAD - 2 x 0.2
    assert fc.due(129.0) == []  # once per scrape
    fc.scraped(sel, True, 130.0, 0.2)
    assert fc.due(143.7) == [(sel, True)]
    fc.scraped(Select(), False, 1.0, 0.0)
    fc.scraped(Select(), False, 1.5, 0.0)  # too often: the scrape renders for itself
    assert fc.due(1.9) == []
    assert fc.due(2.5) == []
    # rendered ahead, the scrape has nothing left to render
    fc.render_ahead(fc.snapshot(), sel, True)
    rendered = fc.exposition.rendered
    pieces = fc.scrape(fc.snapshot(), sel, True)
    assert fc.exposition.rendered == rendered
    assert gzip.decompress(b"".join(gzip_pieces(pieces)))  # type: ignore[arg-type]
