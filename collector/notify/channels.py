"""Where the notification channels are built: one per ``[notify]`` entry, in a fixed order."""

from __future__ import annotations

from dataclasses import dataclass, field

from collector.notify.alertmanager import AlertmanagerChannel
from collector.notify.base import Channel
from collector.notify.config import NotifyConfig
from collector.notify.log import LogChannel
from collector.notify.nats import NatsChannel
from collector.notify.webhook import WebhookChannel


@dataclass(frozen=True, slots=True)
class Channels:
    """Every channel (log, nats, webhooks, Alertmanagers, in that order), and the
    Alertmanagers again, whose firing alerts are re-pushed periodically."""

    all: list[Channel] = field(default_factory=list)
    alertmanagers: list[AlertmanagerChannel] = field(default_factory=list)


def build_channels(config: NotifyConfig, nats: NatsChannel) -> Channels:
    """The channels ``config`` enables; ``nats`` is used when ``[notify] nats`` is on."""
    out: list[Channel] = []
    if config.log:
        out.append(LogChannel())
    if config.nats:
        out.append(nats)
    out += [WebhookChannel(w, config.external_url) for w in config.webhooks]
    ams = [AlertmanagerChannel(a, config.external_url) for a in config.alertmanagers]
    return Channels(out + list(ams), ams)
