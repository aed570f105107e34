"""Correlation and suppression for the alert engine: incidents per (provider, host), the
provider-wide incident, root-cause inhibition and silences (incl. maintenance windows).

Inhibited and silenced alerts keep their lifecycle and are recorded; they are never
notified. When the inhibition or silence ends while the alert still fires and nobody was
told yet, it is notified then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from collector.alerts.config import FOREVER, AlertConfig, Policy, Silence, matches_all
from collector.alerts.model import (
    FIRING,
    N_ESCALATED,
    N_PROVIDER,
    N_RESOLVED,
    N_UPDATE,
    RESOLVED,
    Alert,
    AlertState,
    Incident,
    Notification,
    Transition,
    fingerprint,
    notifiable,
    quiet_ok,
)
from collector.health.model import CRITICAL, RANK

PROVIDER_RULE = "provider.incident"


@dataclass(frozen=True, slots=True)
class Fleet:
    """A collector group member's engine: which providers' provider-wide incidents it judges
    (one member per provider: the one holding the provider's bucket), and the alerts the other
    members judged (their hosts), which count toward those incidents as its own do."""

    judges: Callable[[str], bool]
    alerts: Mapping[str, Alert] = field(default_factory=dict)  # fingerprint -> alert judged elsewhere
    # provider -> its open provider-wide incident, judged by another member (as last published:
    # ``covered`` and ``covered_at`` as that member committed them)
    incidents: Mapping[str, Incident] = field(default_factory=dict)
    # how long past ``group_interval`` an alert's own first notice is held for another member's
    # incident to say it told it (the fleet view's delays: both ways, and the judge's commit)
    handoff: float = 5.0


class Ctx:
    """What one ``evaluate`` call collects."""

    __slots__ = (
        "accepting", "due", "fired", "fleet", "later", "member_notes", "notifications", "now", "transitions",
    )  # fmt: skip

    def __init__(self, now: float, fleet: Fleet | None = None) -> None:
        self.now = now
        self.fleet = fleet
        self.transitions: list[Transition] = []
        self.notifications: list[Notification] = []
        self.fired: dict[str, Alert] = {}  # became firing or notifiable: correlate, then notify
        self.later: list[tuple[Alert, str, Sequence[str]]] = []  # updates told at the end
        self.accepting: dict[str, bool] = {}  # provider incident id -> takes new members
        self.due = FOREVER  # the next escalation of members told by an incident in this call
        # (incident, kind, level, policy) -> incident-told members escalating or repeating now
        self.member_notes: dict[tuple[str, str, int, str], list[Alert]] = {}

    def transition(self, a: Alert, kind: str) -> None:
        """Record that ``a`` went through ``kind`` (its state as it is now)."""
        self.transitions.append(
            Transition(
                a.fingerprint,
                a.rule,
                a.labels,
                self.now,
                kind,
                a.state,
                a.severity,
                a.summary,
                a.incident,
                reason=a.reason if kind == "resolved" else "",
            )
        )


class Correlator:
    """Incidents, provider-wide incidents, inhibition and silences over one :class:`AlertState`.

    The alert engine owns one and calls it at the points of an alert's lifecycle (created,
    fired, resolved, severity changed); :meth:`correlate` says which fired alerts the engine
    notifies on their own (the others are told by their incident).
    """

    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        self.sources = {r.source for r in config.inhibit}
        self.config_silences = {s.id: s for s in config.silences}
        self.policies: dict[str, Policy] = {p.name: p for p in config.policies}

    # ------------------------------------------------------------------ indexes

    def reindex(self, state: AlertState) -> None:
        """Rebuild the derived indexes (after restoring a state)."""
        state.by_fp = {a.fingerprint: a for a in state.alerts.values()}
        state.by_host = {}
        state.roots = {}
        for key, a in state.alerts.items():
            state.by_host.setdefault((a.labels.get("provider", ""), a.labels.get("host", "")), {})[key] = None
            if a.state == FIRING and a.rule in self.sources:
                for rule in self.config.inhibit:
                    if rule.source == a.rule:
                        k = (rule.source, tuple(a.labels.get(e, "") for e in rule.equal))
                        state.roots.setdefault(k, {})[a.fingerprint] = None
        state.next_due = 0.0

    def forget(self, state: AlertState, key: str) -> None:
        a = state.alerts.pop(key)
        state.pending_seen.pop(a.fingerprint, None)
        state.by_fp.pop(a.fingerprint, None)
        for iid in (a.incident, state.open_incidents.get(f"provider:{a.labels.get('provider', '')}")):
            inc = state.incidents.get(iid) if iid else None
            if inc is not None and inc.closed_at is None:  # an open incident lists the alerts held
                if a.fingerprint in inc.alerts:
                    inc.alerts.remove(a.fingerprint)
                if a.fingerprint in inc.pending:
                    inc.pending.remove(a.fingerprint)
                inc.covered.pop(a.fingerprint, None)
                inc.covered_at.pop(a.fingerprint, None)
        host = (a.labels.get("provider", ""), a.labels.get("host", ""))
        keys = state.by_host.get(host)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del state.by_host[host]

    # ------------------------------------------------------------------ silences

    def _silence(self, state: AlertState, sid: str) -> Silence | None:
        return state.silences.get(sid) or self.config_silences.get(sid)

    def sync_silences(self, state: AlertState, ctx: Ctx) -> float:
        """Re-apply silences when the active set changed; the next start or end time."""
        now, nxt = ctx.now, FOREVER
        active = []
        for s in (*self.config_silences.values(), *state.silences.values()):
            if s.active(now):
                active.append(s.id)
                nxt = min(nxt, s.ends_at)
            elif s.starts_at > now:
                nxt = min(nxt, s.starts_at)
        for sid in [sid for sid, s in state.silences.items() if s.ends_at <= now]:
            del state.silences[sid]  # expired
        active.sort()
        if active != state.active_silences:
            state.active_silences = active
            for a in state.alerts.values():
                self.silence_check(state, a, ctx)
        return nxt

    def silence_check(self, state: AlertState, a: Alert, ctx: Ctx) -> None:
        ids: list[str] = []
        if state.active_silences:
            labels = a.match_labels()
            for sid in state.active_silences:
                s = self._silence(state, sid)
                if s is not None and matches_all(s.matchers, labels):
                    ids.append(sid)
        if ids == a.silenced_by:
            return
        was = bool(a.silenced_by)
        a.silenced_by = ids
        if was and not ids:
            ctx.transition(a, "unsilenced")
            if notifiable(a) and a.level < 0:
                ctx.fired[a.fingerprint] = a
        elif ids and not was:
            ctx.transition(a, "silenced")

    # ------------------------------------------------------------------ inhibition

    def inhibit_check(self, state: AlertState, a: Alert, ctx: Ctx) -> None:
        """Inhibit ``a`` (pending or firing) while a root-cause alert of its host fires."""
        root: str | None = None
        if a.state == RESOLVED:
            a.inhibited_by = None
            return
        for rule in self.config.inhibit:
            if a.rule == rule.source or not a.rule.startswith(rule.targets):
                continue
            roots = state.roots.get((rule.source, tuple(a.labels.get(e, "") for e in rule.equal)))
            if roots:
                root = min(roots)
                break
        if root == a.inhibited_by:
            return
        was = a.inhibited_by is not None
        a.inhibited_by = root
        if root is None:
            ctx.transition(a, "uninhibited")
            state.next_due = min(state.next_due, ctx.now)  # its escalation may be due already
            if notifiable(a) and a.level < 0:
                ctx.fired[a.fingerprint] = a
        elif not was:
            ctx.transition(a, "inhibited")

    def root_changed(self, state: AlertState, a: Alert, firing: bool, ctx: Ctx) -> None:
        """``a`` (a root-cause rule) started or stopped firing: re-judge its host's alerts."""
        for rule in self.config.inhibit:
            if rule.source != a.rule:
                continue
            k = (rule.source, tuple(a.labels.get(e, "") for e in rule.equal))
            roots = state.roots.setdefault(k, {})
            if firing:
                roots[a.fingerprint] = None
            else:
                roots.pop(a.fingerprint, None)
                if not roots:
                    del state.roots[k]
        host = (a.labels.get("provider", ""), a.labels.get("host", ""))
        for key in state.by_host.get(host, {}):
            other = state.alerts[key]
            if other is not a:
                self.inhibit_check(state, other, ctx)

    # ------------------------------------------------------------------ incidents

    def _attach(self, state: AlertState, a: Alert, now: float) -> None:
        p, h = a.labels.get("provider", ""), a.labels.get("host", "")
        slot = f"host:{p}/{h}"
        iid = state.open_incidents.get(slot)
        inc = state.incidents.get(iid) if iid else None
        if inc is None or inc.closed_at is not None:
            inc = Incident(fingerprint(f"{slot}|{now!r}|{a.fingerprint}"), p, h, now, now)
            state.incidents[inc.id] = inc
            state.open_incidents[slot] = inc.id
        if a.fingerprint not in inc.alerts:
            inc.alerts.append(a.fingerprint)
        inc.last_activity = now
        a.incident = inc.id

    def incident_activity(self, state: AlertState, a: Alert, ctx: Ctx) -> None:
        for iid in (a.incident, state.open_incidents.get(f"provider:{a.labels.get('provider', '')}")):
            inc = state.incidents.get(iid) if iid else None
            if inc is not None and inc.closed_at is None and a.fingerprint in inc.alerts:
                inc.last_activity = ctx.now
        state.next_due = min(state.next_due, ctx.now + self.config.alerts.correlation_window)

    def correlate(
        self, state: AlertState, ctx: Ctx, provider_hosts: Mapping[str, int] | None
    ) -> Iterator[Alert]:
        """Group what fired into incidents and open provider-wide incidents; yield, in order, the
        fired alerts that no incident tells, for the engine to notify on their own. Then send
        the incident updates that are due with :meth:`flush_updates`. In a collector group an
        alert that another member's open, still failing provider incident would take is held
        instead (:meth:`_hold`), until that incident says it told it or the hold ends."""
        now = ctx.now
        fired = [a for a in ctx.fired.values() if a.state == FIRING]
        for a in fired:
            inc = state.incidents.get(a.incident) if a.incident else None
            if inc is None or inc.closed_at is not None:
                self._attach(state, a, now)
        providers = sorted(
            {a.labels.get("provider", "") for a in fired if a.severity == CRITICAL and not a.silenced_by}
        )
        for p in providers:
            self._provider_incident(state, p, ctx, provider_hosts)
        for a in fired:
            if not notifiable(a):
                continue
            if a.held_by is not None and self._settle(state, a, ctx):
                continue  # told by another member's incident, or still held for it
            if self._join(state, a, ctx):
                continue
            if a.level >= 0:
                continue
            if self._hold(state, a, ctx):
                continue
            yield a

    # ------------------------------------------------------------------ a group: another member's incident

    @staticmethod
    def _tag(a: Alert) -> str:
        return f"{a.episode}/{a.severity}"

    @staticmethod
    def _held_for(a: Alert, ctx: Ctx) -> Incident | None:
        """The incident ``a`` is held for, as the fleet view shows it (None: not there)."""
        inc = ctx.fleet.incidents.get(a.labels.get("provider", "")) if ctx.fleet is not None else None
        return inc if inc is not None and inc.id == a.held_by else None

    def _hold(self, state: AlertState, a: Alert, ctx: Ctx) -> bool:
        """A group member, ``a`` not told yet: if another member's provider incident is open,
        notified (it has a policy) and still failing, and would take ``a`` (critical, or on one
        of its hosts), hold ``a``'s own first notice for it: that member folds ``a`` into the
        incident's next notification (it sees the hold in the fleet view). Once per episode:
        a hold that ended untold is not taken again."""
        if ctx.fleet is None or a.held_until is not None:
            return False
        inc = ctx.fleet.incidents.get(a.labels.get("provider", ""))
        if inc is None or inc.closed_at is not None or inc.policy is None:
            return False
        if (a.labels.get("host", "") not in inc.hosts and a.severity != CRITICAL) or not self._accepting(
            state, inc, ctx
        ):
            return False
        a.held_by = inc.id
        a.held_until = ctx.now + self.config.alerts.group_interval + ctx.fleet.handoff
        state.next_due = min(state.next_due, a.held_until)
        ctx.transition(a, "held")
        return True

    def _settle(self, state: AlertState, a: Alert, ctx: Ctx) -> bool:
        """``a`` is held: told if its incident says so (True), still held before ``held_until``
        (True), else released to be told on its own (False). An incident this member judges
        now (it took the provider's bucket) takes it as one of its own (False: ``_join``)."""
        local = state.incidents.get(a.held_by or "")
        inc = local if local is not None else self._held_for(a, ctx)
        if inc is not None and inc.covered.get(a.fingerprint) == self._tag(a):
            self._told_by(state, inc, a, ctx)
            return True
        if local is None and a.held_until is not None and ctx.now < a.held_until:
            state.next_due = min(state.next_due, a.held_until)
            return True
        a.held_by = None  # (held_until stays: not held again this episode)
        return False

    def told_by_held(self, state: AlertState, a: Alert, ctx: Ctx) -> bool:
        """``a`` (held) resolves: True if its incident told it (marked told), else its hold ends."""
        inc = state.incidents.get(a.held_by or "") or self._held_for(a, ctx)
        if inc is not None and inc.covered.get(a.fingerprint) == self._tag(a):
            self._told_by(state, inc, a, ctx)
            return True
        a.held_by = None
        return False

    def _told_by(self, state: AlertState, inc: Incident, a: Alert, ctx: Ctx) -> None:
        """Another member's incident told ``a``: it escalates here, by its owner, through the
        incident's policy if it is critical (else its own), counting from when it was told."""
        at = inc.covered_at.get(a.fingerprint, ctx.now)
        pol = self.policies.get(inc.policy or "")
        own = pol if a.severity == CRITICAL else self.config.route(a.match_labels())
        chosen = own or pol
        a.held_by = a.held_until = None
        a.notified = "incident"
        a.level, a.notify_base, a.last_notified_at = 0, at, at
        a.policy = chosen.name if chosen is not None else None
        if chosen is not None and a.ack_by is None:
            if len(chosen.levels) > 1:
                state.next_due = min(state.next_due, at + chosen.levels[1].after)
            if chosen.repeat > 0:
                state.next_due = min(state.next_due, at + chosen.repeat)
        ctx.transition(a, "incident_told")

    def fold(self, state: AlertState, ctx: Ctx) -> None:
        """The judge of a provider: the other members' alerts held for its open incidents join
        them, told by the next notification (as its own members are, :meth:`_join`). Called
        before the evaluation's time-driven steps, so that a first notification due now tells
        the alerts held for it."""
        if ctx.fleet is None:
            return
        mine: dict[str, Incident] = {}
        for slot, iid in state.open_incidents.items():
            opened = state.incidents[iid]
            if slot.startswith("provider:") and opened.policy is not None:
                mine[opened.provider] = opened
        if not mine:
            return
        for m in ctx.fleet.alerts.values():
            if m.held_by is None:
                continue
            inc = mine.get(m.labels.get("provider", ""))
            fp = m.fingerprint
            if (
                inc is None
                or m.held_by != inc.id
                or m.level >= 0
                or not notifiable(m)
                or fp in inc.pending
                or inc.covered.get(fp) == self._tag(m)
            ):
                continue
            if fp not in inc.alerts:
                inc.alerts.append(fp)
            inc.pending.append(fp)
            self._schedule(state, inc, m, ctx)

    @staticmethod
    def _remote_new(inc: Incident, fp: str, ctx: Ctx) -> Alert | None:
        """A pending member held for ``inc`` by another member, still to be told by it."""
        m = ctx.fleet.alerts.get(fp) if ctx.fleet is not None else None
        if m is None or m.held_by != inc.id or m.level >= 0 or m.fired_at is None:
            return None
        return m if quiet_ok(m) and not m.flapping else None

    # ------------------------------------------------------------------ provider-wide incidents

    @staticmethod
    def _member(state: AlertState, ctx: Ctx, fp: str) -> Alert | None:
        """An incident member: this engine's alert, or (a group) another member's."""
        a = state.by_fp.get(fp)
        if a is None and ctx.fleet is not None:
            a = ctx.fleet.alerts.get(fp)
        return a

    def sweep(self, state: AlertState, ctx: Ctx, provider_hosts: Mapping[str, int] | None) -> None:
        """A group member: open the provider-wide incidents it judges that the other members'
        alerts call for (its own fired alerts are correlated as they fire)."""
        if ctx.fleet is None:
            return
        providers = {
            p
            for a in ctx.fleet.alerts.values()
            if a.state == FIRING and a.severity == CRITICAL and not a.silenced_by
            and f"provider:{(p := a.labels.get('provider', ''))}" not in state.open_incidents
        }  # fmt: skip
        for p in sorted(providers):
            self._provider_incident(state, p, ctx, provider_hosts)

    def provider_incident_of(self, state: AlertState, a: Alert) -> Incident | None:
        iid = state.open_incidents.get(f"provider:{a.labels.get('provider', '')}")
        return state.incidents.get(iid) if iid else None

    def _accepting(self, state: AlertState, inc: Incident, ctx: Ctx) -> bool:
        """A provider incident takes new members while at least ``provider_incident_min_hosts``
        of its hosts still have a firing critical member (computed once per evaluation)."""
        got = ctx.accepting.get(inc.id)
        if got is None:
            hosts = set()
            for fp in inc.alerts:
                m = self._member(state, ctx, fp)
                if m is not None and m.state == FIRING and m.severity == CRITICAL and not m.silenced_by:
                    hosts.add(m.labels.get("host", ""))
            got = ctx.accepting[inc.id] = len(hosts) >= self.config.alerts.provider_incident_min_hosts
        return got

    def _join(self, state: AlertState, a: Alert, ctx: Ctx) -> bool:
        """``a`` (notifiable) joins its provider's open, notified incident if it is critical or
        on one of its hosts and was not told on its own: it is told by the incident's next
        update (at once for event-class criticals, else batched at ``group_interval``).
        True if the incident tells it (now, later or already)."""
        inc = self.provider_incident_of(state, a)
        if inc is None or inc.policy is None:
            return False
        fp = a.fingerprint
        told = inc.covered.get(fp) == f"{a.episode}/{a.severity}"
        if a.notified == "incident" and (fp in inc.pending or told):
            return True  # told (or about to be) at this severity
        if a.notified != "incident":
            if a.level >= 0:
                return False  # told on its own before the incident opened: it keeps its own notices
            h = a.labels.get("host", "")
            if (h not in inc.hosts and a.severity != CRITICAL) or not self._accepting(state, inc, ctx):
                return False
        a.notified = "incident"
        a.held_by = None  # (held for this incident before this member took its bucket)
        if fp not in inc.alerts:
            inc.alerts.append(fp)
        inc.pending.append(fp)
        self._schedule(state, inc, a, ctx)
        return True

    def _schedule(self, state: AlertState, inc: Incident, a: Alert, ctx: Ctx) -> None:
        """When ``a``, joining ``inc``, is told: at once (event class), with the first
        notification, else with the next batched update."""
        fp = a.fingerprint
        now, gi = ctx.now, self.config.alerts.group_interval
        if self.event_class(a):
            due = now
        elif inc.last_sent_at is None:  # joins the first notification, not sent yet (group_wait)
            due = inc.update_due if inc.update_due is not None else now
        else:  # batched; never later than group_interval after it fired (if never told)
            base = inc.last_sent_at + gi
            if fp not in inc.covered and a.fired_at is not None:
                base = min(base, a.fired_at + gi)
            due = max(now, base)
        inc.update_due = due if inc.update_due is None else min(inc.update_due, due)
        state.next_due = min(state.next_due, inc.update_due)

    def event_class(self, a: Alert) -> bool:
        """A critical event (fatal XID, GPU lost, double-bit ECC, row-remap failure): told at once."""
        return a.severity == CRITICAL and a.immediate and a.rule in self.config.event_rules

    def _cover(self, inc: Incident, a: Alert, pol: Policy, ctx: Ctx) -> None:
        """``a`` is told by a notification of ``inc``: it escalates from now, through the
        incident's policy if it is critical, else through its own (if any)."""
        now = ctx.now
        inc.covered[a.fingerprint] = self._tag(a)
        inc.covered_at[a.fingerprint] = now
        a.notified = "incident"
        if a.level < 0 or (a.severity == CRITICAL and a.policy != pol.name):  # (raised: rerouted)
            own = pol if a.severity == CRITICAL else self.config.route(a.match_labels())
            a.policy = (own or pol).name
            a.level, a.notify_base = 0, now
        a.last_notified_at = now
        p = self.policies.get(a.policy or "")
        if p is not None and a.ack_by is None and a.notify_base is not None:
            if a.level + 1 < len(p.levels):
                ctx.due = min(ctx.due, a.notify_base + p.levels[a.level + 1].after)
            if p.repeat > 0:
                ctx.due = min(ctx.due, now + p.repeat)

    def flush_updates(self, state: AlertState, ctx: Ctx) -> float:
        """Send the updates of provider incidents that are due; the next one's time."""
        now, nxt = ctx.now, FOREVER
        for iid in state.open_incidents.values():
            inc = state.incidents[iid]
            if inc.update_due is None:
                continue
            if inc.update_due > now:
                nxt = min(nxt, inc.update_due)
                continue
            self._send_update(state, inc, ctx)
        state.next_due = min(state.next_due, nxt)
        return nxt

    def _send_update(self, state: AlertState, inc: Incident, ctx: Ctx) -> None:
        pending, inc.pending, inc.update_due = inc.pending, [], None
        pol = self.policies.get(inc.policy or "")
        new: list[Alert] = []
        for fp in dict.fromkeys(pending):
            a = state.by_fp.get(fp)
            # told even if it resolved meanwhile (it did fire); not if silenced or inhibited since
            if a is not None and a.notified == "incident" and quiet_ok(a) and not a.flapping:
                new.append(a)
            elif a is None and (m := self._remote_new(inc, fp, ctx)) is not None:
                new.append(m)  # another member's, held for this incident
        if pol is None or not (new or inc.last_sent_at is None):
            return
        new_hosts = sorted({h for a in new if (h := a.labels.get("host", "")) not in inc.hosts})
        inc.hosts += new_hosts
        told_rules = {m.rule for fp in inc.covered if (m := self._member(state, ctx, fp)) is not None}
        raised = [a for a in new if a.fingerprint in inc.covered]
        new_rules = sorted({a.rule for a in new} - told_rules)
        for a in new:
            if state.by_fp.get(a.fingerprint) is a:
                self._cover(inc, a, pol, ctx)
            else:  # another member's: it marks it told when it sees this (its escalation is its own)
                inc.covered[a.fingerprint] = self._tag(a)
                inc.covered_at[a.fingerprint] = ctx.now
        if inc.last_sent_at is None:  # the first notification: every failing host, grouped
            inc.notified = True
            members = [
                m for fp in inc.alerts if (m := self._member(state, ctx, fp)) is not None and notifiable(m)
            ]
            members += [a for a in new if a not in members]  # (one that resolved meanwhile is told too)
            summary = (
                f"provider {inc.provider}: {len(inc.hosts)} of {inc.total_hosts} hosts failing within "
                f"{self.config.alerts.correlation_window:g} s: look for a shared cause (power, network, "
                "cooling, driver rollout)"
            )
            self._incident_note(
                ctx, inc, N_PROVIDER, pol.levels[0].notify, 0, CRITICAL, members, summary, tuple(inc.hosts)
            )
            return
        hosts = tuple(sorted({a.labels.get("host", "") for a in new}))
        parts = [f"{len(new)} new alert{'s' if len(new) > 1 else ''}"]
        if new_hosts:
            parts.append(f"new hosts {', '.join(new_hosts)}")
        if new_rules:
            parts.append(f"new rules {', '.join(new_rules)}")
        if raised:
            parts.append("severity raised: " + ", ".join(f"{a.rule} on {_host(a)}" for a in raised))
        what = "; ".join([*parts, ", ".join(f"{a.rule} {a.severity} on {_host(a)}" for a in new[:10])])
        severity = max((a.severity for a in new), key=lambda s: RANK.get(s, 0))
        summary = f"provider {inc.provider} incident update: {what}"
        told = tuple(inc.told)
        self._incident_note(ctx, inc, N_UPDATE, told, 0, severity, new, summary, hosts, tuple(new_hosts))

    def _incident_note(
        self,
        ctx: Ctx,
        inc: Incident,
        kind: str,
        channels: tuple[str, ...],
        level: int,
        severity: str,
        members: Sequence[Alert],
        summary: str,
        hosts: tuple[str, ...],
        new_hosts: tuple[str, ...] = (),
    ) -> None:
        if not channels:
            return
        for c in channels:
            if c not in inc.told:
                inc.told.append(c)
        ctx.notifications.append(
            Notification(
                kind,
                tuple(dict.fromkeys(channels)),
                ctx.now,
                None,
                inc.id,
                PROVIDER_RULE,
                {"provider": inc.provider},
                severity,
                summary,
                "",
                level,
                hosts,
                inc.updates,
                tuple(sorted({a.rule for a in members})),
                tuple(a.fingerprint for a in members),
                new_hosts,
            )
        )
        inc.updates += 1
        inc.last_sent_at = ctx.now

    def escalate_members(self, state: AlertState, ctx: Ctx) -> None:
        """Send the escalations and repeats of incident-told members, one per (incident,
        kind, level), collected by ``_escalate`` in ``ctx.member_notes``."""
        for (iid, kind, level, pname), members in ctx.member_notes.items():
            inc = state.incidents.get(iid)
            pol = self.policies.get(pname)
            if inc is None or pol is None:
                continue
            hosts = tuple(sorted({a.labels.get("host", "") for a in members}))
            what = ", ".join(f"{a.rule} on {_host(a)}" for a in members[:10])
            verb = f"escalated to level {level}" if kind == N_ESCALATED else "still firing"
            summary = f"provider {inc.provider} incident: {len(members)} unacknowledged ({what}): {verb}"
            chans = pol.levels[level].notify
            severity = max((a.severity for a in members), key=lambda s: RANK.get(s, 0))
            self._incident_note(ctx, inc, kind, chans, level, severity, members, summary, hosts)
        ctx.member_notes.clear()

    def _provider_incident(
        self, state: AlertState, p: str, ctx: Ctx, provider_hosts: Mapping[str, int] | None
    ) -> None:
        if f"provider:{p}" in state.open_incidents or (ctx.fleet is not None and not ctx.fleet.judges(p)):
            return  # (a group: another member judges this provider)
        cfg, now = self.config.alerts, ctx.now
        total = provider_hosts.get(p, 0) if provider_hosts is not None else len(state.hosts.get(p, {}))
        cut = now - cfg.correlation_window
        failing: dict[str, list[str]] = {}
        candidates = [
            state.alerts[key] for h in state.hosts.get(p, {}) for key in state.by_host.get((p, h), {})
        ]
        if ctx.fleet is not None:  # the provider's hosts judged by the other members of a group
            candidates += [a for a in ctx.fleet.alerts.values() if a.labels.get("provider", "") == p]
        for a in candidates:
            if (
                a.state == FIRING
                and a.severity == CRITICAL
                and not a.silenced_by
                and a.fired_at is not None
                and a.fired_at >= cut
            ):
                failing.setdefault(a.labels.get("host", ""), []).append(a.fingerprint)
        n = len(failing)
        if total <= 0 or n < cfg.provider_incident_min_hosts or n <= cfg.provider_incident_share * total:
            return
        inc = Incident(fingerprint(f"{p}|{now!r}"), p, None, now, now)
        inc.hosts = sorted(failing)
        inc.alerts = [fp for h in inc.hosts for fp in failing[h]]
        state.incidents[inc.id] = inc
        state.open_incidents[f"provider:{p}"] = inc.id
        labels = {"provider": p, "rule": PROVIDER_RULE, "severity": CRITICAL}
        pol = self.config.route(labels)
        if pol is None:
            return  # recorded only: its alerts are notified on their own
        inc.policy = pol.name
        inc.total_hosts = total
        for m in map(state.by_fp.get, inc.alerts):  # its own (a group: the others' tell theirs)
            if m is not None and notifiable(m) and m.level < 0:  # told by the first notification
                m.notified = "incident"
                inc.pending.append(m.fingerprint)
        # The first notification waits group_wait from the onset, so that what fails together
        # is told together; an event-class critical joining meanwhile sends it at once.
        inc.update_due = now + cfg.group_wait
        state.next_due = min(state.next_due, inc.update_due)

    def close_incidents(self, state: AlertState, ctx: Ctx) -> float:
        """Close incidents whose alerts all stopped firing a window ago; the next due time."""
        now, window, nxt = ctx.now, self.config.alerts.correlation_window, FOREVER
        for slot, iid in list(state.open_incidents.items()):
            inc = state.incidents[iid]
            if any(
                a is not None and a.state == FIRING
                for a in (self._member(state, ctx, fp) for fp in inc.alerts)
            ):
                continue
            if now < inc.last_activity + window:
                nxt = min(nxt, inc.last_activity + window)
                continue
            inc.closed_at = now
            del state.open_incidents[slot]
            inc.pending, inc.update_due = [], None  # nothing left to tell: none of them fires
            if inc.host is None and inc.notified:
                self._incident_note(
                    ctx,
                    inc,
                    N_RESOLVED,
                    tuple(inc.told),
                    0,
                    CRITICAL,
                    [],
                    f"provider {inc.provider}: incident over, hosts recovered",
                    tuple(inc.hosts),
                )
        retention = self.config.alerts.resolved_retention
        gone = []
        for iid, inc in state.incidents.items():
            if inc.closed_at:
                if now >= inc.closed_at + retention:
                    gone.append(iid)
                else:  # due then, even if nothing else happens meanwhile
                    nxt = min(nxt, inc.closed_at + retention)
        for iid in gone:
            del state.incidents[iid]
        return nxt


def _host(a: Alert) -> str:
    return a.labels.get("host", "")
