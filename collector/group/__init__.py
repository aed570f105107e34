"""A collector group: members share the hosts through leases in NATS (docs/operations.md)."""
