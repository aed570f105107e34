"""Pure alert engine: observations in; alerts, transitions and notifications out.

No clock, no logging, no I/O (docs/reference.md, "Code rules"). See ``docs/alerts.md``.
"""

from collector.alerts.config import AlertConfig, Matcher, Policy, Silence, alert_config_from, parse_matcher
from collector.alerts.engine import AlertEngine
from collector.alerts.model import (
    Ack,
    AckIncident,
    AddSilence,
    Alert,
    AlertState,
    ExpireSilence,
    Incident,
    Notification,
    Outcome,
    Transition,
    Unack,
)

__all__ = [
    "Ack",
    "AckIncident",
    "AddSilence",
    "Alert",
    "AlertConfig",
    "AlertEngine",
    "AlertState",
    "ExpireSilence",
    "Incident",
    "Matcher",
    "Notification",
    "Outcome",
    "Policy",
    "Silence",
    "Transition",
    "Unack",
    "alert_config_from",
    "parse_matcher",
]
