"""The static facts of each GPU, joined into samples of schema v2 (pure, in memory).

A v2 sample leaves out what does not change from sample to sample (UUID, thresholds, limits,
maxima, link counts: :data:`shared.frames.STATIC_GPU_FIELDS`); the host's inventory frame carries
them, sent by the agent at start, whenever they change and every few minutes. The ingest loop
passes every accepted frame through :meth:`StaticFacts.join` before storing it, so storage,
health checks, alerts and the API see whole GPU readings as they did with v1 frames.

A sample that arrives before any inventory of its host (a collector that started on an empty
database, a host whose inventory aged out of the stream) is stored and judged with what it
carries: its GPUs have an empty ``uuid`` and ``None`` static fields (checks that need a
threshold fall back as they do for a GPU that does not report it), and it is counted in
:attr:`StaticFacts.unjoined`. The next inventory (at most the agent's inventory interval, 5
minutes, away) completes the samples that follow it. At start the collector seeds the facts
from the newest stored inventory of each host (:meth:`StaticFacts.seed`).
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter, itemgetter
from typing import Any, Final

from msgspec.structs import astuple

from shared.frames import (
    STATIC_GPU_FIELDS,
    Frame,
    GpuInfo,
    GpuSample,
    InventoryFrame,
    SampleFrame,
    fields,
    join_static,
    replace,
)

_static: Final = attrgetter(*STATIC_GPU_FIELDS)
_LEFT_OUT: Final = ("", *(None,) * (len(STATIC_GPU_FIELDS) - 1))  # what a v2 sample's GPU reads
# A GpuSample's fields, in order, from (its own fields + its static facts): the joined GPU is
# made in C (GpuSample(*_JOINED(astuple(gpu) + static))), not by a replace() of 13 keywords.
_SAMPLE_FIELDS: Final = tuple(f.name for f in fields(GpuSample))
_JOINED: Final = itemgetter(
    *(
        len(_SAMPLE_FIELDS) + STATIC_GPU_FIELDS.index(name) if name in STATIC_GPU_FIELDS else i
        for i, name in enumerate(_SAMPLE_FIELDS)
    )
)


class StaticFacts:
    """Per host (provider, host): the GPUs of its newest inventory frame, by index."""

    def __init__(self) -> None:
        # (provider, host) -> (ts of the inventory, index -> (its GpuInfo, its static values as a
        # v2 sample's GPU that leaves them all out reads once joined))
        self._hosts: dict[tuple[str, str], tuple[float, dict[int, tuple[GpuInfo, tuple[Any, ...]]]]] = {}
        self.unjoined = 0  # samples of GPUs without static facts that no inventory could complete

    def __len__(self) -> int:
        return len(self._hosts)

    def seed(self, inventories: Iterable[InventoryFrame]) -> None:
        """Start from stored inventories (the newest of each host wins)."""
        for inv in inventories:
            self._remember(inv)

    def _remember(self, inv: InventoryFrame) -> None:
        key = (inv.provider, inv.host)
        have = self._hosts.get(key)
        if have is None or inv.ts >= have[0]:
            self._hosts[key] = (inv.ts, {g.index: (g, _facts(g)) for g in inv.gpus})

    def join(self, frame: Frame) -> Frame:
        """``frame``, a sample's GPUs completed with their static facts; an inventory is
        remembered. Other frames, and samples that carry their static facts (v1), pass as they are."""
        if type(frame) is InventoryFrame:
            self._remember(frame)
            return frame
        if type(frame) is not SampleFrame or all(g.uuid for g in frame.gpus):
            return frame
        have = self._hosts.get((frame.provider, frame.host))
        infos = have[1] if have is not None else {}
        gpus = []
        missing = False
        for g in frame.gpus:
            if g.uuid:
                gpus.append(g)
                continue
            entry = infos.get(g.index)
            if entry is None:
                missing = True
                gpus.append(g)
            elif _static(g) == _LEFT_OUT:  # the usual case: all left to the inventory
                gpus.append(GpuSample(*_JOINED(astuple(g) + entry[1])))
            else:
                gpus.append(join_static(g, entry[0]))
        if missing:
            self.unjoined += 1
        return replace(frame, gpus=tuple(gpus))


def _facts(info: GpuInfo) -> tuple[Any, ...]:
    """The static values a GPU that left them all out has once joined: the inventory's, or
    what it left out where the inventory has none."""
    return tuple(
        left if value is None else value for value, left in zip(_static(info), _LEFT_OUT, strict=True)
    )
