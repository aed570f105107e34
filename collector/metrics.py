"""Prometheus metrics of the collector, built at scrape time from the in-memory state.

:class:`FleetCollector` is a prometheus-client custom collector: register it in a
:class:`prometheus_client.CollectorRegistry` you own (the API makes one per application;
never the global registry). Labels are bounded: ``provider``, ``host``, ``gpu`` (index) and
``uuid`` for per-GPU series; ``xid`` (a catalogue code) for XID counters; ``status``,
``state``, ``severity``, ``reason`` and ``channel`` come from small fixed sets.

Per GPU (``provider``, ``host``, ``gpu``, ``uuid``): temperature, utilisation, memory used
and total, power, ECC single/double-bit counters, health status, and XID counters by code:
eight series per GPU plus one per XID code seen. Health status gauges carry a rank:
0 healthy, 1 info, 2 unknown, 3 warning, 4 critical.
"""

from __future__ import annotations

import copy
import math
import operator
import os
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from isal import isal_zlib
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collector.health.live import LiveRollup
from collector.health.model import RANK, STATUSES, HealthState
from collector.health.rollup import FleetHealth, HostHealth
from collector.ingest import IngestStats
from collector.state import FleetState
from shared.frames import GpuSample

GPU_LABELS: Final = ["provider", "host", "gpu", "uuid"]
# (metric name, help, GpuSample field, scale)
GPU_GAUGES: Final = (
    ("gpuwarden_gpu_temperature_celsius", "GPU core temperature.", "temp_c", 1.0),
    ("gpuwarden_gpu_utilization_ratio", "GPU utilisation (0-1).", "util_gpu_pct", 0.01),
    ("gpuwarden_gpu_memory_used_bytes", "GPU memory in use.", "mem_used_bytes", 1.0),
    ("gpuwarden_gpu_memory_total_bytes", "GPU memory size.", "mem_total_bytes", 1.0),
    ("gpuwarden_gpu_power_watts", "GPU power draw.", "power_w", 1.0),
)
GPU_COUNTERS: Final = (
    (
        "gpuwarden_gpu_ecc_sbe_errors",
        "Single-bit ECC errors since the driver loaded (volatile).",
        "ecc_sbe_volatile",
    ),
    (
        "gpuwarden_gpu_ecc_dbe_errors",
        "Double-bit ECC errors since the driver loaded (volatile).",
        "ecc_dbe_volatile",
    ),
)
RANK_HELP: Final = " (0 healthy, 1 info, 2 unknown, 3 warning, 4 critical)."


def _num(v: float) -> str:
    if math.isfinite(v):
        return repr(v)
    return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


# ------------------------------------------------------------------ the scrape path
#
# The host section (every per-GPU and per-host family) is kept as one small block of bytes per
# (host, family), re-rendered only when that host's sample, health, XIDs or dropped-frame count
# changed, and only for the families whose values changed. A scrape joins the blocks of the
# selected hosts family by family and writes them chunk by chunk (:meth:`Exposition.pieces`),
# so the whole body is never built at once. For gzip, each chunk of CHUNK hosts of one family
# is compressed once and kept until one of its hosts' blocks changes: the chunks are raw deflate
# streams ended by a sync flush, so they concatenate into one gzip member whose CRC-32 is
# combined from the chunks' own (isal_zlib.crc32_combine, zlib's, in C).

CHUNK: Final = 256  # hosts per written (and, for gzip, compressed and cached) piece of a family
# ISA-L's deflate (isal_zlib: zlib's interface; raw deflate streams any inflater reads), level 1
# of its 0-3: on the exposition about 4x as fast as zlib's level 1, and a tenth smaller
GZIP_LEVEL: Final = 1
SELECTION_TTL: Final = 600.0  # seconds a selection's compressed chunks are kept after its last scrape
AHEAD_LEAD: Final = 1.0  # seconds before a selection's expected scrape its changed hosts are rendered
AHEAD_MIN_INTERVAL: Final = 2.0  # scraped more often than this: not rendered ahead (the scrape does it)
MAX_SELECTIONS: Final = 64  # selections whose chunks are kept (/metrics is open: the least recent go)


@dataclass(frozen=True, slots=True)
class Deflated:
    """A piece of the body compressed on its own (raw deflate, sync-flushed: pieces concatenate)."""

    data: bytes
    crc: int  # CRC-32 of the plain text
    size: int  # bytes of plain text

    @classmethod
    def join(cls, parts: list[bytes]) -> Deflated:
        return cls.of(b"".join(parts))

    @classmethod
    def of(cls, plain: bytes) -> Deflated:
        c = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, -15)
        data = c.compress(plain) + c.flush(isal_zlib.Z_SYNC_FLUSH)
        return cls(data, isal_zlib.crc32(plain), len(plain))


