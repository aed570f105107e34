-- Collector groups (docs/operations.md, "Collector group"): each group writing into this
-- database (its identity: its JetStream KV bucket, `[collector] group_kv`) has partitions of its
-- own for its alerts, incidents, alert-engine state, health snapshots and outbox rows: `base +
-- bucket`, and `base - 1` for its members' own alerts. A group's first member registers it here.
-- The first group registered gets base 10000, the partitions every group used before (the one
-- group of a database until now keeps its state); each next group 2048 above the last.
CREATE TABLE IF NOT EXISTS collector_groups (
    group_kv    text PRIMARY KEY,
    base        integer NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
