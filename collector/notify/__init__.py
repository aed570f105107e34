"""Notification channels around the pure alert engine: log, webhook, NATS, Alertmanager, and
the in-process live stream. See ``docs/alerts.md`` ("Notifications and channels")."""
