"""End to end: a simulated fleet (``agent.fleet.Fleet``) with one fault per host, real
nats-server (JetStream), PostgreSQL, the collector with its alerting, and a local webhook
receiver. Every fault kind of the fault grammar gives its alert with its severity and
advice, notified once, and resolves when the fault clears; a host going down with 8 GPUs is
one notification; the healthy hosts of the same fleet notify nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent.fleet import Fleet, host_name
from gpuwarden.servers import NatsServer
from shared.config import NatsConfig
from tests.support.collector import Receiver, collector, settled, webhook_toml, write_config
from tests.support.fault_table import EXPECTED as PURE
from tests.support.wait import until

# fault -> (rule, severity, labels naming the subject, a word of the advice), as in the pure test,
# except nvlink_err: critical, its rate (VALUES, below) above DCGM's 100/s.
EXPECTED = {**PURE, "nvlink_err": ("gpu.nvlink", "critical", {"gpu": "2"}, "nvlink")}
FAULTS = list(EXPECTED)  # every fault kind: xid=79, xid=13, temp=95, ecc_dbe, ..., host_down
HEALTHY = 4
START, LENGTH = 4, 12  # each fault starts 4 s into the run and lasts 12 s (host_down: past stale_after)
CONFIG = """
[alerts]
for = "2s"
provider_incident_min_hosts = 1000  # 16 hosts of one provider fail at once on purpose
[health]
stale_after = "6s"  # 3 s: a busy machine starved the in-process fleet past it (11 hosts unreachable)
[health.gpu]
xid_window = "6s"
rate_window = "2s"  # the 12 s rate faults clear 2 s after their end (per-sample rates flickered when
                    # a starved fleet sampled 0.3 s apart: ecc_sbe paged twice)
