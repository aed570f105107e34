-- Collector group (docs/operations.md, "Collector group"): the group tables are scoped by the
-- group's identity, its JetStream KV bucket (`[collector] group_kv`, `<durable>-group` unless
-- set), so that two groups writing into one database neither take each other's fencing tokens
-- nor apply or claim each other's commands and notifications. Rows written before this are the
-- one group's of then, with group_kv '': its fencing rows are no group's any more (each group
-- raises its own at its next take: members take their buckets again when they start), its
-- pending commands are applied by the group that holds their bucket, its outbox rows (NULL)
-- are claimed by the group that holds their bucket, as before.
ALTER TABLE group_fences ADD COLUMN IF NOT EXISTS group_kv text NOT NULL DEFAULT '';
ALTER TABLE group_fences DROP CONSTRAINT IF EXISTS group_fences_pkey;
ALTER TABLE group_fences ADD CONSTRAINT group_fences_pkey PRIMARY KEY (group_kv, bucket);
ALTER TABLE group_fences ALTER COLUMN group_kv DROP DEFAULT;

ALTER TABLE group_commands ADD COLUMN IF NOT EXISTS group_kv text NOT NULL DEFAULT '';
DROP INDEX IF EXISTS group_commands_pending;
ALTER TABLE group_commands ALTER COLUMN group_kv DROP DEFAULT;
CREATE INDEX IF NOT EXISTS group_commands_pending ON group_commands (group_kv, id) WHERE done_at IS NULL;

-- the group whose member wrote the row (a group member's rows only; NULL: a lone collector's,
-- or from before): only that group's members claim it
ALTER TABLE notification_outbox ADD COLUMN IF NOT EXISTS group_kv text;
