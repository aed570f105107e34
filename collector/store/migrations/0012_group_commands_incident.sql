-- Collector group (docs/operations.md, "Silences, acknowledgements and maintenance windows"):
-- an incident acknowledged on its judge acknowledges the members other members own, each by
-- an 'ack' command naming the incident (the alert is acknowledged as the incident's member,
-- only if not acknowledged yet). NULL: an alert acknowledged on its own.
ALTER TABLE group_commands ADD COLUMN IF NOT EXISTS incident text;
