"""Fault history per physical GPU across boots, and the hardware (RMA) decision from it.

Pure: data and time in, decisions out; no clock, no I/O. The collector persists the boards
(``gpu_history`` table, :mod:`collector.store.history`) and restores them at start.

A **board** is one physical GPU, named by its serial number, else its UUID. It is tracked from
its first fatal XID on: each fatal XID is recorded with its time, code and **boot**; a boot is
the host's kernel boot id when its agent reports one (inventory ``host_facts.kernel_boot_id``),
else the agent's ``boot_id``, so a new boot id is a reboot (an agent restart within one kernel
boot is not). The board remembers the boots it was seen in since it was first tracked, in the
order they began (an agent boot id seen before its inventory named its kernel boot is folded
into that boot); a fatal XID carries its boot's ordinal, so the reboots between two XIDs are
the difference of their ordinals.

:func:`decide` raises ``gpu.rma`` when

- **recurrence**: the same fatal code occurs again after at least ``rma_reboots`` (2) reboots
  since its first occurrence (gpud's reboot threshold: a reboot did not cure it twice), within
  ``rma_history`` (30 days); or
- **window**: the same fatal code occurs ``rma_fatal_xids`` (3) times on the board within
  ``rma_window`` (24 h), whatever the boots and hosts.

A board whose fatal XIDs all aged out of ``rma_history`` is forgotten.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from collector.health.config import GpuThresholds

MAX_FATAL: Final = 64  # fatal XIDs kept per board (the oldest go first)
MAX_BOOTS: Final = 32  # boots remembered per board (older ones only count)
MAX_HOST_BOOTS: Final = 16  # agent boot ids remembered per host (to name their kernel boot)
MAX_HOST_BOARDS: Final = 128  # boards last seen on one host (a churning agent: the stalest go)


def board_id(serial: str | None, uuid: str | None) -> str:
    """The physical GPU's name: its serial number, else its UUID ("" when neither is known)."""
    return (serial or "").strip() or (uuid or "").strip()


@dataclass(slots=True)
class FatalXid:
    """One fatal XID on a board."""

    code: int
    at: float  # Unix seconds
    boot: str  # the boot it happened in (kernel boot id, else the agent's boot id)
    boot_no: int  # the board's boot ordinal then (1 = the first boot it was tracked in)


