"""What one agent can make a running collector hold or do (issue 9, item 7 and the per-incident
map), against real nats-server and PostgreSQL: a flooding host is refused beyond its rate
(``rate_limited``: counted, neither stored nor judged) while another host loses nothing; the
collector's per-incident map forgets the incidents the alert engine retired."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg

from collector.config import CollectorConfig
from gpuwarden.servers import NatsServer
from shared.frames import GpuSample, SampleFrame
from tests.support.collector import collector, jetstream, load_toml
from tests.support.ingest import publish
from tests.support.records import sample
from tests.support.wait import until


def config(tmp: Path, dsn: str, nats_url: str, body: str) -> CollectorConfig:
    return load_toml(
        tmp,
        dsn,
        nats_url,
        f"""durable = "b{abs(hash(str(tmp))) % 10**8}"
host_rate = 1
host_burst = 20
[alerting]
tick = "100ms"
{body}
""",
    )


async def test_a_flooding_host_is_refused_beyond_its_rate_and_another_host_loses_nothing(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    cfg = config(tmp_path, pg_dsn, private_nats.url, "")
    now = time.time()
    async with collector(cfg) as svc:
        t0 = time.monotonic()
        async with jetstream(private_nats.url) as js:
            await publish(js, [sample("flood-1", i, now + i * 1e-3, gpus=1) for i in range(1, 301)])
            await publish(js, [sample("calm-1", i, now + i, gpus=1) for i in range(1, 11)])
        published_in = time.monotonic() - t0
        st = svc.ingest.stats
        await until(lambda: st.frames_stored + st.rejected["rate_limited"] >= 310, timeout=60)
        # a bucket of 20 refilled at 1/s for at most the time the server took to store them all
        allowed = 20 + published_in + 1
        assert st.rejected["rate_limited"] >= 300 - allowed
        assert st.frames_in == 310
        assert len(svc.ingest.rate_limit) <= 2  # one bucket per host, no more
        db = await asyncpg.connect(pg_dsn)
        try:
            stored = dict(
                await db.fetch(
                    "SELECT h.name, count(*) FROM host_samples s JOIN hosts h ON h.id = s.host_id"
                    " GROUP BY h.name"
                )
            )
            rejected_rows = await db.fetchval("SELECT count(*) FROM rejected_frames")
            stored_seqs = {
                r["seq"]
                for r in await db.fetch(
                    "SELECT s.seq FROM host_samples s JOIN hosts h ON h.id = s.host_id WHERE h.name = $1",
                    "flood-1",
                )
            }
        finally:
            await db.close()
        assert stored["calm-1"] == 10  # the other host lost nothing
        assert stored["flood-1"] == 300 - st.rejected["rate_limited"] <= allowed
        assert rejected_rows == 0  # a flood writes no rows
        hs = svc.alerting.health.hosts["flood-1"]
        # and what was refused was not judged either: the bucket refills while the server
        # stores the flood, so admitted frames can come from its end; the newest one judged
        # is the newest one stored
        assert hs.last_sample_seq == max(stored_seqs)


async def test_the_per_incident_map_forgets_incidents_the_engine_retired(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    body = '[alerts]\nfor = "0s"\ncorrelation_window = "1s"\nresolved_retention = "1s"\n'
    cfg = config(tmp_path, pg_dsn, private_nats.url, body)

    def hot(seq: int, temp: float) -> SampleFrame:
        g = GpuSample(index=0, uuid="GPU-inc-0", temp_c=temp)
        return SampleFrame(host="inc-1", provider="p", boot_id="b", seq=seq, ts=time.time(), gpus=(g,))

    async with collector(cfg) as svc:
        al = svc.alerting
        async with jetstream(private_nats.url) as js:
            await publish(js, [hot(1, 99.0)])
            await until(lambda: bool(al.alerts_state.incidents) and bool(al._incident_sig))
            (iid,) = al.alerts_state.incidents
            await publish(js, [hot(2, 40.0)])  # resolves: the incident closes a window later
            await until(lambda: iid not in al.alerts_state.incidents, timeout=30)  # retired
            await until(lambda: iid not in al._incident_sig, timeout=30)  # the timer's next step
            assert set(al._incident_sig) <= set(al.alerts_state.incidents)
