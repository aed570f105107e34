"""The gpuwarden collector: ingest, storage, health, alerts, API."""