@dataclass(slots=True)
class BoardHistory:
    """The fault history of one physical GPU."""

    board: str  # serial, else UUID
    serial: str = ""
    uuid: str = ""
    provider: str = ""
    host: str = ""
    gpu: int = 0  # its index when last seen
    boots: list[tuple[str, float]] = field(default_factory=list)  # (boot, first seen), in time order
    dropped: int = 0  # boots dropped from the front of ``boots`` (MAX_BOOTS)
    fatal: list[FatalXid] = field(default_factory=list)  # oldest first
    updated_at: float = 0.0

    @property
    def boot_count(self) -> int:
        """Boots seen since the board was first tracked."""
        return self.dropped + len(self.boots)

    def ordinal(self, boot: str) -> int | None:
        for i, (b, _) in enumerate(self.boots):
            if b == boot:
                return self.dropped + i + 1
        return None

    def see(self, boot: str, at: float) -> None:
        """The board was seen in ``boot`` at ``at``; boots stay in the order they began."""
        for i, (b, first) in enumerate(self.boots):
            if b == boot:
                if at < first:
                    self.boots[i] = (b, at)
                    self.boots.sort(key=lambda x: x[1])
                    self._renumber()
                return
        self.boots.append((boot, at))
        self.boots.sort(key=lambda x: x[1])
        if len(self.boots) > MAX_BOOTS:
            n = len(self.boots) - MAX_BOOTS
            del self.boots[:n]
            self.dropped += n
        self._renumber()

    def rename_boot(self, old: str, new: str) -> bool:
        """Boot ``old`` (an agent's boot id) is kernel boot ``new``: one boot, not two."""
        i = next((k for k, (b, _) in enumerate(self.boots) if b == old), None)
        events = [e for e in self.fatal if e.boot == old]
        if i is None and not events:
            return False
        at = self.boots.pop(i)[1] if i is not None else min(e.at for e in events)
        j = next((k for k, (b, _) in enumerate(self.boots) if b == new), None)
        if j is None:
            self.boots.append((new, at))
        else:
            self.boots[j] = (new, min(at, self.boots[j][1]))
        self.boots.sort(key=lambda x: x[1])
        for e in events:
            e.boot = new
        self._renumber()
        return True

    def _renumber(self) -> None:
        for e in self.fatal:
            n = self.ordinal(e.boot)
            if n is not None:
                e.boot_no = n

    def to_dict(self) -> dict[str, Any]:
        return {
            "board": self.board,
            "serial": self.serial,
            "uuid": self.uuid,
            "provider": self.provider,
            "host": self.host,
            "gpu": self.gpu,
            "boots": [[b, at] for b, at in self.boots],
            "dropped": self.dropped,
            "fatal": [[e.code, e.at, e.boot, e.boot_no] for e in self.fatal],
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BoardHistory:
        fatal = [FatalXid(int(c), float(at), str(boot), int(no)) for c, at, boot, no in d.get("fatal", [])]
        boots = [(str(b), float(at)) for b, at in d.get("boots", [])]
        s = {k: str(d.get(k) or "") for k in ("serial", "uuid", "provider", "host")}
        return cls(
            str(d["board"]),
            s["serial"],
            s["uuid"],
            s["provider"],
            s["host"],
            int(d.get("gpu") or 0),
            boots,
            int(d.get("dropped") or 0),
            fatal,
            float(d.get("updated_at") or 0.0),
        )


@dataclass(frozen=True, slots=True)
class RmaDecision:
    """Why a board needs hardware inspection / RMA, with the evidence."""

    rule: str  # "recurrence" or "window"
    code: int  # the fatal XID code
    evidence: tuple[FatalXid, ...]  # oldest first
    reboots: int  # reboots between the first and the last evidence
    until: float  # the decision holds until then (Unix seconds), unless new evidence extends it

    def summary(self, gpu: int, board: str) -> str:
        if self.rule == "recurrence":
            why = f"fatal XID {self.code} recurred after {self.reboots} reboots"
        else:
            why = f"fatal XID {self.code} {len(self.evidence)} times within the window"
        return f"GPU {gpu} (board {board}): {why}: hardware inspection / RMA"

    def evidence_text(self) -> str:
        """``XID 79 at 2026-11-28T10:00:00Z (boot 3f2a…, boot #1); …``"""
        return "; ".join(
            f"XID {e.code} at {_iso(e.at)} (boot {e.boot[:12]}, boot #{e.boot_no})" for e in self.evidence
        )


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(slots=True)
class FleetHistory:
    """Every tracked board, and what maps frames to boards and boots.

    ``dirty`` and ``deleted`` name the boards changed or forgotten since the caller last took
    them (:meth:`take_changes`), for persistence; ``deleted`` with the time of the newest fatal
    XID the board held when it was forgotten (its stored row is deleted only if it holds none
    newer: :func:`merge`).
    """

    boards: dict[str, BoardHistory] = field(default_factory=dict)
    by_uuid: dict[str, str] = field(default_factory=dict)  # UUID -> board
    slots: dict[str, tuple[str, str]] = field(default_factory=dict)  # "host/index" -> (uuid, serial)
    host_boots: dict[str, dict[str, str]] = field(default_factory=dict)  # host -> agent boot id -> boot
    dirty: dict[str, None] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, boards: Iterable[BoardHistory]) -> FleetHistory:
        h = cls()
        for b in boards:
            h.boards[b.board] = b
            if b.uuid:
                h.by_uuid[b.uuid] = b.board
        return h

    def take_changes(self) -> tuple[list[BoardHistory], list[tuple[str, float]]]:
        """The boards changed, and the boards forgotten (with the time of the newest fatal XID
        each held then), since the last call."""
        changed = [self.boards[b] for b in self.dirty if b in self.boards]
        gone = [(b, at) for b, at in self.deleted.items() if b not in self.boards]
        self.dirty, self.deleted = {}, {}
        return changed, gone

    def absorb(self, stored: Iterable[BoardHistory]) -> None:
        """Take in boards as stored (where another writer, a collector group's member, may have
        recorded fatal XIDs and boots this one has not seen): a tracked board gains what it
        lacked (:func:`merge`), an untracked one is tracked, one forgotten here and not written
        yet stays forgotten; nothing is marked changed."""
        for w in stored:
            if w.board in self.deleted:
                continue
            b = self.boards.get(w.board)
            self.boards[w.board] = merge(w, b) if b is not None else w
            if b is None and w.uuid:
                self.by_uuid.setdefault(w.uuid, w.board)

    def boot_of(self, host: str, agent_boot: str) -> str:
        """The boot of a frame of ``host`` sent by the agent run ``agent_boot``: the kernel's
        boot id its inventory named, else the agent's boot id."""
        return self.host_boots.get(host, {}).get(agent_boot, agent_boot)

    def forget_host(self, host: str) -> None:
        """Drop what maps ``host``'s frames to boards and boots (its boards keep their history)."""
        self.host_boots.pop(host, None)
        prefix = f"{host}/"
        for slot in [s for s in self.slots if s.startswith(prefix)]:
            del self.slots[slot]

    def _mark(self, b: BoardHistory, now: float) -> None:
        b.updated_at = max(b.updated_at, now)
        self.dirty[b.board] = None

    def _forget(self, board: str) -> None:
        b = self.boards.pop(board, None)
        if b is not None and self.by_uuid.get(b.uuid) == board:
            del self.by_uuid[b.uuid]
        self.dirty.pop(board, None)
        self.deleted[board] = b.fatal[-1].at if b is not None and b.fatal else 0.0

    def inventory(
        self,
        host: str,
        provider: str,
        agent_boot: str,
        kernel_boot: str | None,
        gpus: Iterable[tuple[int, str, str | None]],
        at: float,
    ) -> list[BoardHistory]:
        """An inventory frame (sent at ``at``): its boot, and each GPU's ``(index, uuid, serial)``.

        Tracked boards seen here count the boot; an agent boot id seen earlier (an event judged
        before its inventory) becomes the kernel boot it names; a board first tracked by its
        UUID (the serial was not known yet) takes its serial's name. Returns the boards whose
        fatal XIDs had been recorded under the agent's boot id (judged before this inventory):
        their boots are known now, so the caller decides them again.
        """
        boot = kernel_boot or agent_boot
        known = self.host_boots.setdefault(host, {})
        resolved: list[BoardHistory] = []
        if known.get(agent_boot) != boot:
            known[agent_boot] = boot
            while len(known) > MAX_HOST_BOOTS:
                del known[next(iter(known))]
            for seen in self.boards.values():
                if seen.host == host and seen.rename_boot(agent_boot, boot):
                    self._mark(seen, at)
                    resolved.append(seen)
        for index, uuid, serial in gpus:
            self.slots[f"{host}/{index}"] = (uuid, serial or "")
            name = board_id(serial, uuid)
            if not name:
                continue
            b = self.boards.get(name)
            if b is None and uuid and (old := self.by_uuid.get(uuid)) is not None and old != name:
                b = self._rename(old, name)
            if b is None:
                continue  # not tracked: nothing to count until its first fatal XID
            b.serial, b.uuid, b.host, b.provider, b.gpu = (
                serial or b.serial,
                uuid or b.uuid,
                host,
                provider,
                index,
            )
            if uuid:
                self.by_uuid[uuid] = name
            b.see(boot, at)
            self._mark(b, at)
        return resolved

    def _rename(self, old: str, new: str) -> BoardHistory | None:
        b = self.boards.get(old)
        if b is None:
            return None
        self._forget(old)  # (its fatal XIDs go with it: its stored row goes)
        b.board = new
        self.boards[new] = b
        return b

    def board_for(self, host: str, index: int, uuid: str) -> str:
        """The board of GPU ``index`` (UUID ``uuid``) on ``host``: from its inventory's serial,
        else a tracked board with that UUID, else the UUID."""
        slot = self.slots.get(f"{host}/{index}")
        if slot is not None and (not uuid or slot[0] == uuid):
            return board_id(slot[1], slot[0] or uuid)
        if uuid and uuid in self.by_uuid:
            return self.by_uuid[uuid]
        return board_id(None, uuid)

    def fatal_xid(
        self,
        host: str,
        provider: str,
        index: int,
        uuid: str,
        code: int,
        at: float,
        agent_boot: str,
        cfg: GpuThresholds,
    ) -> tuple[BoardHistory, RmaDecision | None] | None:
        """Record a fatal XID on its board and decide; ``None`` when the GPU has no name."""
        name = self.board_for(host, index, uuid)
        if not name:
            return None
        b = self.boards.get(name)
        if b is None:
            mine = [x for x in self.boards.values() if x.host == host]
            if len(mine) >= MAX_HOST_BOARDS:  # new UUIDs with fatal XIDs in every frame: bounded
                self._forget(min(mine, key=lambda x: x.updated_at).board)
            serial = self.slots.get(f"{host}/{index}", ("", ""))[1]
            b = self.boards[name] = BoardHistory(name, serial, uuid)
        b.host, b.provider, b.gpu = host, provider, index
        if uuid:
            b.uuid = uuid
            self.by_uuid[uuid] = name
        known = self.host_boots.get(host, {})
        boot = known.get(agent_boot, agent_boot)
        # An agent boot id no inventory of this host named yet (judged before it, or the collector
        # restarted since): maybe a reboot, maybe only the agent restarted. Counted as the latest
        # known boot (no premature RMA) until an inventory says; then decided again.
        provisional = agent_boot not in known and bool(b.boots)
        if not provisional:
            b.see(boot, at)
        if any(e.code == code and e.at == at for e in b.fatal):  # the same event again (redelivered)
            return b, decide(b, at, cfg)
        b.fatal.append(FatalXid(code, at, boot, b.ordinal(boot) or b.boot_count))
        b.fatal.sort(key=lambda e: e.at)  # a late frame keeps the order
        if len(b.fatal) > MAX_FATAL:
            del b.fatal[: len(b.fatal) - MAX_FATAL]
        self._mark(b, at)
        return b, decide(b, at, cfg)

    def expire(self, now: float, cfg: GpuThresholds) -> None:
        """Forget fatal XIDs older than ``rma_history`` and the boards left without any."""
        cutoff = now - cfg.rma_history
        for name in [n for n, b in self.boards.items() if not b.fatal or b.fatal[-1].at < cutoff]:
            self._forget(name)
        for b in self.boards.values():
            if b.fatal[0].at < cutoff:
                b.fatal[:] = [e for e in b.fatal if e.at >= cutoff]
                self._mark(b, now)


