-- host_samples.detail: json (the text, checked as JSON), not jsonb, and compressed with lz4 where
-- the server has it. jsonb parsed every ~5 KB detail into its binary form on insert: about 120
-- CPU-us of PostgreSQL per sample frame, ~40 % of what PostgreSQL spent on a live fleet; json
-- with lz4 takes about 33 (docs/storage.md, "host_samples.detail"). Nothing queries inside
-- detail in SQL: the collector reads it back whole and parses it itself. Upgrading rewrites the
-- existing partitions once (their rows keep pglz); the rows written afterwards use lz4.
ALTER TABLE host_samples ALTER COLUMN detail TYPE json USING detail::json;

-- the partitioned table (its partitions made from now on inherit it) and each existing partition;
-- a server built without lz4 keeps its default (pglz), which is correct, only slower
DO $$
DECLARE
    part regclass;
BEGIN
    ALTER TABLE host_samples ALTER COLUMN detail SET COMPRESSION lz4;
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'host_samples'::regclass LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN detail SET COMPRESSION lz4', part);
    END LOOP;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'host_samples.detail keeps the default compression: %', SQLERRM;
END $$;