clock_event_sustained = "1h"
[health.node]
ib_flap_window = "6s"
kmsg_window = "6s"
sxid_window = "6s"
"""


# nvlink_err at 1,000 CRC errors/s, not the simulator's 250: a fault that starts between two
# samples shows a partial first delta (an increase: warning, pending for `for`), and the rate over
# the window crosses DCGM's 100/s at the next sample at 1,000/s (pending: told critical once); at
# 250/s it crossed at the second or the third sample, as the window's base mark was 2 s or, with
# the samples' jitter, 3 s back (287 CRC errors in 2.9 s: 99/s), and at the third the warning had
# already fired: told as a warning, then again as critical (an upgrade is told: docs/alerts.md)
VALUES = {"nvlink_err": "=1000"}


def spec(i: int, fault: str) -> str:
    target = host_name(i) if EXPECTED[fault][2].get("gpu") is None else f"{host_name(i)}/gpu2"
    return f"{target}:{fault}{VALUES.get(fault, '')}@{START}s+{LENGTH}s"


def by_host(rx: Receiver) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for body in rx.bodies():
        for a in body["alerts"]:
            out.setdefault(a["labels"].get("host", "(provider)"), []).append(a)
    return out


@pytest.mark.timeout(420)  # the wait below, and the fleet's 30 s
async def test_every_fault_kind_alerts_and_resolves_and_healthy_hosts_stay_quiet(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    url = private_nats.url
    faults = [spec(i, f) for i, f in enumerate(FAULTS)]
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, url, CONFIG + webhook_toml(rx.url))
        async with collector(cfg) as svc:
            fleet = Fleet(
                NatsConfig(servers=(url,)), hosts=len(FAULTS) + HEALTHY, gpus=8, interval=1.0, faults=faults
            )
            await fleet.start()
            run = asyncio.create_task(fleet.run(duration=START + LENGTH + 14))

            def all_resolved() -> bool:
                seen = by_host(rx)
                return all(
                    any(
                        a["status"] == "resolved" and a["labels"]["alertname"] == EXPECTED[f][0]
                        for a in seen.get(host_name(i), [])
                    )
                    for i, f in enumerate(FAULTS)
                )

            try:
                try:
                    # a hang guard: the fleet runs a fixed 30 s, judging its frames and sending the
                    # notifications is CPU-bound (at load 14-22 the collector still held some
                    # alerts firing, or resolved but not yet told, 46 s after the fleet's start)
                    await until(all_resolved, timeout=300)
                except AssertionError:  # which faults were not told resolved, and what the collector holds
                    seen = by_host(rx)
                    missing = {
                        f: [(a["labels"]["alertname"], a["status"]) for a in seen.get(host_name(i), [])]
                        for i, f in enumerate(FAULTS)
                        if not any(
                            a["status"] == "resolved" and a["labels"]["alertname"] == EXPECTED[f][0]
                            for a in seen.get(host_name(i), [])
                        )
                    }
                    held = {
                        f: [(a.rule, a.state) for a in svc.alerting.list_alerts(host=host_name(i))]
                        for i, f in enumerate(FAULTS)
                        if f in missing
                    }
                    raise AssertionError((missing, held, svc.alerting.stats)) from None
                await settled(svc)  # anything more (a repeat, a flap) would have been told by now
            finally:
                fleet.stop()
                await run
                await fleet.close()
            stats = svc.alerting.stats
        seen = by_host(rx)
        problems = []
        for i, fault in enumerate(FAULTS):
            rule, severity, subject, advice = EXPECTED[fault]
            got = seen.get(host_name(i), [])
            mine = [a for a in got if a["labels"]["alertname"] == rule]
            statuses = [a["status"] for a in mine]
            if statuses != ["firing", "resolved"]:
                every = [(a["labels"]["alertname"], a["status"]) for a in got]
                problems.append(f"{fault}: {rule} notified {statuses} (all: {every})")
                continue
            fired = mine[0]
            if fired["labels"]["severity"] != severity:
                problems.append(f"{fault}: severity {fired['labels']['severity']}, expected {severity}")
            for k, v in subject.items():
                if fired["labels"].get(k) != v:
                    problems.append(f"{fault}: label {k}={fired['labels'].get(k)}, expected {v}")
            text = (fired["annotations"]["summary"] + " " + fired["annotations"].get("advice", "")).lower()
            if advice.lower() not in text:
                problems.append(f"{fault}: advice lacks {advice!r}: {text}")
        assert problems == []
        # a host down with 8 GPUs: one notification when it goes, one when it is back
        down = seen[host_name(FAULTS.index("host_down"))]
        assert [(a["labels"]["alertname"], a["status"]) for a in down] == [
            ("host.unreachable", "firing"),
            ("host.unreachable", "resolved"),
        ]
        for j in range(len(FAULTS), len(FAULTS) + HEALTHY):
            assert host_name(j) not in seen, f"healthy {host_name(j)} notified: {seen[host_name(j)]}"
        assert stats["channels"]["hook"]["failed"] == 0


@pytest.mark.timeout(300)
async def test_healthy_fleet_for_a_minute_notifies_nothing(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    url = private_nats.url
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, url, CONFIG + webhook_toml(rx.url))
        async with collector(cfg) as svc:
            fleet = Fleet(NatsConfig(servers=(url,)), hosts=16, gpus=8, interval=1.0, seed=7)
            await fleet.start()
            run = asyncio.create_task(fleet.run())
            try:
                # a minute of the fleet's samples judged while it still runs (its end is a
                # silence): counted in frames, so a slow machine judges as many as a fast one
                stored = svc.ingest.stats
                await until(lambda: stored.frames_stored >= 16 * 60, timeout=240)
                await settled(svc)
                await svc.parts.live.refresh()
                rollup = svc.parts.live.current()
                stats = svc.alerting.stats
            finally:
                fleet.stop()
                await run
                await fleet.close()
        notified = [(a["labels"], a["annotations"]["summary"]) for b in rx.bodies() for a in b["alerts"]]
        assert notified == []
        assert stats["notifications"] == 0
        assert stats["observations"] > 0  # the engines did run: first conclusions are observations
        assert len(rollup.hosts) == 16
        assert {h.status for h in rollup.hosts.values()} <= {"healthy", "info"}