def merge(stored: BoardHistory, mine: BoardHistory, cutoff: float = 0.0) -> BoardHistory:
    """``mine``, a writer's view of a board, merged into ``stored``, the board as saved (maybe by
    another writer: a collector group's members each hold the fleet's history): the union of
    their fatal XIDs by event identity (code and time: an event judged by both, or judged again
    after a redelivery, is one) and of their boots (the earlier first sight of each), so neither
    writer's update is lost and none is counted twice. ``mine`` wins the board's names, place
    and an event's boot (it may have learnt the kernel boot of an agent boot id). Stored fatal
    XIDs before ``cutoff`` (aged out of ``rma_history`` for the writer) are dropped."""
    out = BoardHistory.from_dict(mine.to_dict())
    firsts = dict(out.boots)
    for boot, at in stored.boots:
        firsts[boot] = min(at, firsts.get(boot, at))
    boots = sorted(firsts.items(), key=lambda x: x[1])
    out.dropped = max(stored.dropped, mine.dropped)
    if len(boots) > MAX_BOOTS:
        out.dropped += len(boots) - MAX_BOOTS
        del boots[: len(boots) - MAX_BOOTS]
    out.boots = boots
    known = {(e.code, e.at) for e in out.fatal}
    out.fatal += [
        FatalXid(e.code, e.at, e.boot, e.boot_no)
        for e in stored.fatal
        if (e.code, e.at) not in known and e.at >= cutoff
    ]
    out.fatal.sort(key=lambda e: e.at)
    if len(out.fatal) > MAX_FATAL:
        del out.fatal[: len(out.fatal) - MAX_FATAL]
    out._renumber()
    out.updated_at = max(stored.updated_at, mine.updated_at)
    return out


