"""A dead receiver delays no one: two real local HTTP receivers per kind, one of them hanging
(it accepts the request and never answers), in a running collector (real nats-server and
PostgreSQL). The live webhook gets every notification, at once and on escalation, while the
dead webhook and a dead Alertmanager (which is also re-pushed on a timer) hold requests open."""

from __future__ import annotations

import time
from pathlib import Path

from gpuwarden.servers import NatsServer
from tests.support.collector import Receiver, collector, send, write_config
from tests.support.records import event
from tests.support.wait import until

CHANNELS = """
[[notify.webhook]]
name = "dead"
url = "{dead}"
timeout = "5m"
retries = 0
[[notify.webhook]]
name = "live"
url = "{live}"
[[notify.alertmanager]]
name = "am"
url = "{am}"
timeout = "5m"
retries = 0
[[escalation.policy]]
name = "critical"
match = {{ severity = "critical" }}
levels = [{{ after = "0s", notify = ["dead", "am", "live"] }}, {{ after = "1s", notify = ["live"] }}]
"""


async def test_a_hanging_receiver_never_delays_the_other_channels(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    async with Receiver(hang=True) as dead, Receiver(hang=True) as am, Receiver() as live:
        body = CHANNELS.format(dead=dead.url, live=live.url, am=f"http://127.0.0.1:{am.port}")
        alerting = 'alertmanager_resend = "200ms"\nshutdown_delivery = "200ms"'
        cfg = write_config(tmp_path, pg_dsn, private_nats.url, body, alerting)
        async with collector(cfg):
            await send(private_nats.url, [event("iso-01", 1, time.time())])
            # level 0: the live webhook has it while the dead ones hold the same notification
            await until(lambda: [k for _, _, k in live.alerts()] == ["firing"], 30)
            await until(lambda: dead.attempts == 1 and am.attempts >= 1, 30)
            # the Alertmanager re-push (on the timer) hangs too: the timer must go on
            await until(lambda: am.attempts >= 2, 30)
            # escalation to level 1 is decided by the timer: it comes although both still hang
            await until(lambda: [k for _, _, k in live.alerts()] == ["firing", "escalated"], 30)
            # a second alert reaches the live receiver while the dead one still has the first
            await send(private_nats.url, [event("iso-02", 1, time.time())])
            await until(
                lambda: (
                    {a["labels"]["host"] for b in live.bodies() for a in b["alerts"]} == {"iso-01", "iso-02"}
                ),
                30,
            )
            assert dead.attempts == 1  # its worker is still inside the first request
            assert dead.received == []