_EMPTY: Final = Deflated(b"", 0, 0)
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    """The threads that compress chunks for gzip answers (up to 4, one per core)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="metrics-gzip"))
    return _POOL[0]


GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no time, OS unknown
DEFLATE_END: Final = zlib.compressobj(1, zlib.DEFLATED, -15).flush()  # an empty final block


def gzip_pieces(pieces: Iterable[Deflated]) -> Iterator[bytes]:
    """One gzip member (RFC 1952) made of ``pieces``: what any gzip reader decodes."""
    crc, size = 0, 0
    yield GZIP_HEADER
    for p in pieces:
        crc = isal_zlib.crc32_combine(crc, p.crc, p.size)
        size += p.size
        yield p.data
    yield DEFLATE_END + struct.pack("<II", crc, size & 0xFFFFFFFF)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header allows gzip (Prometheus sends ``gzip``)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


def plain_pieces(pieces: Iterable[bytes | list[bytes]]) -> Iterator[bytes]:
    """The plain exposition of :meth:`FleetCollector.scrape`'s pieces, a chunk at a time."""
    for p in pieces:
        yield p if isinstance(p, bytes) else b"".join(p)


def _family_header(name: str, help_: str, kind: str) -> bytes:
    return f"# HELP {name} {help_}\n# TYPE {name} {kind}\n".encode()


# The host section's families, in the order they are written: (name as written, help, type).
# The first seven come from each GPU of the newest sample: (GpuSample field, scale or None).
SAMPLE_FIELDS: Final = (
    *((f, s if s != 1.0 else None) for _, _, f, s in GPU_GAUGES),
    *((f, None) for _, _, f in GPU_COUNTERS),
)
HOST_FAMILIES: Final = (
    *((n, h, "gauge") for n, h, _, _ in GPU_GAUGES),
    *((n + "_total", h, "counter") for n, h, _ in GPU_COUNTERS),
    ("gpuwarden_gpu_health_status", "GPU health" + RANK_HELP, "gauge"),
    ("gpuwarden_gpu_xid_errors_total", "XID errors seen, by code.", "counter"),
    ("gpuwarden_host_health_status", "Host health" + RANK_HELP, "gauge"),
    ("gpuwarden_agent_dropped_frames_total",
     "Frames the host's agent dropped from its full buffer while NATS was unreachable, "
     "since the agent started (from its newest sample): a gap, not a dead host.", "counter"),
)  # fmt: skip
_NS: Final = len(SAMPLE_FIELDS)
F_HEALTH, F_XID, F_HOST, F_DROPPED = _NS, _NS + 1, _NS + 2, _NS + 3
_HEADERS: Final = tuple(_family_header(*f) for f in HOST_FAMILIES)
_GETTERS: Final = tuple(operator.attrgetter(f) for f, _ in SAMPLE_FIELDS)
_SCALES: Final = tuple(s for _, s in SAMPLE_FIELDS)
_VOLATILE: Final = frozenset(  # the families whose values change with nearly every sample: templates kept
    k
    for k, (f, _) in enumerate(SAMPLE_FIELDS)
    if f in ("temp_c", "util_gpu_pct", "mem_used_bytes", "power_w")
)
_FLOATS: Final = frozenset(  # written through msgspec's JSON encoder (ints: %a, as fast and exact)
    k for k, (f, _) in enumerate(SAMPLE_FIELDS) if f in ("temp_c", "util_gpu_pct", "power_w")
)
_JSON: Final = msgspec.json.Encoder().encode
_GPU_KEY: Final = operator.attrgetter("index", "uuid")
_LOST: Final = operator.attrgetter("lost")
_HEALTH_KEY: Final = operator.attrgetter("index", "uuid", "status")
_RANK: Final = {k: f"{v}.0" for k, v in RANK.items()}


def shard_of(host: str, shards: int) -> int:
    """The shard (0 to shards - 1) a host's series are in: CRC-32 of its UTF-8 name modulo ``shards``
    (stable across processes and restarts, unlike Python's ``hash``)."""
    return zlib.crc32(host.encode()) % shards


class _Host:
    """One host: its newest inputs (set by :meth:`Exposition.update`, cheap) and its blocks
    (``frags[k]``, its text of host family k; ``ver[k]`` changes with it), brought up to the
    inputs only when a scrape selects the host (:meth:`Exposition._render`)."""

    __slots__ = ("crc", "dirty", "dropped", "frags", "gpus", "health", "hkey", "ids", "in_dropped",
                 "in_gpus", "in_health", "in_xids", "lbls", "name", "provider", "seen", "sprov",
                 "tmpl", "vals", "ver", "xkey")  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.crc = zlib.crc32(name.encode())
        self.provider = ""  # of its newest frame: what ?provider= selects
        self.seen = 0
        self.dirty = True
        # inputs: the newest sample's GPUs and provider, health, XIDs, agent's dropped frames
        self.sprov = ""
        self.in_gpus: tuple[GpuSample, ...] | None = None
        self.in_health: HostHealth | None = None
        self.in_xids: list[tuple[int, list[tuple[int, int]]]] | None = None
        self.in_dropped: int | None = None
        # what the blocks were made from
        self.gpus: tuple[GpuSample, ...] | None = None
        self.ids: tuple[Any, ...] | None = None  # provider, host and (index, uuid) of the GPUs labelled
        self.lbls: tuple[str, ...] = ()  # per GPU: '{provider="..",host="..",gpu="..",uuid=".."} '
        self.tmpl: list[bytes | None] = [None] * _NS
        self.vals: list[tuple[Any, ...] | None] = [None] * _NS
        self.health: HostHealth | None = None
        self.hkey: tuple[Any, ...] | None = None
        self.xkey: tuple[Any, ...] | None = None
        self.dropped: tuple[str, int] | None = None
        self.frags: list[bytes] = [b""] * len(HOST_FAMILIES)
        self.ver: list[int] = [0] * len(HOST_FAMILIES)


