"""Silences, acknowledgements and maintenance windows group-wide, at once.

PostgreSQL is the source of truth: a silence (a maintenance window is a silence with a start)
is in the ``silences`` table, an acknowledgement received by a member that does not own the
alert's host is a row of ``group_commands``. A member that writes one publishes a notice on
the group's control subject (core NATS, outside the ``gpuwarden.v1`` telemetry subjects);
every member then *sweeps*: it adds the silences PostgreSQL has and it lacks, drops those
PostgreSQL says expired, and applies the pending commands of the buckets it holds (the owner
of an alert is the only member that holds it) before marking them done. A notice missed
(NATS away, a member starting) costs a round: members also sweep every ``interval`` and
after each NATS reconnection, and a member that takes a bucket sweeps at once, so an
acknowledgement left by a dead owner is applied by its taker. See docs/operations.md.

An acknowledgement on a member that does not own the alert is a request on the control
subject: the owner answers once it has applied it (the alert's view), so the API answers as
on the owner; with no owner at the moment (a takeover) the command waits in PostgreSQL.

An incident's acknowledgement is applied by the incident's holder (a provider-wide one: its
judge), which then asks the owners of its members on other members' hosts to acknowledge
them as its members (:meth:`GroupCommands.ack_members`: an ``ack`` row naming the incident per
alert), before its own command is marked done (a judge that dies in between leaves the
command to its taker, which applies it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from collector.alerts import model as m
from collector.alerts.config import Silence
from collector.config import CollectorConfig
from collector.group.scope import Scope
from collector.store import alerts as pg
from collector.store import db
from shared.errors import ConfigError
from shared.tasks import cancel_all

log = logging.getLogger(__name__)

_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError)
Asked = Mapping[str, Mapping[str, str] | None]  # an incident's members: fingerprint -> labels, if known
GIVE_UP = 600.0  # s: a command whose alert its bucket's owner does not hold is dropped after it


def control_subject(kv_bucket: str) -> str:
    """The group's control subject (one per group: its KV bucket names it)."""
    return f"gpuwarden.control.{kv_bucket}"


class Member(Protocol):
    """:class:`collector.group.member.GroupMember`, as read here."""

    config: CollectorConfig
    name: str

    def nc(self) -> NatsClient | None: ...

    def pool(self) -> asyncpg.Pool | None: ...


class Runner(Protocol):
    alerts_state: m.AlertState

    async def apply(self, commands: Sequence[m.Command]) -> bool: ...  # True: written

    async def forget_host(self, host: str, *, forward: bool = True) -> dict[str, Any]: ...

    def answer(self, kind: str, target: str) -> dict[str, Any] | None: ...  # the view, if held


