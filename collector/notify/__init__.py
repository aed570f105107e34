"""Notification channels around the pure alert engine: log, webhook, NATS, Alertmanager, and
the in-process live stream. See ``docs/alerts.md`` ("Notifications and channels").
:func:`build_channels` builds them from ``[notify]``."""

from collector.notify.channels import Channels, build_channels

__all__ = ["Channels", "build_channels"]
