"""A webhook receiver and frame tap in a process of its own, for the alert benchmarks.

The collector under test runs in the benchmark's process; a receiver in that process (or its
event loop) would time a webhook's arrival only when the collector's loop lets it run, and a
tap on every sample subject would add its decoding to the collector's loop. Here both run
apart, as a real receiver would::

    python -m bench._receiver --nats URL --out FILE [--watch HOST=xid|temp ...]

prints ``PORT <n>`` once it listens on ``127.0.0.1:<n>`` (``POST /hook``) and appends JSON
lines to ``FILE`` until SIGTERM: ``{"hook": <arrival time>, "body": <the POSTed JSON>}`` for
each webhook, and ``{"tap": <host>, "ts": <frame ts>, "at": <arrival>}`` for the first frame that shows the
watched host's fault (``xid``: an XID 79 event frame; ``temp``: a sample with GPU 2 at 95 °C
or more). :func:`bench._util.Receiver` starts it and reads the file back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import IO, Any


async def main(args: argparse.Namespace, out: IO[str]) -> None:
    import nats
    from aiohttp import web

    from bench._util import webhook
    from shared.frames import EventFrame, SampleFrame, decode
    from shared.subjects import PREFIX

    kind = dict(w.split("=", 1) for w in args.watch)
    seen: set[str] = set()

    def write(d: dict[str, Any]) -> None:
        out.write(json.dumps(d) + "\n")
        out.flush()

    async def hook(request: web.Request) -> web.Response:
        t = time.time()
        write({"hook": t, "body": json.loads(await request.read())})
        return web.Response()

    async def tap(msg: Any) -> None:
        host = msg.subject.rsplit(".", 1)[-1]
        k = kind.get(host)
        if k is None or host in seen:
            return
        f = decode(msg.data)
        if (k == "xid" and isinstance(f, EventFrame) and f.xid == 79) or (
            k == "temp"
            and isinstance(f, SampleFrame)
            and any(g.index == 2 and (g.temp_c or 0) >= 95 for g in f.gpus)
        ):
            seen.add(host)
            write({"tap": host, "ts": f.ts, "at": time.time()})

    nc = await nats.connect(args.nats)
    for host, k in kind.items():
        await nc.subscribe(f"{PREFIX}.{'event' if k == 'xid' else 'sample'}.*.{host}", cb=tap)
    runner, port = await webhook(hook)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"PORT {port}", flush=True)
    await stop.wait()
    await nc.drain()
    await runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--nats", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--watch", action="append", default=[], help="HOST=xid or HOST=temp")
    parsed = ap.parse_args(sys.argv[1:])
    with open(parsed.out, "a", encoding="utf-8") as f:
        asyncio.run(main(parsed, f))
