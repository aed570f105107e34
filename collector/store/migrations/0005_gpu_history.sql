-- Fault history per physical GPU (serial, else UUID) across boots, for the history-aware
-- gpu.rma check (docs/health.md, collector/health/history.py). A board is kept from its first
-- fatal XID until every fatal XID aged out of [health.gpu] rma_history.
CREATE TABLE IF NOT EXISTS gpu_history (
    board      text PRIMARY KEY,              -- serial number, else UUID
    serial     text NOT NULL DEFAULT '',
    uuid       text NOT NULL DEFAULT '',
    provider   text NOT NULL DEFAULT '',
    host       text NOT NULL DEFAULT '',      -- where it was last seen
    gpu        integer NOT NULL DEFAULT 0,    -- its index there
    boots      jsonb NOT NULL DEFAULT '[]',   -- [[boot id, first seen (Unix s)], ...] in time order (last 32)
    dropped    integer NOT NULL DEFAULT 0,    -- older boots no longer listed (they still count)
    fatal      jsonb NOT NULL DEFAULT '[]',   -- [[code, at (Unix s), boot, boot ordinal], ...] oldest first
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS gpu_history_host ON gpu_history (host);
