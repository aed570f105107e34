-- One-minute rollups are written once per minute, not with every batch: a batch that stores
-- new GPU rows of a (host, minute) marks it here, in its own transaction; the writer later
-- recomputes that minute's rollup rows from the stored samples (idempotent: it overwrites)
-- and removes the mark in one transaction. A mark left by a crash is picked up at the next
-- start; history queries read the raw samples of marked minutes (collector/store/queries.py).
CREATE TABLE IF NOT EXISTS gpu_rollup_pending (
    host_id  integer NOT NULL,
    minute   timestamptz NOT NULL,
    PRIMARY KEY (host_id, minute)
);
