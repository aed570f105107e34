-- Collector group (docs/operations.md, "Collector group"): the fencing token of each bucket's
-- current owner. A member that takes a bucket's lease (a JetStream KV revision, which only
-- grows) raises the bucket's token here; every outbox write and claim of that bucket checks,
-- in its own transaction, that the token is still the writer's (FOR SHARE: a taker's raise
-- waits for writes in flight, and fails every write after it).
CREATE TABLE IF NOT EXISTS group_fences (
    bucket    integer PRIMARY KEY,
    token     bigint NOT NULL,
    member    text NOT NULL,
    taken_at  timestamptz NOT NULL DEFAULT now()
);
-- which member (and token) claimed a pending notification for sending
ALTER TABLE notification_outbox ADD COLUMN IF NOT EXISTS claimed_by text;
ALTER TABLE notification_outbox ADD COLUMN IF NOT EXISTS claim_token bigint;
