"""Runs remediation inside the collector: plans (pure engine), persists, executes, audits.

A loop wakes on each batch of alert transitions (``kick``) and at least every second, asks
:func:`collector.remediation.engine.plan` what to do, writes the changed actions, breakers
and audit events to PostgreSQL in one transaction and only then runs the actions it
started, one task per action, steps in order, each outcome written before the next step.
A collector that restarts reloads the open actions: a running one re-runs its current step
(the Slurm steps look at the node first, so a node is drained once and resumed only from
gpuwarden's own drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import asyncpg

from collector.health.model import CRITICAL, HEALTHY, Observation, labels_key
from collector.remediation import engine, store
from collector.remediation.config import RemediationConfig
from collector.remediation.engine import RUNNING, AlertView, Plan, RemediationState
from collector.remediation.executors import Executor
from collector.store import db
from shared.tasks import cancel_all

log = logging.getLogger(__name__)
BREAKER_CHECK = "remediation.breaker"


class Remediator:
    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | None],
        cfg: RemediationConfig,
        alerts: Callable[[], Iterable[AlertView]],
        alert_json: Callable[[str], Mapping[str, Any] | None],
        provider_hosts: Callable[[], Mapping[str, int]],
    ) -> None:
        self.pool, self.cfg = pool, cfg
        self.alerts, self.alert_json, self.provider_hosts = alerts, alert_json, provider_hosts
        self.state = RemediationState()
        self.executor = Executor(cfg)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._pending = Plan()  # decided but not yet written
        self._told: dict[str, bool] = {}  # provider -> breaker open, as last observed
        self.loaded = False
        self.counts = {"plans": 0, "steps": 0, "failed_steps": 0, "persist_errors": 0}

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.rules)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        pool = self.pool()
        if not self.enabled or pool is None:
            return
        keep = max(self.cfg.cooldown, self.cfg.breaker.window)
        async with pool.acquire() as conn:
            self.state = await store.load(conn, time.time() - keep)
        self.loaded = True
        for aid, a in self.state.actions.items():  # interrupted by the restart: re-run its step
            if a.state == RUNNING:
                self._launch(aid)
        self._task = asyncio.create_task(self._loop(), name="remediation")

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        tasks = [t for t in (self._task, *self._runs.values()) if t is not None]
        self._task, self._runs = None, {}
        await cancel_all(tasks)
        with contextlib.suppress(*db.ERRORS):
            await self._flush()
        await self.executor.close()

    def kick(self) -> None:
        """Alert transitions happened: plan soon."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                await self.step(time.time())
            except db.ERRORS as e:
                self.counts["persist_errors"] += 1
                log.warning("remediation state not persisted, will retry: %s", e)

    async def step(self, now: float) -> None:
        async with self._lock:
            p = engine.plan(self.state, self.cfg, self.alerts(), now, self.provider_hosts())
            self.counts["plans"] += 1
            self._merge(p)
            await self._flush()  # raises while PostgreSQL is down: nothing runs before it is written
            for aid, a in self.state.actions.items():  # p.run, and any whose earlier write failed
                if a.state == RUNNING:
                    self._launch(aid)

    def _merge(self, p: Plan) -> None:
        q = self._pending
        q.events += p.events
        q.changed |= p.changed
        q.breakers |= p.breakers
        for e in p.events:
            if e.event in ("blocked", "failed", "breaker_tripped", "denied", "approved", "undone"):
                log.info("remediation %s %s: %s", e.event, e.action_id or e.provider, e.why)

    async def _flush(self) -> None:
        q = self._pending
        pool = self.pool()
        if not (q.events or q.changed or q.breakers) or pool is None:
            return
        acts = [self.state.actions[a] for a in q.changed if a in self.state.actions]
        brs = [self.state.breakers[b] for b in q.breakers if b in self.state.breakers]
        async with pool.acquire() as conn:
            await store.save(conn, acts, brs, q.events)
        self._pending = Plan()

    def _launch(self, aid: str) -> None:
        if aid not in self._runs:
            self._runs[aid] = asyncio.create_task(self._run(aid), name=f"remediation-{aid}")

    async def _run(self, aid: str) -> None:
        try:
            while not self._stop.is_set():
                act = self.state.actions.get(aid)
                if act is None or act.state != RUNNING:
                    return
                idx = engine.current_step(self.cfg, act)
                if idx is None:
                    async with self._lock:
                        p = Plan()
                        engine.advance(self.state, self.cfg, aid, time.time(), p, None)
                        self._merge(p)
                        await self._flush_retrying()
                    continue
                rule = {r.name: r for r in self.cfg.rules}[act.rule]
                step = rule.steps[idx]
                alert = self.alert_json(act.fingerprint) or {"id": act.fingerprint, "rule": act.alert_rule}
                res = await self.executor.run(act, step, alert)
                self.counts["steps"] += 1
                if not res.ok:
                    self.counts["failed_steps"] += 1
                async with self._lock:
                    p = engine.step_done(self.state, self.cfg, aid, res, time.time(), step=step.describe())
                    self._merge(p)
                    await self._flush_retrying()
        finally:
            self._runs.pop(aid, None)
            self._wake.set()  # a running slot is free

    async def _flush_retrying(self) -> None:
        """A step's outcome must be written before the next step runs (idempotence)."""
        delay = 0.5
        while True:
            try:
                await self._flush()
                return
            except db.ERRORS as e:
                self.counts["persist_errors"] += 1
                log.warning("remediation outcome not persisted, retrying: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # ------------------------------------------------------------------ commands

    async def decide(self, aid: str, approve: bool, who: str, comment: str = "") -> dict[str, Any]:
        async with self._lock:
            p = engine.decide(self.state, aid, approve, who, time.time(), comment)
            self._merge(p)
            await self._flush()
        self._wake.set()
        return self.state.actions[aid].to_dict()

    async def reset_breaker(self, provider: str, who: str) -> dict[str, Any]:
        async with self._lock:
            p = engine.reset_breaker(self.state, provider, who, time.time())
            self._merge(p)
            await self._flush()
        self._wake.set()
        return self.state.breakers[provider].to_dict()

    # ------------------------------------------------------------------ alerts and views

    def observations(self, now: float) -> list[Observation]:
        """``remediation.breaker`` per provider: critical while its breaker is open (pages once,
        through the alert engine and its routing), healthy when reset."""
        out = []
        for b in self.state.breakers.values():
            is_open = b.tripped_at is not None
            if not is_open and not self._told.get(b.provider, False):
                continue
            # not the provider's label: the collector's own condition must not count as one of the
            # provider's failing hosts (provider incidents)
            labels = {"host": f"remediation/{b.provider}", "breaker": b.provider}
            self._told[b.provider] = is_open
            status = CRITICAL if is_open else HEALTHY
            summary = (
                f"remediation circuit breaker open for {b.provider}: nothing more is done; {b.reason}; "
                "reset: POST /api/v1/remediation/breakers/{provider}/reset"
                if is_open
                else f"remediation circuit breaker for {b.provider} reset"
            )
            out.append(
                Observation(
                    BREAKER_CHECK,
                    status,
                    labels,
                    labels_key(BREAKER_CHECK, labels),
                    now,
                    float(len(b.hosts)),
                    summary,
                    b.reason,
                    immediate=True,
                )
            )
        return out

    def stats(self) -> dict[str, Any]:
        """Figures for ``/metrics``."""
        by: dict[str, int] = {}
        for a in self.state.actions.values():
            by[a.state] = by.get(a.state, 0) + 1
        return {
            **self.counts,
            "actions": by,
            "breakers": {b.provider: b.tripped_at is not None for b in self.state.breakers.values()},
        }

    def view(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "rules": [
                {"name": r.name, "mode": r.mode, "steps": [s.describe() for s in r.steps]}
                for r in self.cfg.rules
            ],
            "breakers": [
                {**b.to_dict(), "open": b.tripped_at is not None, "limit_hosts": None}
                for b in sorted(self.state.breakers.values(), key=lambda x: x.provider)
            ],
            "running": self.state.running(),
            "max_running": self.cfg.max_running,
        }