def still_needed(stored: BoardHistory, known: float) -> bool:
    """Whether a board's stored row holds a fatal XID newer than ``known``, the newest one a
    writer that forgot the board had seen (another writer recorded it since): the row stays."""
    return any(e.at > known for e in stored.fatal)


def decide(b: BoardHistory, now: float, cfg: GpuThresholds) -> RmaDecision | None:
    """The hardware decision for board ``b`` at ``now``, or ``None``.

    Recurrence wins over the window when both hold; of several codes, the one with the most
    reboots (then the most recent) is reported.
    """
    recent = [e for e in b.fatal if now - e.at <= cfg.rma_history]  # (an agent's clock may run ahead)
    by_code: dict[int, list[FatalXid]] = {}
    for e in recent:
        by_code.setdefault(e.code, []).append(e)
    best: RmaDecision | None = None
    for code, evs in by_code.items():
        reboots = evs[-1].boot_no - evs[0].boot_no
        if reboots >= cfg.rma_reboots:
            firsts: dict[int, FatalXid] = {}
            for e in evs:
                firsts.setdefault(e.boot_no, e)  # one per boot: the first
            d = RmaDecision("recurrence", code, tuple(firsts.values()), reboots, evs[-1].at + cfg.rma_history)
            if best is None or (d.reboots, d.evidence[-1].at) > (best.reboots, best.evidence[-1].at):
                best = d
    if best is not None:
        return best
    for code, evs in by_code.items():
        window = [e for e in evs if now - e.at < cfg.rma_window]
        n = cfg.rma_fatal_xids
        if len(window) >= n:
            d = RmaDecision(
                "window",
                code,
                tuple(window),
                window[-1].boot_no - window[0].boot_no,
                window[-n].at + cfg.rma_window,
            )
            if best is None or d.evidence[-1].at > best.evidence[-1].at:
                best = d
    return best
