"""A simulated GPU fleet as Prometheus targets, for ``bench/peer_prometheus.py``.

``python -m bench._prom_exporter --hosts N --gpus 8 --port P`` serves, in one aiohttp process,
``GET /metrics?target=<host>``: the exposition of one simulated host's GPUs, one gauge family per
field the agent's sample carries (``shared.frames.GpuSample``'s scalar fields that are set, as
the collector stores them), labelled ``gpu``. The readings come from the same simulated backend
as ``gpuwarden fleet`` (same host names and seeds); each host's expositions for ``CYCLE``
successive samples are rendered once at start and served in turn, so values change from scrape
to scrape as live readings do while this process (standing for N exporters on N hosts) costs
little. ``GET /stats``: scrapes served so far.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

from aiohttp import web

CYCLE = 10


def render(samples: list[object], fields: tuple[str, ...]) -> bytes:
    """Prometheus text exposition of one host's GPU samples."""
    out: list[str] = []
    for f in fields:
        values = [(g.index, getattr(g, f)) for g in samples]  # type: ignore[attr-defined]
        values = [(i, v) for i, v in values if v is not None]
        if not values:
            continue
        name = f"gpu_{f}"
        out.append(f"# TYPE {name} gauge\n")
        out.extend(f'{name}{{gpu="{i}"}} {float(v)!r}\n' for i, v in values)
    return "".join(out).encode()


def expositions(hosts: int, gpus: int) -> dict[str, Iterator[bytes]]:
    from agent.fleet import host_name
    from agent.gpu.simulated import SimulatedBackend
    from collector.store.rows import GPU_FIELDS

    out: dict[str, Iterator[bytes]] = {}
    for h in range(hosts):
        name = host_name(h)
        backend = SimulatedBackend(gpus, host=name, seed=h)
        backend.open()
        out[name] = itertools.cycle([render(list(backend.sample()), GPU_FIELDS) for _ in range(CYCLE)])
        backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, required=True)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    pages = expositions(args.hosts, args.gpus)
    served = [0]

    async def metrics(request: web.Request) -> web.Response:
        page = pages.get(request.query.get("target", ""))
        if page is None:
            raise web.HTTPNotFound()
        served[0] += 1
        return web.Response(body=next(page), content_type="text/plain", charset="utf-8")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"scrapes": served[0]})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