@dataclass(eq=False)
class GroupCommands:
    """A member's part (after the group member in the lifecycle): the subscription to the
    control subject, the periodic sweep, and the API's writes for what another member owns.
    ``alert_view`` is the API's view of an alert (the stored one is answered when no owner
    answers). Sweeps without a notice come every ``[collector] lease``."""

    group: Member  # this member (its name, NATS and PostgreSQL, the group's settings)
    scope: Scope
    runner: Runner
    alert_view: Callable[[m.Alert], dict[str, Any]] = m.plain
    answer_within: float = 5.0
    sweeps: int = 0
    applied: int = 0  # commands applied by this member
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one sweep at a time
    _sub: Any = None
    _task: asyncio.Task[None] | None = None
    _kick: asyncio.Event = field(default_factory=asyncio.Event)
    _forgot: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> the forget's answer

    @property
    def group_kv(self) -> str:
        """The group's identity: its commands in ``group_commands`` are its own (migration 0013)."""
        return self.group.config.collector.group_kv

    @property
    def subject(self) -> str:
        return control_subject(self.group_kv)

    @property
    def interval(self) -> float:
        return self.group.config.collector.lease

    @property
    def member(self) -> str:
        return self.group.name

    def nc(self) -> NatsClient | None:
        return self.group.nc()

    def pool(self) -> asyncpg.Pool | None:
        return self.group.pool()

    async def start(self) -> None:
        nc = self.nc()
        assert nc is not None, "NATS starts before the group's commands"
        self._sub = await nc.subscribe(self.subject, cb=self._on_notice)
        self._task = asyncio.create_task(self._loop(), name="group-commands")

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._sub.unsubscribe()
            self._sub = None
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None

    def kick(self) -> None:
        """Sweep soon (e.g. buckets were gained: their pending commands are this member's now)."""
        self._kick.set()

    async def _loop(self) -> None:
        """Sweep every ``interval``, when kicked, and after a NATS reconnection (a notice may
        have been missed while disconnected)."""
        reconnects = self._reconnects()
        waited = 0.0
        while True:
            step = min(1.0, self.interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), step)
            waited += step
            now = self._reconnects()
            if not self._kick.is_set() and now == reconnects and waited < self.interval:
                continue
            self._kick.clear()
            reconnects, waited = now, 0.0
            try:
                await self.sweep()
            except db.ERRORS as e:
                log.warning("group commands not read (retried): %s", e)

    def _reconnects(self) -> int:
        nc = self.nc()
        return int(nc.stats.get("reconnects", 0)) if nc is not None else 0

    # ------------------------------------------------------------------ applying

    async def sweep(self) -> None:
        """Apply what PostgreSQL has and this member lacks (see the module)."""
        pool = self.pool()
        if pool is None:
            return
        async with self._lock:
            state = self.runner.alerts_state
            # held before PostgreSQL is read: a silence this member expires while the sweep
            # reads (the API does not wait for the sweep) is not added back from that read
            known = set(state.silences)
            async with pool.acquire() as conn:
                active = await pg.active_silences(conn)
                held = [sid for sid in state.silences if sid.startswith("api-")]
                ended = await conn.fetch(
                    "SELECT id FROM silences WHERE id = ANY($1::text[])"
                    " AND (expired_at IS NOT NULL OR ends_at <= now())",
                    held,
                )
                pending = await conn.fetch(
                    "SELECT id, kind, target, bucket, by_name, until_at, comment, incident,"
                    " extract(epoch FROM created_at)::float8 AS at FROM group_commands"
                    " WHERE done_at IS NULL AND group_kv IN ($1, '') ORDER BY id",  # '': from before 0013
                    self.group_kv,
                )
            cmds: list[m.Command] = [
                m.AddSilence(Silence.from_dict(d))
                for d in active
                if d["id"] not in known and d["id"] not in state.silences
            ]
            cmds += [m.ExpireSilence(r["id"]) for r in ended]
            mine = [r for r in pending if self.scope.owns(r["bucket"])]
            forgets = [r for r in mine if r["kind"] == "forget"]
            mine = [r for r in mine if r["kind"] != "forget"]
            cmds += [_command(r) for r in mine if not _applied(state, r)]
            self.sweeps += 1
            if not cmds and not mine and not forgets:
                return
            forgot = [r["id"] for r in forgets if await self._forget(r["target"])]
            written = await self.runner.apply(cmds) if cmds else True
            # done: applied to the alert (incident) held; not found (not restored yet, or gone)
            # it is tried again at the next sweeps, for ``GIVE_UP`` seconds
            now, holding = time.time(), self.runner.alerts_state
            done = [
                r["id"] for r in mine
                if self.scope.owns(r["bucket"]) and (_holds(holding, r) or now - r["at"] > GIVE_UP)
            ]  # fmt: skip
            done = done if written else []
            done += forgot
            if done:
                async with pool.acquire() as conn:
                    await conn.execute(
                        "UPDATE group_commands SET done_at = now(), done_by = $2"
                        " WHERE id = ANY($1::bigint[]) AND done_at IS NULL",
                        done,
                        self.member,
                    )
                self.applied += len(done)
            if cmds:
                log.info(
                    "group commands applied: %d silences added, %d ended, %d acknowledgements",
                    sum(isinstance(c, m.AddSilence) for c in cmds), len(ended), len(mine),
                )  # fmt: skip

    async def _on_notice(self, msg: Msg) -> None:
        try:
            await self.sweep()
        except db.ERRORS as e:
            log.warning("group commands not read (retried): %s", e)
            return
        if not msg.reply:
            return
        try:
            ask = json.loads(msg.data)
            bucket = int(ask["bucket"])
            kind, target = str(ask["kind"]), str(ask["target"])
            if not self.scope.owns(bucket):
                view = None
            elif kind == "forget":
                view = self._forgot.get(target)
            else:
                view = self.runner.answer(kind, target)
        except (ValueError, KeyError, TypeError):
            return
        if view is not None:  # only the owner answers
            with contextlib.suppress(*_NATS_ERRORS):
                await msg.respond(json.dumps(view).encode())

    # ------------------------------------------------------------------ the API's writes

    async def notify(self) -> None:
        """Tell the other members to sweep now (a silence was added or expired here)."""
        nc = self.nc()
        if nc is None:
            return  # they sweep within ``interval``
        try:
            await nc.publish(self.subject, b"{}")
        except _NATS_ERRORS as e:
            log.warning("group notice not sent (the others sweep within %.0f s): %s", self.interval, e)

    async def expire_silence(self, sid: str) -> bool:
        """A silence this member does not hold yet: expired in PostgreSQL, then told."""
        async with self._acquire() as conn:
            got = await conn.fetchval(
                "UPDATE silences SET expired_at = now() WHERE id = $1 AND expired_at IS NULL"
                " AND ends_at > now() RETURNING id",
                sid,
            )
        if got is None:
            return False
        await self.notify()
        return True

    async def ack(self, fingerprint: str, by: str, until: float | None, comment: str) -> dict[str, Any]:
        """Acknowledge an alert another member owns; ``KeyError`` if PostgreSQL has no such
        alert not resolved. The owner's view of it, or (no owner answered within
        ``answer_within``) the stored alert with ``ack_pending: true``."""
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT labels, data FROM alerts WHERE fingerprint = $1 AND state <> 'resolved'", fingerprint
            )
        if row is None:
            raise KeyError(fingerprint)
        bucket = self.scope.of_labels(json.loads(row["labels"]))
        if bucket is None:  # a member's own self-check alert: only that member holds it
            raise KeyError(fingerprint)
        return await self._ask("ack", fingerprint, bucket, by, until, comment, json.loads(row["data"]))

    async def ack_incident(self, iid: str, by: str, until: float | None, comment: str) -> dict[str, Any]:
        """:meth:`ack` for an open incident another member holds."""
        async with self._acquire() as conn:
            row = await conn.fetchrow(
                "SELECT host, data FROM incidents WHERE id = $1 AND closed_at IS NULL", iid
            )
        if row is None:
            raise KeyError(iid)
        data = json.loads(row["data"])
        # a host's incident goes with its host, a provider-wide one with its provider (its judge)
        bucket = self.scope.of_payload({"labels": {"host": row["host"], "provider": data.get("provider")}})
        if bucket is None:
            raise KeyError(iid)
        return await self._ask("ack_incident", iid, bucket, by, until, comment, data)

    async def ack_members(self, iid: str, members: Asked, by: str, until: float | None, comment: str) -> int:
        """This member's incident ``iid`` was acknowledged: its ``members`` (fingerprint -> labels,
        ``None`` when this member's view of the others lacks the alert: read from PostgreSQL)
        that other members own are acknowledged by their owners as its members, each by an
        ``ack`` command naming the incident (the owner leaves one acknowledged already as it is,
        and one resolved). Durable before it returns; the owners are told at once (no answer is
        waited for). The number of commands written."""
        labels = {fp: dict(lb) for fp, lb in members.items() if lb is not None}
        unknown = [fp for fp, lb in members.items() if lb is None]
        async with self._acquire() as conn:
            if unknown:
                rows = await conn.fetch(
                    "SELECT fingerprint, labels FROM alerts WHERE fingerprint = ANY($1::text[])"
                    " AND state <> 'resolved'",
                    unknown,
                )
                labels.update((r["fingerprint"], json.loads(r["labels"])) for r in rows)
            cmds = [(fp, b) for fp, lb in labels.items() if (b := self.scope.of_labels(lb)) is not None]
            if cmds:
                await conn.executemany(
                    "INSERT INTO group_commands"
                    " (kind, target, bucket, by_name, until_at, comment, incident, group_kv)"
                    " VALUES ('ack', $1, $2, $3, $4, $5, $6, $7)",
                    [(fp, b, by, until, comment, iid, self.group_kv) for fp, b in cmds],
                )
        if cmds:
            await self.notify()
            log.info("incident %s acknowledged: %d members on other members' hosts asked", iid, len(cmds))
        return len(cmds)

    async def forget(self, host: str) -> dict[str, Any]:
        """Forget a host of another member's bucket: a ``forget`` command its owner applies
        (``DELETE /api/v1/hosts/{host}`` on any member). The owner's answer; ``KeyError`` when
        the owner does not know the host; with no owner answering within ``answer_within``
        (a takeover), the command waits in PostgreSQL: ``forget_pending: true``."""
        bucket = self.scope.bucket(host)
        if bucket is None:
            raise KeyError(host)
        got = await self._ask("forget", host, bucket, "", None, "", {})
        if got.get("error") == "not_found":
            raise KeyError(host)
        if got.pop("ack_pending", False):
            return {"host": host, "forgotten": True, "forget_pending": True}
        return got

    async def _forget(self, host: str) -> bool:
        """Apply a ``forget`` command of a bucket held: done (the host forgotten, or unknown
        here), or not (its bucket moved meanwhile: left for its new owner)."""
        try:
            self._forgot[host] = await self.runner.forget_host(host, forward=False)
        except KeyError:
            self._forgot[host] = {"error": "not_found", "host": host}
        except ConfigError:
            return False
        if len(self._forgot) > 1000:  # answers are asked for within seconds
            self._forgot.pop(next(iter(self._forgot)))
        log.info("host %s forgotten at another member's request", host)
        return True

    async def _ask(
        self,
        kind: str,
        target: str,
        bucket: int,
        by: str,
        until: float | None,
        comment: str,
        stored: Mapping[str, Any],
    ) -> dict[str, Any]:
        async with self._acquire() as conn:
            cid = await conn.fetchval(
                "INSERT INTO group_commands (kind, target, bucket, by_name, until_at, comment, group_kv)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                kind, target, bucket, by, until, comment, self.group_kv,
            )  # fmt: skip
        ask = json.dumps({"id": cid, "kind": kind, "target": target, "bucket": bucket}).encode()
        nc = self.nc()
        if nc is not None:
            try:
                reply = await nc.request(self.subject, ask, timeout=self.answer_within)
                answered: dict[str, Any] = json.loads(reply.data)
                return answered
            except _NATS_ERRORS + (ValueError,) as e:
                log.warning("%s of %s stored, not applied yet (no owner answered: %s)", kind, target, e)
        view = (
            self.alert_view(m.Alert(**{**stored, "labels": dict(stored["labels"])}))
            if kind == "ack"
            else dict(stored)
        )
        return {**view, "ack_pending": True}

    def _acquire(self) -> Any:
        pool = self.pool()
        if pool is None:
            raise asyncpg.InterfaceError("PostgreSQL is not connected")
        return pool.acquire()


def _command(r: asyncpg.Record) -> m.Command:
    if r["kind"] == "ack_incident":
        return m.AckIncident(r["target"], r["by_name"], r["until_at"], r["comment"])
    return m.Ack(r["target"], r["by_name"], r["until_at"], r["comment"], r["incident"])


def _holds(state: m.AlertState, r: asyncpg.Record) -> bool:
    return (r["target"] in state.by_fp) if r["kind"] == "ack" else (r["target"] in state.incidents)


def _applied(state: m.AlertState, r: asyncpg.Record) -> bool:
    """Applied already (by this member, or by an owner that died before marking it done): an
    alert acknowledged by the same name since the command was written; for an incident's
    member, acknowledged at all (it is acknowledged as the incident's only if it was not)."""
    if r["kind"] != "ack":
        return False
    a = state.by_fp.get(r["target"])
    if a is not None and r["incident"] is not None:
        return a.ack_by is not None
    return a is not None and a.ack_by == r["by_name"] and (a.ack_at or 0.0) >= r["at"] - 1.0