@dataclass(slots=True)
class _Selection:
    """The compressed chunks of one selection (provider, shard, shards), kept between scrapes."""

    chunks: list[list[tuple[list[int], Deflated]]]  # per host family, per chunk: (versions, data)
    used: float = 0.0


@dataclass(slots=True)
class _Cadence:
    """How one selection is scraped (for rendering it ahead of its next scrape)."""

    last: float  # when its last scrape started (monotonic)
    interval: float = 0.0  # between its last two scrapes
    cost: float = 0.0  # what its last scrape took to render
    ahead: bool = False  # rendered ahead since its last scrape


@dataclass(frozen=True, slots=True)
class Select:
    """Which series a scrape returns (``/metrics?provider=&shard=&shards=``, see docs/api.md)."""

    provider: str | None = None
    shard: int = 0
    shards: int = 1

    @property
    def with_providers(self) -> bool:
        """The per-provider series: in shard 0 only (of the one provider, with ``provider``)."""
        return self.shard == 0

    @property
    def with_collector(self) -> bool:
        """Collector-wide series (alerts, notifications, ingest): shard 0 of unfiltered scrapes."""
        return self.shard == 0 and self.provider is None


class Exposition:
    """The per-host block cache behind ``/metrics`` (see the comment above :data:`CHUNK`).

    :meth:`update`, :meth:`pieces` and :meth:`deflated` run in a worker thread under
    :attr:`lock`; what they return are references to immutable bytes, written afterwards on
    the event loop. A scrape renders only the hosts it selects: shards cost their share."""

    def __init__(self) -> None:
        self.hosts: dict[str, _Host] = {}
        self._scrape = 0
        self._version = 0
        self._selections: dict[Select, _Selection] = {}
        self._header_gz = [Deflated.of(h) for h in _HEADERS]
        self.lock = threading.Lock()
        self.rendered = 0  # blocks (host, family) rendered so far: what the cache saved is the rest

    def _host(self, name: str) -> _Host:
        e = self.hosts.get(name)
        if e is None:
            e = self.hosts[name] = _Host(name)
        e.seen = self._scrape
        return e

    def update(self, snap: Snapshot) -> None:
        """Take the hosts' newest inputs from ``snap`` (references only; nothing is rendered)."""
        self._scrape += 1
        now = self._scrape
        drops = {h: n for _, h, n in snap.agent_drops}
        sampled = set()
        for provider, name, gpus in snap.samples:
            e = self._host(name)
            sampled.add(name)
            n = drops.get(name)
            if e.in_gpus is not gpus or e.sprov != provider or e.in_dropped != n:
                e.in_gpus, e.sprov, e.in_dropped, e.provider, e.dirty = gpus, provider, n, provider, True
        xids: dict[str, list[tuple[int, list[tuple[int, int]]]]] = {}
        for (name, i), codes in snap.xids.items():
            xids.setdefault(name, []).append((i, codes))
        hosts = snap.fleet.hosts
        for name, hh in hosts.items():
            e = self._host(name)
            x = xids.get(name)
            if e.in_health is not hh or x != e.in_xids:
                e.in_health, e.in_xids, e.dirty = hh, x, True
            if name not in sampled:
                e.provider = hh.provider
        if len(self.hosts) > len(sampled) or len(hosts) < len(self.hosts):
            for name, e in list(self.hosts.items()):
                if e.seen != now:
                    del self.hosts[name]
                    continue
                if name not in sampled and (e.in_gpus is not None or e.in_dropped is not None):
                    e.in_gpus, e.in_dropped, e.dirty = None, None, True
                if name not in hosts and (e.in_health is not None or e.in_xids is not None):
                    e.in_health, e.in_xids, e.dirty = None, None, True

    def _render(self, e: _Host) -> None:
        """Bring ``e``'s blocks up to its inputs, family by family, where the values changed."""
        e.dirty = False
        if e.gpus is not e.in_gpus or (e.ids is not None and e.ids[0] != e.sprov):
            self._sample(e, e.sprov, e.in_gpus)
        dkey = None if e.in_dropped is None else (e.sprov, e.in_dropped)
        if dkey != e.dropped:
            e.dropped = dkey
            self._set(e, F_DROPPED, b"" if dkey is None else self._dropped(e, *dkey))
        hh = e.in_health
        if e.health is not hh:
            self._health(e, hh)
        xkey = None
        if e.in_xids is not None and hh is not None:  # rare: GPUs with XIDs in their window
            ids = tuple((g.index, g.uuid) for g in hh.gpus)
            xkey = (hh.provider, ids, tuple(sorted((i, tuple(c)) for i, c in e.in_xids)))
        if xkey != e.xkey:
            e.xkey = xkey
            self._set(e, F_XID, b"" if hh is None or e.in_xids is None else self._xids(hh, e.in_xids))

    def _set(self, e: _Host, k: int, frag: bytes) -> None:
        self._version += 1
        e.frags[k] = frag
        e.ver[k] = self._version
        self.rendered += 1

    def _sample(self, e: _Host, provider: str, gpus: tuple[GpuSample, ...] | None) -> None:
        e.gpus = gpus
        live: tuple[GpuSample, ...] = () if gpus is None else gpus
        if any(map(_LOST, live)):  # a lost GPU's last values are not current: not written
            live = tuple(g for g in live if not g.lost)
        ids = (provider, tuple(map(_GPU_KEY, live)))
        if ids != e.ids:
            p, h = _esc(provider), _esc(e.name)
            e.ids = ids
            e.lbls = tuple(f'{{provider="{p}",host="{h}",gpu="{i}",uuid="{_esc(u)}"}} ' for i, u in ids[1])
            e.tmpl = [None] * _NS
            e.vals = [None] * _NS
        old, tmpl, frags, ver = e.vals, e.tmpl, e.frags, e.ver
        for k, get in enumerate(_GETTERS):
            vals = tuple(map(get, live))
            if vals == old[k]:
                continue
            old[k] = vals
            try:
                ok = math.isfinite(sum(vals))  # TypeError: a None
            except TypeError:
                ok = False
            if ok and vals:
                scale = _SCALES[k]
                if scale is not None:
                    vals = tuple([v * scale for v in vals])
                t = tmpl[k] or self._template(e, k)
                frag = t % (tuple(_JSON(vals)[1:-1].split(b",")) if k in _FLOATS else vals)
            else:  # rare: written line by line
                frag = self._lines(e, k, vals)
            self._version += 1
            frags[k] = frag
            ver[k] = self._version
            self.rendered += 1

    @staticmethod
    def _template(e: _Host, k: int) -> bytes:
        """One line per GPU, the value left to ``%a`` (repr: the shortest round-trip form), or
        for floats to ``%s``, given msgspec's JSON of them (also the shortest round-trip form,
        five times faster than repr for a value of 17 digits)."""
        name, value = HOST_FAMILIES[k][0], "%s" if k in _FLOATS else "%a"
        t = "".join(f"{name}{lbl.replace('%', '%%')}{value}\n" for lbl in e.lbls).encode()
        if k in _VOLATILE:
            e.tmpl[k] = t
        return t

    @staticmethod
    def _lines(e: _Host, k: int, vals: tuple[Any, ...]) -> bytes:
        name, scale = HOST_FAMILIES[k][0], _SCALES[k] or 1.0
        return "".join(
            f"{name}{lbl}{_num(float(v) * scale)}\n"
            for lbl, v in zip(e.lbls, vals, strict=True)
            if v is not None
        ).encode()

    def _health(self, e: _Host, hh: HostHealth | None) -> None:
        e.health = hh
        hkey = None if hh is None else (hh.provider, hh.status, tuple(map(_HEALTH_KEY, hh.gpus)))
        if hkey == e.hkey:
            return
        e.hkey = hkey
        if hh is None:
            self._set(e, F_HEALTH, b"")
            self._set(e, F_HOST, b"")
            return
        p, h = _esc(hh.provider), _esc(e.name)
        lines = [
            f'gpuwarden_gpu_health_status{{provider="{p}",host="{h}",gpu="{g.index}",'
            f'uuid="{_esc(g.uuid)}"}} {_RANK[g.status]}\n'
            for g in hh.gpus
        ]
        self._set(e, F_HEALTH, "".join(lines).encode())
        self._set(
            e,
            F_HOST,
            f'gpuwarden_host_health_status{{provider="{p}",host="{h}"}} {_RANK[hh.status]}\n'.encode(),
        )

    @staticmethod
    def _xids(hh: HostHealth, x: list[tuple[int, list[tuple[int, int]]]]) -> bytes:
        codes = dict(x)
        p, h = _esc(hh.provider), _esc(hh.host)
        return "".join(
            f'gpuwarden_gpu_xid_errors_total{{provider="{p}",host="{h}",gpu="{g.index}",'
            f'uuid="{_esc(g.uuid)}",xid="{code}"}} {_num(float(n))}\n'
            for g in hh.gpus
            for code, n in codes.get(g.index, ())
        ).encode()

    @staticmethod
    def _dropped(e: _Host, provider: str, n: int) -> bytes:
        labels = f'provider="{_esc(provider)}",host="{_esc(e.name)}"'
        return f"gpuwarden_agent_dropped_frames_total{{{labels}}} {_num(float(n))}\n".encode()

    def select(self, sel: Select) -> list[_Host]:
        """The hosts of a selection, in a stable order (first seen first), their blocks current."""
        hosts: Iterable[_Host] = self.hosts.values()
        if sel.provider is not None:
            hosts = [e for e in hosts if e.provider == sel.provider]
        if sel.shards > 1:
            hosts = [e for e in hosts if e.crc % sel.shards == sel.shard]
        hosts = list(hosts)
        for e in hosts:
            if e.dirty:
                self._render(e)
        return hosts

    def pieces(self, sel: Select) -> list[bytes | list[bytes]]:
        """The host section of ``sel`` in plain text: family headers and, per chunk of hosts, the
        list of their blocks (joined when written)."""
        hosts = self.select(sel)
        out: list[bytes | list[bytes]] = []
        for k, header in enumerate(_HEADERS):
            out.append(header)
            out += [[e.frags[k] for e in hosts[i : i + CHUNK]] for i in range(0, len(hosts), CHUNK)]
        return out

    def deflated(self, sel: Select, now: float) -> list[Deflated]:
        """The host section of ``sel`` compressed: chunks of CHUNK hosts per family, each kept
        and reused until one of its hosts' blocks of that family changes."""
        hosts = self.select(sel)
        cache = self._selections.get(sel)
        if cache is None:
            cache = self._selections[sel] = _Selection([[] for _ in _HEADERS])
        cache.used = now
        for key in [k for k, s in self._selections.items() if now - s.used > SELECTION_TTL]:
            del self._selections[key]
        while len(self._selections) > MAX_SELECTIONS:
            del self._selections[min(self._selections, key=lambda k: self._selections[k].used)]
        stale: list[tuple[list[tuple[list[int], Deflated]], int, list[int], list[bytes]]] = []
        for k, chunks in enumerate(cache.chunks):
            del chunks[(len(hosts) + CHUNK - 1) // CHUNK :]
            for n, i in enumerate(range(0, len(hosts), CHUNK)):
                part = hosts[i : i + CHUNK]
                vers = [e.ver[k] for e in part]
                if n == len(chunks):
                    chunks.append((vers, _EMPTY))
                if chunks[n][1] is _EMPTY or chunks[n][0] != vers:
                    stale.append((chunks, n, vers, [e.frags[k] for e in part]))
        # compressed in worker threads (isal_zlib lets go of the GIL): each joins its own chunk, so
        # only the chunks being compressed exist in plain at a time
        for (chunks, n, vers, _), d in zip(
            stale, _pool().map(Deflated.join, [s[3] for s in stale]), strict=True
        ):
            chunks[n] = (vers, d)
        out: list[Deflated] = []
        for k, chunks in enumerate(cache.chunks):
            out.append(self._header_gz[k])
            out += [d for _, d in chunks]
        return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape reads, taken on the event loop (cheap: references and small copies),
    so that rendering can run in a thread while the collector keeps changing its state."""

    samples: list[tuple[str, str, tuple[GpuSample, ...]]]  # provider, host, GPUs
    fleet: FleetHealth
    xids: dict[tuple[str, int], list[tuple[int, int]]]  # (host, gpu) -> [(code, count)]
    stats: dict[str, Any]
    ingest: IngestStats
    hosts: int
    agent_drops: list[tuple[str, str, int]]  # provider, host, agent.dropped_frames of its newest sample


class FleetCollector(Collector):
    """Yields the fleet's and the collector's metric families at scrape time."""

    def __init__(
        self,
        fleet: FleetState,
        live: LiveRollup,
        health: Callable[[], HealthState],
        ingest: Callable[[], IngestStats],
        stats: Callable[[], dict[str, Any]],
    ) -> None:
        self.fleet, self.live, self.health, self.ingest, self.stats = fleet, live, health, ingest, stats
        self._primed: Snapshot | None = None
        self.exposition = Exposition()
        self._cadence: dict[tuple[Select, bool], _Cadence] = {}
        self.ahead = True  # render ahead of expected scrapes (bench/metrics_scrape.py turns it off)

    def snapshot(self) -> Snapshot:
        state = self.fleet
        samples = [(hs.provider, hs.host, hs.sample.gpus) for hs in state.hosts.values() if hs.sample]
        xids = {
            (name, i): sorted((c, r.count) for c, r in gs.xids.items())
            for name, eh in self.health().hosts.items()
            for i, gs in eh.gpus.items()
            if gs.xids
        }
        st = copy.copy(self.ingest())
        st.rejected = Counter(st.rejected)
        st.gpu_entries_rejected = Counter(st.gpu_entries_rejected)
        fleet = self.live.current()
        # the rollup goes on changing its own; per-host series are of the hosts judged here (a
        # collector group member's provider totals cover the fleet, its host series its buckets)
        fleet = FleetHealth(fleet.providers, {n: hh for n, hh in fleet.hosts.items() if not hh.via})
        drops = [
            (hs.provider, hs.host, hs.sample.agent.dropped_frames)
            for hs in state.hosts.values()
            if hs.sample is not None and hs.sample.agent is not None
        ]
        return Snapshot(samples, fleet, xids, self.stats(), st, len(state), drops)

    def prime(self) -> None:
        """Take the next scrape's snapshot now (on the event loop); ``collect`` uses it once."""
        self._primed = self.snapshot()

    def collect(self) -> Iterator[Metric]:
        snap, self._primed = self._primed, None
        if snap is None:
            snap = self.snapshot()
        yield from self._gpus(snap)
        yield from self._rollup(snap)
        yield from self._alerts(snap)
        yield from self._collector(snap)

    def _gpus(self, snap: Snapshot) -> Iterator[Metric]:
        yield from self._per_gpu(snap)
        yield from self._gpu_events(snap)

    def _per_gpu(self, snap: Snapshot) -> Iterator[Metric]:
        """The eight per-GPU families (what :func:`render_per_gpu` writes directly)."""
        gauges = [GaugeMetricFamily(n, h, labels=GPU_LABELS) for n, h, _, _ in GPU_GAUGES]
        counters = [CounterMetricFamily(n, h, labels=GPU_LABELS) for n, h, _ in GPU_COUNTERS]
        for provider, host, gpus in snap.samples:
            for g in gpus:
                if g.lost:
                    continue  # its last values are not current
                labels = [provider, host, str(g.index), g.uuid]
                for fam, (_, _, f, scale) in zip(gauges, GPU_GAUGES, strict=True):
                    v = getattr(g, f)
                    if v is not None:
                        fam.add_metric(labels, float(v) * scale)
                for cfam, (_, _, f) in zip(counters, GPU_COUNTERS, strict=True):
                    v = getattr(g, f)
                    if v is not None:
                        cfam.add_metric(labels, float(v))
        status = GaugeMetricFamily("gpuwarden_gpu_health_status", "GPU health" + RANK_HELP, labels=GPU_LABELS)
        for name, hh in snap.fleet.hosts.items():
            for gh in hh.gpus:
                status.add_metric([hh.provider, name, str(gh.index), gh.uuid], float(RANK[gh.status]))
        yield from gauges
        yield from counters
        yield status

    def _gpu_events(self, snap: Snapshot) -> Iterator[Metric]:
        xid = CounterMetricFamily(
            "gpuwarden_gpu_xid_errors", "XID errors seen, by code.", labels=[*GPU_LABELS, "xid"]
        )
        host_status = GaugeMetricFamily(
            "gpuwarden_host_health_status", "Host health" + RANK_HELP, labels=["provider", "host"]
        )
        for name, hh in snap.fleet.hosts.items():
            host_status.add_metric([hh.provider, name], float(RANK[hh.status]))
            for gh in hh.gpus:
                for code, count in snap.xids.get((name, gh.index), ()):
                    xid.add_metric([hh.provider, name, str(gh.index), gh.uuid, str(code)], float(count))
        dropped = CounterMetricFamily(
            "gpuwarden_agent_dropped_frames",
            "Frames the host's agent dropped from its full buffer while NATS was unreachable, "
            "since the agent started (from its newest sample): a gap, not a dead host.",
            labels=["provider", "host"],
        )
        for provider, host, n in snap.agent_drops:
            dropped.add_metric([provider, host], float(n))
        yield from (xid, host_status, dropped)

    def scrape(
        self, snap: Snapshot, sel: Select = Select(), gzip: bool = False, extra: bytes = b""
    ) -> list[bytes | list[bytes]] | list[Deflated]:
        """The exposition of ``sel`` from ``snap`` (taken on the event loop; this may run in a
        thread), as pieces to write in order: plain (bytes, or lists of bytes to join), or
        compressed (:func:`gzip_pieces` makes the gzip stream of them). ``extra`` ends the
        collector-wide section (the API's own figures)."""
        fams: list[Metric] = []
        if sel.with_providers:
            fams += self._rollup(snap, sel.provider)
        if sel.with_collector:
            fams += [*self._alerts(snap), *self._collector(snap)]
        tail = (generate_latest(_Families(fams)) if fams else b"") + (extra if sel.with_collector else b"")
        with self.exposition.lock:
            self.exposition.update(snap)
            if gzip:
                return [*self.exposition.deflated(sel, time.monotonic()), Deflated.of(tail)]
            return [*self.exposition.pieces(sel), tail]

    def scraped(self, sel: Select, gzip: bool, started: float, cost: float) -> None:
        """A scrape of ``sel`` started at ``started`` (monotonic) and took ``cost`` seconds to
        render: its cadence, for :meth:`due`."""
        c = self._cadence.get((sel, gzip))
        if c is None:
            while len(self._cadence) >= MAX_SELECTIONS:
                del self._cadence[min(self._cadence, key=lambda k: self._cadence[k].last)]
            self._cadence[(sel, gzip)] = _Cadence(started, cost=cost)
        else:
            c.interval, c.last, c.cost, c.ahead = started - c.last, started, cost, False

    def due(self, now: float) -> list[tuple[Select, bool]]:
        """The selections whose next scrape is expected within AHEAD_LEAD (plus twice what the
        last one took to render) and that were not rendered ahead since their last scrape;
        marked as rendered ahead. Scrapers scrape at a steady interval: the hosts that change
        after this is rendered are the only ones the scrape itself renders."""
        out: list[tuple[Select, bool]] = []
        if not self.ahead:
            return out
        for key, c in self._cadence.items():
            if c.ahead or not AHEAD_MIN_INTERVAL <= c.interval <= SELECTION_TTL:
                continue
            if now >= c.last + c.interval - AHEAD_LEAD - 2 * c.cost:
                c.ahead = True
                out.append(key)
        return out

    def render_ahead(self, snap: Snapshot, sel: Select, gzip: bool) -> None:
        """Render (and for gzip compress) the changed hosts of ``sel`` before its next scrape."""
        with self.exposition.lock:
            self.exposition.update(snap)
            if gzip:
                self.exposition.deflated(sel, time.monotonic())
            else:
                self.exposition.select(sel)

    def render(self, sel: Select = Select()) -> bytes:
        """The exposition text of :meth:`collect` in one piece (``/metrics`` streams it instead);
        uses the primed snapshot like ``collect``."""
        snap, self._primed = self._primed, None
        if snap is None:
            snap = self.snapshot()
        return b"".join(plain_pieces(self.scrape(snap, sel)))  # type: ignore[arg-type]

    def _rollup(self, snap: Snapshot, provider: str | None = None) -> Iterator[Metric]:
        fleet = snap.fleet
        hosts = GaugeMetricFamily(
            "gpuwarden_provider_hosts", "Hosts by status.", labels=["provider", "status"]
        )
        gpus = GaugeMetricFamily("gpuwarden_provider_gpus", "GPUs by status.", labels=["provider", "status"])
        usable = GaugeMetricFamily(
            "gpuwarden_provider_gpus_usable", "GPUs that can take work.", labels=["provider"]
        )
        status = GaugeMetricFamily(
            "gpuwarden_provider_health_status", "Provider health" + RANK_HELP, labels=["provider"]
        )
        for name, p in fleet.providers.items():
            if provider is not None and name != provider:
                continue
            for s in STATUSES:
                hosts.add_metric([name, s], float(p.hosts_by_status.get(s, 0)))
                gpus.add_metric([name, s], float(p.gpus_by_status.get(s, 0)))
            usable.add_metric([name], float(p.gpus_usable))
            status.add_metric([name], float(RANK[p.status]))
        yield from (hosts, gpus, usable, status)

    def _alerts(self, snap: Snapshot) -> Iterator[Metric]:
        stats = snap.stats
        alerts = GaugeMetricFamily(
            "gpuwarden_alerts", "Alerts by state and severity.", labels=["state", "severity"]
        )
        for key, n in sorted(stats.get("alerts", {}).items()):
            state, _, severity = key.partition("/")
            alerts.add_metric([state, severity], float(n))
        yield alerts
        sent = CounterMetricFamily(
            "gpuwarden_notifications_sent", "Notifications delivered.", labels=["channel"]
        )
        failed = CounterMetricFamily(
            "gpuwarden_notifications_failed", "Notifications given up (dead letter).", labels=["channel"]
        )
        errors = CounterMetricFamily(
            "gpuwarden_notification_errors", "Failed delivery attempts.", labels=["channel"]
        )
        latency = GaugeMetricFamily(
            "gpuwarden_notification_latency_max_seconds",
            "Longest time from decision to delivery.",
            labels=["channel"],
        )
        for ch, s in sorted(stats.get("channels", {}).items()):
            sent.add_metric([ch], float(s["sent"]))
            failed.add_metric([ch], float(s["failed"]))
            errors.add_metric([ch], float(s["errors"]))
            latency.add_metric([ch], float(s["latency_max_s"]))
        yield from (sent, failed, errors, latency)
        yield CounterMetricFamily(
            "gpuwarden_alert_evaluations",
            "Alert engine evaluations.",
            value=float(stats.get("evaluations", 0)),
        )
        yield CounterMetricFamily(
            "gpuwarden_alert_transitions",
            "Alert state transitions.",
            value=float(stats.get("transitions", 0)),
        )
        yield CounterMetricFamily(
            "gpuwarden_alert_persist_errors",
            "Alert state writes to PostgreSQL that failed (kept in memory and retried).",
            value=float(stats.get("persist_errors", 0)),
        )
        yield GaugeMetricFamily(
            "gpuwarden_notification_backlog",
            "Notifications waiting in the outbox.",
            value=float(stats.get("outbox_backlog", 0)),
        )
        yield GaugeMetricFamily(
            "gpuwarden_stream_subscribers",
            "Live stream (WebSocket) clients.",
            value=float(stats.get("stream_subscribers", 0)),
        )
        yield from _remediation(stats.get("remediation", {}))
        own = stats.get("self", {})
        impaired = own.get("impaired_since")
        yield GaugeMetricFamily(
            "gpuwarden_collector_pipeline_impaired",
            "1 while the collector's own pipeline (NATS connection, PostgreSQL, ingest lag) is impaired.",
            value=1.0 if impaired is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "gpuwarden_collector_pipeline_impaired_since_seconds",
            "Unix time the collector's own pipeline became impaired (0 when it is not).",
            value=float(impaired or 0.0),
        )
        problem = GaugeMetricFamily(
            "gpuwarden_collector_self_problem",
            "The collector's own problems (collector.pipeline, collector.notify): 1 while raised.",
            labels=["check", "cause"],
        )
        for p in own.get("problems", ()):
            problem.add_metric([p["check"], p["cause"]], 1.0)
        yield problem
        yield CounterMetricFamily(
            "gpuwarden_collector_heartbeats",
            "Dead man's switch beats delivered.",
            value=float(stats.get("heartbeats_sent", 0)),
        )
        yield CounterMetricFamily(
            "gpuwarden_collector_heartbeat_failures",
            "Dead man's switch beats that failed.",
            value=float(stats.get("heartbeat_failures", 0)),
        )

    def _collector(self, snap: Snapshot) -> Iterator[Metric]:
        st = snap.ingest
        c = "gpuwarden_collector_"
        yield CounterMetricFamily(
            c + "frames_received", "Frames fetched from NATS.", value=float(st.frames_in)
        )
        yield CounterMetricFamily(c + "frames_stored", "New frames committed.", value=float(st.frames_stored))
        yield CounterMetricFamily(
            c + "frames_duplicate", "Frames already stored.", value=float(st.duplicates)
        )
        yield CounterMetricFamily(
            c + "frames_redelivered",
            "Messages NATS delivered again (not acknowledged within ack_wait, or their bucket's "
            "previous holder gone): checked again, stored once.",
            value=float(st.redelivered),
        )
        rejected = CounterMetricFamily(c + "frames_rejected", "Frames refused, by reason.", labels=["reason"])
        for reason, n in sorted(st.rejected.items()):
            rejected.add_metric([reason], float(n))
        yield rejected
        dropped = CounterMetricFamily(
            c + "gpu_entries_rejected", "GPU entries dropped from samples, by reason.", labels=["reason"]
        )
        for reason, n in sorted(st.gpu_entries_rejected.items()):
            dropped.add_metric([reason], float(n))
        yield dropped
        yield CounterMetricFamily(
            c + "samples_unjoined",
            "Samples accepted without their GPUs' static facts (no inventory of the host yet).",
            value=float(st.samples_unjoined),
        )
        yield CounterMetricFamily(
            c + "hook_errors", "Batches a hook (state, health) failed on.", value=float(st.hook_errors)
        )
        yield CounterMetricFamily(c + "batches", "Batches committed.", value=float(st.batches))
        yield GaugeMetricFamily(
            c + "last_batch_size", "Frames in the last batch.", value=float(st.last_batch_size)
        )
        yield GaugeMetricFamily(
            c + "db_write_seconds", "Duration of the last batch write.", value=float(st.last_write_s)
        )
        yield GaugeMetricFamily(
            c + "commit_lag_seconds",
            "Stream time to commit of the last batch's oldest frame.",
            value=float(st.last_commit_lag_s),
        )
        yield GaugeMetricFamily(
            c + "consumer_pending_messages",
            "Messages waiting for this consumer.",
            value=float(st.consumer_pending),
        )
        yield CounterMetricFamily(
            c + "stream_lost_messages",
            "Messages the stream dropped (full: discard old, or aged out) before this collector got them.",
            value=float(st.stream_lost),
        )
        yield GaugeMetricFamily(
            c + "stream_max_bytes",
            "Size limit of the GPUWARDEN stream after reconciling at start (-1: none).",
            value=float(st.stream_max_bytes),
        )
        yield CounterMetricFamily(c + "db_errors", "Failed PostgreSQL writes.", value=float(st.db_errors))
        yield GaugeMetricFamily(
            c + "db_up", "1 when the last write succeeded.", value=1.0 if st.db_up else 0.0
        )
        yield GaugeMetricFamily(c + "hosts", "Hosts in the in-memory state.", value=float(snap.hosts))


def _remediation(r: dict[str, Any]) -> Iterator[Metric]:
    """Remediation (docs/remediation.md): actions by state, open circuit breakers, steps run."""
    actions = GaugeMetricFamily(
        "gpuwarden_remediation_actions",
        "Remediation actions held by the collector (open ones and recent final ones), by state.",
        labels=["state"],
    )
    for state, n in sorted(r.get("actions", {}).items()):
        actions.add_metric([state], float(n))
    breaker = GaugeMetricFamily(
        "gpuwarden_remediation_breaker_open",
        "1 while a provider's remediation circuit breaker is open.",
        labels=["provider"],
    )
    for provider, is_open in sorted(r.get("breakers", {}).items()):
        breaker.add_metric([provider], 1.0 if is_open else 0.0)
    yield from (actions, breaker)
    yield CounterMetricFamily(
        "gpuwarden_remediation_steps", "Remediation steps run.", value=float(r.get("steps", 0))
    )
    yield CounterMetricFamily(
        "gpuwarden_remediation_failed_steps",
        "Remediation steps that failed.",
        value=float(r.get("failed_steps", 0)),
    )
