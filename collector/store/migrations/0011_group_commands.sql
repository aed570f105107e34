-- Collector group (docs/operations.md, "Silences, acknowledgements and maintenance group-wide"):
-- an operator's acknowledgement received by a member that does not own the alert's host. The
-- row is the command (PostgreSQL is the source of truth); the owner of `bucket` applies it
-- and marks it done. A NATS notice only says "look now".
CREATE TABLE IF NOT EXISTS group_commands (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,            -- 'ack' (an alert) or 'ack_incident'
    target      text NOT NULL,            -- the alert's fingerprint or the incident's id
    bucket      integer NOT NULL,         -- the bucket of the alert's (incident's) host
    by_name     text NOT NULL,
    until_at    double precision,         -- Unix seconds, or NULL
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    done_at     timestamptz,
    done_by     text
);
CREATE INDEX IF NOT EXISTS group_commands_pending ON group_commands (id) WHERE done_at IS NULL;
