"""The alert engine: observations, commands and the current time in; state, transitions and
notifications out.

Pure: no clock, no logging, no I/O. The caller owns the :class:`AlertState`; ``evaluate``
updates it in place (copying a fleet's state per frame would cost more than evaluating it)
and returns it with what changed::

    engine = AlertEngine(alert_config_from(raw))
    state = AlertState()
    state, transitions, notifications = engine.evaluate(state, observations, now)

To branch or persist a state, use ``AlertState.to_dict`` and :meth:`AlertEngine.restore`.
Lifecycle, flapping and escalation are here; correlation (incidents, provider-wide incidents,
inhibition) and silences are in :mod:`collector.alerts.correlate`, whose :class:`Correlator` the
engine owns and calls: no inheritance, no callbacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from collector.alerts.config import FOREVER, AlertConfig, Policy
from collector.alerts.correlate import Correlator, Ctx, Fleet
from collector.alerts.model import (
    FIRING,
    N_ESCALATED,
    N_FIRING,
    N_FLAPPING,
    N_REPEAT,
    N_RESOLVED,
    PENDING,
    R_FORGOTTEN,
    R_MOVED,
    RESOLVED,
    Ack,
    AckIncident,
    AddSilence,
    Alert,
    AlertState,
    Command,
    ExpireSilence,
    ForgetHost,
    Notification,
    Outcome,
    Unack,
    fingerprint,
    notifiable,
    quiet_ok,
)
from collector.health.model import HEALTHY, RANK, Observation

MAX_ALERTS_PER_HOST = 1000  # alerts kept per host; beyond it the oldest resolved ones go early


class AlertEngine:
    """Alert lifecycle (pending -> firing -> resolved), flapping, acknowledgement, escalation;
    correlation and silences through its :class:`Correlator`."""

    notifiable = staticmethod(notifiable)  # the predicates, for callers that hold the engine
    quiet_ok = staticmethod(quiet_ok)

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()
        self.corr = Correlator(self.config)
        a = self.config.alerts
        self.for_default = a.for_s
        self.flap_len = a.flap_history
        self.flap_mask = (1 << a.flap_history) - 1
        slots = a.flap_history - 1  # state changes the history can hold
        # Nagios: weights grow linearly from 0.8 (oldest change) to 1.2 (newest); slot 0 is newest.
        self.flap_weights = tuple(0.8 + 0.4 * (slots - 1 - i) / max(slots - 1, 1) for i in range(slots))
        self.flap_scale = 100.0 / slots

    # ------------------------------------------------------------------ entry points

    def restore(self, data: Mapping[str, Any]) -> AlertState:
        """A state saved with ``AlertState.to_dict``, with its indexes rebuilt."""
        state = AlertState.from_dict(data)
        self.corr.reindex(state)
        return state

    def evaluate(
        self,
        state: AlertState,
        observations: Iterable[Observation],
        now: float,
        commands: Sequence[Command] = (),
        provider_hosts: Mapping[str, int] | None = None,
        fleet: Fleet | None = None,
    ) -> Outcome:
        """Apply ``commands``, then ``observations``, then whatever time ``now`` makes due.

        ``provider_hosts`` (provider -> host count, e.g. ``HealthState.provider_hosts()``)
        sizes provider-wide incidents; without it the hosts seen in observations count.
        ``fleet``: a collector group member's (the providers it judges, the others' alerts).
        """
        ctx = Ctx(now, fleet)
        for cmd in commands:
            self._command(state, cmd, ctx)
        self.corr.fold(state, ctx)  # a group: the others' alerts held for its incidents join them
        due = bool(commands) or now >= state.next_due
        if due:  # silences first, so that this call's notifications see them
            boundary = self.corr.sync_silences(state, ctx)
        alerts, seen = state.alerts, set[str]()
        for o in observations:
            key = o.key
            if key in seen:  # a later frame's (one observation per alert and frame): if the
                a = alerts.get(key)  # earlier one fired or changed it, that is told first
                if a is not None and (a.fingerprint in ctx.fired or any(x is a for x, _, _ in ctx.later)):
                    self._tell(state, ctx, provider_hosts)
                    seen.clear()
            a = alerts.get(key) if o.seen is not None and o.status == HEALTHY and not o.reason else None
            if a is not None and a.state == PENDING and not a.flapping and self._held_for(state, a):
                # its condition held `for` in the host's time, judged in less (a backlog, a
                # takeover's replay): it fires, late, and is told before it resolves
                self._fire(state, a, ctx)
                self._tell(state, ctx, provider_hosts)
                seen.clear()
            seen.add(key)
            self._observe(state, o, ctx)
        if not due and now >= state.next_due:  # an observation made something due now (uninhibited)
            due = True
            boundary = self.corr.sync_silences(state, ctx)
        if due:
            self._advance(state, ctx, boundary)
        self._tell(state, ctx, provider_hosts)
        self.corr.sweep(state, ctx, provider_hosts)
        if ctx.due < state.next_due:
            state.next_due = ctx.due
        return Outcome(state, ctx.transitions, ctx.notifications)

    def _tell(self, state: AlertState, ctx: Ctx, provider_hosts: Mapping[str, int] | None) -> None:
        """Correlate and notify what fired so far in this call, then the updates held for the
        end. Called at the end of ``evaluate`` and before a second observation of an alert that
        fired (or changed) earlier in the same call (a later frame's: a frame gives one
        observation per alert), so that a batch of frames is told as the same frames one call
        each would be: a fault that fires and clears within one
        batch is notified ``firing`` then ``resolved``, one that fires and then flaps is paged
        ``firing`` before its ``flapping`` notice."""
        if ctx.fired:
            for a in self.corr.correlate(state, ctx, provider_hosts):
                self._notify_first(state, a, ctx)
            self.corr.flush_updates(state, ctx)
            ctx.fired = {}
        later, ctx.later = ctx.later, []
        for a, kind, channels in later:  # told last, if nothing silenced or inhibited it since
            if quiet_ok(a) and (kind == N_FLAPPING or notifiable(a)):
                self._send(ctx, a, kind, channels)

    # ------------------------------------------------------------------ observations

    def _observe(self, state: AlertState, o: Observation, ctx: Ctx) -> None:
        a = state.alerts.get(o.key)
        active = o.status != HEALTHY
        now = ctx.now
        if a is None:
            labels = o.labels
            p, h = labels.get("provider", ""), labels.get("host", "")
            hosts = state.hosts.get(p)
            if hosts is None:
                hosts = state.hosts[p] = {}
            if h not in hosts:
                hosts[h] = None
                self._moved(state, p, h, ctx)
            if not active:
                return
            a = self._create(state, o, ctx)
        elif o.reason and not active:  # the subject is gone (GPU replaced, evicted): final
            self.retire(state, a, o.reason, ctx)
            return
        a.last_seen = now
        n = a.flap_n
        bits = ((a.flap_bits << 1) | active) & self.flap_mask
        a.flap_bits = bits
        if n < self.flap_len:
            a.flap_n = n = n + 1
        old_severity = a.severity
        if active:
            a.severity, a.summary, a.advice, a.value = o.status, o.summary, o.advice, o.value
            a.immediate = o.immediate
        a.active = active
        changes = (bits ^ (bits >> 1)) & ((1 << (n - 1)) - 1)
        if changes or a.flapping:
            pct = self.flap_pct(changes)
            cfg = self.config.alerts
            if a.flapping:
                if pct >= cfg.flap_stop_pct:
                    return  # held
                a.flapping = False
                ctx.transition(a, "flapping_stopped")
            elif pct >= cfg.flap_start_pct:
                a.flapping = True
                ctx.transition(a, "flapping")
                self._notify_flapping(a, ctx)
                return
        if active:
            st = a.state
            if st == RESOLVED:
                if o.seen is not None:
                    state.pending_seen[a.fingerprint] = (o.seen, o.seen)
                self._start(state, a, ctx)
            elif st == PENDING:
                if o.seen is not None and (span := state.pending_seen.get(a.fingerprint)) is not None:
                    state.pending_seen[a.fingerprint] = (span[0], max(span[1], o.seen))
                if now - a.started_at >= self.for_of(a) or self._held_for(state, a):
                    self._fire(state, a, ctx)
            elif old_severity != a.severity:
                self._severity(state, a, old_severity, ctx)
        elif a.state != RESOLVED:
            self._resolve(state, a, ctx)

    def retire(self, state: AlertState, a: Alert, reason: str, ctx: Ctx) -> None:
        """Resolve ``a`` for good, flapping or not, because its subject is gone (``reason``);
        its flap history is cleared, so a subject that comes back starts afresh."""
        a.active, a.flap_bits, a.flap_n, a.last_seen = False, 0, 1, ctx.now
        if a.flapping:
            a.flapping = False
            ctx.transition(a, "flapping_stopped")
        if a.state != RESOLVED:
            a.reason = reason
            self._resolve(state, a, ctx)

    def _retire_host(self, state: AlertState, p: str, h: str, reason: str, ctx: Ctx) -> None:
        for key in list(state.by_host.get((p, h), ())):
            self.retire(state, state.alerts[key], reason, ctx)
        hosts = state.hosts.get(p)
        if hosts is not None:
            hosts.pop(h, None)
            if not hosts:
                del state.hosts[p]

    def _moved(self, state: AlertState, p: str, h: str, ctx: Ctx) -> None:
        """Host ``h`` reports under provider ``p``: its alerts under another provider resolve
        with reason ``moved`` (conditions that still hold fire again under ``p``)."""
        for other in [q for q, hosts in state.hosts.items() if q != p and h in hosts]:
            self._retire_host(state, other, h, R_MOVED, ctx)

    def forget_host(self, state: AlertState, host: str, ctx: Ctx) -> None:
        """Resolve every alert of ``host`` (reason ``forgotten``) and stop counting it."""
        found = [p for p, h in state.by_host if h == host]
        found += [p for p, hs in state.hosts.items() if host in hs]
        for p in dict.fromkeys(found):
            self._retire_host(state, p, host, R_FORGOTTEN, ctx)

    def flap_pct(self, changes: int) -> float:
        """Nagios-style weighted percentage of state changes (``changes``: bit 0 newest)."""
        total, w = 0.0, self.flap_weights
        while changes:
            low = changes & -changes
            total += w[low.bit_length() - 1]
            changes ^= low
        return total * self.flap_scale

    def for_of(self, a: Alert) -> float:
        return 0.0 if a.immediate else self.config.for_of(a.rule)

    def _create(self, state: AlertState, o: Observation, ctx: Ctx) -> Alert:
        a = Alert(fingerprint(o.key), o.key, o.check, dict(o.labels), o.status)
        state.alerts[o.key] = a
        state.by_fp[a.fingerprint] = a
        host = (a.labels.get("provider", ""), a.labels.get("host", ""))
        keys = state.by_host.get(host)
        if keys is None:
            keys = state.by_host[host] = {}
        elif len(keys) >= MAX_ALERTS_PER_HOST:  # a churning agent: drop its oldest resolved alerts
            for key in [k for k in keys if state.alerts[k].state == RESOLVED][: len(keys) // 10 + 1]:
                self.corr.forget(state, key)
            keys = state.by_host.setdefault(host, {})
        keys[o.key] = None
        self.corr.silence_check(state, a, ctx)
        self.corr.inhibit_check(state, a, ctx)
        return a

    # ------------------------------------------------------------------ lifecycle

    def _start(self, state: AlertState, a: Alert, ctx: Ctx) -> None:
        now = ctx.now
        a.episode += 1
        a.state, a.started_at, a.fired_at, a.resolved_at = PENDING, now, None, None
        a.level, a.notify_base, a.notified, a.last_notified_at, a.policy, a.incident = (
            -1,
            None,
            None,
            None,
            None,
            None,
        )
        a.told = []
        a.reason = ""
        a.held_by = a.held_until = None
        _clear_ack(a)
        ctx.transition(a, "pending")
        self.corr.inhibit_check(state, a, ctx)
        wait = self.for_of(a)
        if wait <= 0:
            self._fire(state, a, ctx)
        elif now + wait < state.next_due:
            state.next_due = now + wait

    def _held_for(self, state: AlertState, a: Alert) -> bool:
        """``a`` (pending) has held its ``for`` by the host's time: from the frame it went pending
        on to the last frame that still showed it (frames judged in a burst: ``now`` moved less
        than the host's clock did). A frame that clears it does not count: the condition held
        until the one before, as far as anyone knows."""
        span, wait = state.pending_seen.get(a.fingerprint), self.for_of(a)
        return span is not None and wait > 0 and span[1] - span[0] >= wait

    def _fire(self, state: AlertState, a: Alert, ctx: Ctx) -> None:
        state.pending_seen.pop(a.fingerprint, None)
        a.state, a.fired_at = FIRING, ctx.now
        ctx.transition(a, "firing")
        if a.rule in self.corr.sources:
            self.corr.root_changed(state, a, True, ctx)
        ctx.fired[a.fingerprint] = a

    def _resolve(self, state: AlertState, a: Alert, ctx: Ctx) -> None:
        state.pending_seen.pop(a.fingerprint, None)
        now = ctx.now
        was = a.state
        a.state, a.resolved_at = RESOLVED, now
        ctx.transition(a, "resolved")
        if was == FIRING:
            if a.held_by is not None and not self.corr.told_by_held(state, a, ctx):
                # held for another member's incident, which has not said it told it: told here,
                # then resolved (its hold ends: that incident takes no resolved alert)
                pol = self.config.route(a.match_labels())
                if pol is not None and quiet_ok(a) and not a.flapping:
                    a.level, a.notified, a.policy = 0, N_FIRING, pol.name
                    self._send(ctx, a, N_FIRING, pol.levels[0].notify)
            pol = self.corr.policies.get(a.policy or "")
            if (
                a.level < 0
                and a.notified is None
                and a.notify_base is not None
                and pol is not None
                and now >= a.notify_base + pol.levels[0].after
                and quiet_ok(a)
                and not a.flapping
            ):  # it fired while its first notice waited for group_wait: told now, then resolved
                a.level, a.notified = 0, N_FIRING
                self._send(ctx, a, N_FIRING, pol.levels[0].notify)
            if a.told and quiet_ok(a):  # tell whoever was told it fired (or flapped)
                self._send(ctx, a, N_RESOLVED, tuple(a.told))
            if a.rule in self.corr.sources:
                self.corr.root_changed(state, a, False, ctx)
            self.corr.incident_activity(state, a, ctx)
        _clear_ack(a)
        a.inhibited_by = None  # inhibition is a property of pending and firing alerts
        retire = now + self.config.alerts.resolved_retention
        if retire < state.next_due:
            state.next_due = retire

    def _severity(self, state: AlertState, a: Alert, old: str, ctx: Ctx) -> None:
        ctx.transition(a, "severity")
        self.corr.silence_check(state, a, ctx)
        if a.notified == "incident" and self.corr.provider_incident_of(state, a) is not None:
            # told by its provider incident: the next update says it (one another member judges:
            # told here, as one told on its own, below)
            if RANK[a.severity] > RANK[old] and notifiable(a):
                ctx.fired[a.fingerprint] = a
            return
        if RANK[a.severity] <= RANK[old] or a.level < 0 or not notifiable(a):
            return
        pol = self.config.route(a.match_labels())
        if pol is not None and pol.name != a.policy:  # e.g. warning -> critical: page now
            a.level, a.notify_base, a.notified, a.policy = -1, None, None, pol.name
            ctx.transition(a, "rerouted")
            ctx.fired[a.fingerprint] = a
        elif pol is not None:
            ctx.later.append((a, N_FIRING, pol.levels[a.level].notify))

    # ------------------------------------------------------------------ notifications

    def _send(
        self, ctx: Ctx, a: Alert, kind: str, channels: Sequence[str], hosts: tuple[str, ...] = ()
    ) -> None:
        if not channels:
            return
        chans = tuple(dict.fromkeys(channels))
        for c in chans:
            if c not in a.told:
                a.told.append(c)
        a.last_notified_at = ctx.now
        ctx.notifications.append(
            Notification(
                kind,
                chans,
                ctx.now,
                a.fingerprint,
                a.incident,
                a.rule,
                a.labels,
                a.severity,
                a.summary,
                a.advice,
                max(a.level, 0),
                hosts,
                a.episode,
                reason=a.reason if kind == N_RESOLVED else "",
            )
        )

    def _notify_flapping(self, a: Alert, ctx: Ctx) -> None:
        if not quiet_ok(a):
            return
        pol = self.corr.policies.get(a.policy) if a.policy else self.config.route(a.match_labels())
        if pol is None:
            return
        a.policy = pol.name
        a.notified = N_FLAPPING
        ctx.later.append((a, N_FLAPPING, pol.levels[max(a.level, 0)].notify))

    def _notify_first(self, state: AlertState, a: Alert, ctx: Ctx) -> None:
        """The first notification of an episode (level 0, or higher if its delays passed)."""
        if not notifiable(a) or a.level >= 0 or a.notified == "incident":
            return
        pol = self.corr.policies.get(a.policy) if a.policy else self.config.route(a.match_labels())
        if pol is None:
            return
        now = ctx.now
        if a.notify_base is None:
            a.notify_base = now
        a.policy = pol.name
        due = a.notify_base + pol.levels[0].after
        if a.fired_at is not None and not self.corr.event_class(a):  # let what fires together group
            due = max(due, a.fired_at + self.config.alerts.group_wait)
        if now < due:
            state.next_due = min(state.next_due, due)
            return
        level = 0
        while (
            a.ack_by is None
            and level + 1 < len(pol.levels)
            and now >= a.notify_base + pol.levels[level + 1].after
        ):
            level += 1
        a.level = level
        a.notified = N_FIRING
        self._send(ctx, a, N_FIRING, [c for lv in pol.levels[: level + 1] for c in lv.notify])
        state.next_due = min(state.next_due, self._next_for(a, pol))

    def _next_for(self, a: Alert, pol: Policy) -> float:
        nxt = FOREVER
        if a.ack_by is not None or a.notify_base is None:
            return nxt
        if a.level + 1 < len(pol.levels):
            nxt = a.notify_base + pol.levels[a.level + 1].after
        if pol.repeat > 0 and a.last_notified_at is not None:
            nxt = min(nxt, a.last_notified_at + pol.repeat)
        return nxt

    def _escalate(self, state: AlertState, a: Alert, ctx: Ctx) -> float:
        """Climb levels and repeat for a firing alert; the next time this alert is due."""
        if not notifiable(a) or a.fingerprint in ctx.fired:
            return FOREVER
        if a.level < 0:
            if a.notified != "incident":  # (else it waits in its incident's next update)
                ctx.fired[a.fingerprint] = a  # a delayed level 0: correlate, then notify
            return FOREVER
        pol = self.corr.policies.get(a.policy or "")
        if pol is None or a.ack_by is not None or a.notify_base is None:
            return FOREVER
        now, target = ctx.now, a.level
        while target + 1 < len(pol.levels) and now >= a.notify_base + pol.levels[target + 1].after:
            target += 1
        inc = self.corr.provider_incident_of(state, a) if a.notified == "incident" else None
        if inc is not None:  # told by its incident: escalates and repeats as the incident's notice
            if target > a.level:
                a.level = target
                ctx.member_notes.setdefault((inc.id, N_ESCALATED, target, pol.name), []).append(a)
                a.last_notified_at = now
            elif pol.repeat > 0 and a.last_notified_at is not None and now >= a.last_notified_at + pol.repeat:
                ctx.member_notes.setdefault((inc.id, N_REPEAT, a.level, pol.name), []).append(a)
                a.last_notified_at = now
            return self._next_for(a, pol)
        if target > a.level:
            a.level = target
            self._send(ctx, a, N_ESCALATED, pol.levels[target].notify)
        elif pol.repeat > 0 and a.last_notified_at is not None and now >= a.last_notified_at + pol.repeat:
            self._send(ctx, a, N_REPEAT, pol.levels[a.level].notify)
        return self._next_for(a, pol)

    # ------------------------------------------------------------------ commands and time

    def _command(self, state: AlertState, cmd: Command, ctx: Ctx) -> None:
        if isinstance(cmd, AddSilence):
            state.silences[cmd.silence.id] = cmd.silence
            return
        if isinstance(cmd, ExpireSilence):
            state.silences.pop(cmd.id, None)
            return
        if isinstance(cmd, AckIncident):
            inc = state.incidents.get(cmd.incident)
            if inc is None or inc.closed_at is not None:
                return
            inc.ack_by, inc.ack_at = cmd.by, ctx.now
            for fp in inc.alerts:
                m = state.by_fp.get(fp)
                if m is not None and m.state != RESOLVED and m.ack_by is None:
                    m.ack_by, m.ack_at, m.ack_until, m.ack_comment = cmd.by, ctx.now, cmd.until, cmd.comment
                    m.ack_incident = inc.id
                    ctx.transition(m, "acknowledged")
            return
        if isinstance(cmd, ForgetHost):
            self.forget_host(state, cmd.host, ctx)
            return
        a = state.by_fp.get(cmd.fingerprint)
        if a is None:
            return
        if isinstance(cmd, Ack):
            if a.state == RESOLVED or (cmd.incident is not None and a.ack_by is not None):
                return  # (an incident's acknowledgement leaves one acknowledged already as it is)
            a.ack_by, a.ack_at, a.ack_until, a.ack_comment = cmd.by, ctx.now, cmd.until, cmd.comment
            a.ack_incident = cmd.incident
            ctx.transition(a, "acknowledged")
        elif isinstance(cmd, Unack) and a.ack_by is not None:
            _clear_ack(a)
            ctx.transition(a, "unacknowledged")

    def _advance(self, state: AlertState, ctx: Ctx, nxt: float) -> None:
        now = ctx.now
        retention = self.config.alerts.resolved_retention
        drop = []
        for a in state.alerts.values():  # state changes first: roots inhibit before anyone is told
            if a.state == PENDING and a.active and not a.flapping:
                due = a.started_at + self.for_of(a)
                if now >= due:
                    self._fire(state, a, ctx)
                else:
                    nxt = min(nxt, due)
            if a.ack_until is not None:
                if now >= a.ack_until:
                    _clear_ack(a)
                    ctx.transition(a, "unacknowledged")
                else:
                    nxt = min(nxt, a.ack_until)
        for key, a in state.alerts.items():
            if a.state == FIRING:
                nxt = min(nxt, self._escalate(state, a, ctx))
            elif a.state == RESOLVED and not a.flapping:
                gone = (a.resolved_at if a.resolved_at is not None else a.last_seen) + retention
                if now >= gone:
                    drop.append(key)
                else:
                    nxt = min(nxt, gone)
        for key in drop:
            self.corr.forget(state, key)
        self.corr.escalate_members(state, ctx)
        nxt = min(nxt, self.corr.flush_updates(state, ctx))
        state.next_due = min(nxt, self.corr.close_incidents(state, ctx), ctx.due)


def _clear_ack(a: Alert) -> None:
    a.ack_by, a.ack_at, a.ack_until, a.ack_comment, a.ack_incident = None, None, None, "", None
