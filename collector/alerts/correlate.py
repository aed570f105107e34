"""Correlation and suppression for the alert engine: incidents per (provider, host), the
provider-wide incident, root-cause inhibition and silences (incl. maintenance windows).

Inhibited and silenced alerts keep their lifecycle and are recorded; they are never
notified. When the inhibition or silence ends while the alert still fires and nobody was
told yet, it is notified then.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

from collector.alerts.config import FOREVER, AlertConfig, Policy, Silence, matches_all
from collector.alerts.model import (
    FIRING,
    N_PROVIDER,
    N_RESOLVED,
    RESOLVED,
    Alert,
    AlertState,
    Incident,
    Notification,
    Transition,
    fingerprint,
)
from collector.health.model import CRITICAL

PROVIDER_RULE = "provider.incident"


class Ctx:
    """What one ``evaluate`` call collects."""

    __slots__ = ("fired", "later", "notifications", "now", "transitions")

    def __init__(self, now: float) -> None:
        self.now = now
        self.transitions: list[Transition] = []
        self.notifications: list[Notification] = []
        self.fired: dict[str, Alert] = {}  # became firing or notifiable: correlate, then notify
        self.later: list[tuple[Alert, str, Sequence[str]]] = []  # updates told at the end


class Correlator(abc.ABC):
    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        self.sources = {r.source for r in config.inhibit}
        self.config_silences = {s.id: s for s in config.silences}

    @abc.abstractmethod
    def notify_first(self, state: AlertState, a: Alert, ctx: Ctx) -> None: ...

    @abc.abstractmethod
    def route(self, labels: Mapping[str, str]) -> Policy | None: ...

    @staticmethod
    @abc.abstractmethod
    def notifiable(a: Alert) -> bool: ...

    def _t(self, ctx: Ctx, a: Alert, kind: str) -> None:
        ctx.transitions.append(
            Transition(
                a.fingerprint, a.rule, a.labels, ctx.now, kind, a.state, a.severity, a.summary, a.incident
            )
        )

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
        state.by_fp.pop(a.fingerprint, None)
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
            self._t(ctx, a, "unsilenced")
            if self.notifiable(a) and a.level < 0:
                ctx.fired[a.fingerprint] = a
        elif ids and not was:
            self._t(ctx, a, "silenced")

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
            self._t(ctx, a, "uninhibited")
            if self.notifiable(a) and a.level < 0:
                ctx.fired[a.fingerprint] = a
        elif not was:
            self._t(ctx, a, "inhibited")

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

    def correlate(self, state: AlertState, ctx: Ctx, provider_hosts: Mapping[str, int] | None) -> None:
        """Group what fired into incidents, open provider-wide incidents, then notify."""
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
            if not self.notifiable(a) or a.level >= 0:
                continue
            if a.notified is None and self._absorb(state, a, now):
                continue
            self.notify_first(state, a, ctx)

    def _absorb(self, state: AlertState, a: Alert, now: float) -> bool:
        p, h = a.labels.get("provider", ""), a.labels.get("host", "")
        iid = state.open_incidents.get(f"provider:{p}")
        inc = state.incidents.get(iid) if iid else None
        if inc is None or (h not in inc.hosts and a.severity != CRITICAL):
            return False
        a.notified = "absorbed"
        if a.fingerprint not in inc.alerts:
            inc.alerts.append(a.fingerprint)
        if h not in inc.hosts:
            inc.hosts.append(h)
        inc.last_activity = now
        return True

    def _provider_incident(
        self, state: AlertState, p: str, ctx: Ctx, provider_hosts: Mapping[str, int] | None
    ) -> None:
        if f"provider:{p}" in state.open_incidents:
            return
        cfg, now = self.config.alerts, ctx.now
        total = provider_hosts.get(p, 0) if provider_hosts is not None else len(state.hosts.get(p, {}))
        cut = now - cfg.correlation_window
        failing: dict[str, list[str]] = {}
        for h in state.hosts.get(p, {}):
            for key in state.by_host.get((p, h), {}):
                a = state.alerts[key]
                if (
                    a.state == FIRING
                    and a.severity == CRITICAL
                    and not a.silenced_by
                    and a.fired_at is not None
                    and a.fired_at >= cut
                ):
                    failing.setdefault(h, []).append(a.fingerprint)
        n = len(failing)
        if total <= 0 or n < cfg.provider_incident_min_hosts or n <= cfg.provider_incident_share * total:
            return
        inc = Incident(fingerprint(f"{p}|{now!r}"), p, None, now, now)
        inc.hosts = sorted(failing)
        inc.alerts = [fp for h in inc.hosts for fp in failing[h]]
        state.incidents[inc.id] = inc
        state.open_incidents[f"provider:{p}"] = inc.id
        labels = {"provider": p, "rule": PROVIDER_RULE, "severity": CRITICAL}
        pol = self.route(labels)
        if pol is None:
            return
        inc.notified = True
        inc.told = list(pol.levels[0].notify)
        summary = (
            f"provider {p}: {n} of {total} hosts failing within "
            f"{cfg.correlation_window:g} s: look for a shared cause (power, network, cooling, driver rollout)"
        )
        ctx.notifications.append(
            Notification(
                N_PROVIDER, tuple(inc.told), now, None, inc.id, PROVIDER_RULE,
                {"provider": p}, CRITICAL, summary, "", 0, tuple(inc.hosts),
            )
        )  # fmt: skip

    def close_incidents(self, state: AlertState, ctx: Ctx) -> float:
        """Close incidents whose alerts all stopped firing a window ago; the next due time."""
        now, window, nxt = ctx.now, self.config.alerts.correlation_window, FOREVER
        for slot, iid in list(state.open_incidents.items()):
            inc = state.incidents[iid]
            if any(a is not None and a.state == FIRING for a in map(state.by_fp.get, inc.alerts)):
                continue
            if now < inc.last_activity + window:
                nxt = min(nxt, inc.last_activity + window)
                continue
            inc.closed_at = now
            del state.open_incidents[slot]
            if inc.host is None and inc.notified:
                ctx.notifications.append(
                    Notification(
                        N_RESOLVED, tuple(inc.told), now, None, inc.id, PROVIDER_RULE,
                        {"provider": inc.provider}, CRITICAL,
                        f"provider {inc.provider}: incident over, hosts recovered",
                        "", 0, tuple(inc.hosts),
                    )
                )  # fmt: skip
        retention = self.config.alerts.resolved_retention
        for iid in [
            i for i, inc in state.incidents.items() if inc.closed_at and now >= inc.closed_at + retention
        ]:
            del state.incidents[iid]
        return nxt
