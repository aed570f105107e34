-- gpu_samples, narrower: temperatures, utilisations and the fan (integers as NVML reports them)
-- are real (4 bytes, exact for integers and 7 significant digits), and the columns are laid out
-- widest first so that PostgreSQL pads nothing between them: 376 -> about 306 bytes per row
-- (docs/storage.md, "Size"). Indexes as before: BRIN on ts, B-tree on (host_id, ts) for the
-- history queries (the B-tree deduplicates the 8 GPUs of a frame). Existing daily partitions
-- are copied into the new layout partition by partition, under the same names and bounds.
ALTER TABLE gpu_samples RENAME TO gpu_samples_v1;
ALTER INDEX gpu_samples_ts RENAME TO gpu_samples_v1_ts;
ALTER INDEX gpu_samples_host_ts RENAME TO gpu_samples_v1_host_ts;

CREATE TABLE gpu_samples (
    ts                          timestamptz NOT NULL,
    mem_total_bytes             bigint,
    mem_used_bytes              bigint,
    mem_reserved_bytes          bigint,
    power_w                     double precision,
    power_limit_w               double precision,
    energy_j                    double precision,
    clock_event_reasons         bigint,
    throttle_thermal_ns         bigint,
    throttle_power_ns           bigint,
    ecc_sbe_volatile            bigint,
    ecc_dbe_volatile            bigint,
    ecc_sbe_aggregate           bigint,
    ecc_dbe_aggregate           bigint,
    retired_pages_sbe           bigint,
    retired_pages_dbe           bigint,
    remapped_rows_correctable   bigint,
    remapped_rows_uncorrectable bigint,
    pcie_replay_count           bigint,
    nvlink_crc_errors           bigint,
    nvlink_replay_errors        bigint,
    nvlink_recovery_errors      bigint,
    fabric_status               bigint,
    fabric_clique_id            bigint,
    fabric_health_mask          bigint,
    host_id                     integer NOT NULL,
    util_gpu_pct                real,
    util_mem_pct                real,
    temp_c                      real,
    mem_temp_c                  real,
    temp_slowdown_c             real,
    temp_shutdown_c             real,
    temp_max_operating_c        real,
    temp_mem_max_c              real,
    fan_pct                     real,
    clock_sm_mhz                integer,
    clock_mem_mhz               integer,
    clock_sm_app_mhz            integer,
    gpu_index                   smallint NOT NULL,
    pstate                      smallint,
    pcie_link_gen               smallint,
    pcie_link_width             smallint,
    pcie_link_gen_max           smallint,
    pcie_link_width_max         smallint,
    nvlink_links_total          smallint,
    nvlink_links_up             smallint,
    recovery_action             smallint,
    fabric_state                smallint,
    lost                        boolean NOT NULL,
    ecc_enabled                 boolean,
    retired_pages_pending       boolean,
    remap_pending               boolean,
    remap_failure               boolean,
    persistence_mode            boolean
) PARTITION BY RANGE (ts);
CREATE INDEX gpu_samples_ts ON gpu_samples USING brin (ts);
CREATE INDEX gpu_samples_host_ts ON gpu_samples (host_id, ts);

DO $$
DECLARE
    part record;
    cols text;
BEGIN
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
      FROM pg_attribute WHERE attrelid = 'gpu_samples'::regclass AND attnum > 0 AND NOT attisdropped;
    FOR part IN
        SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'gpu_samples_v1'::regclass ORDER BY c.relname
    LOOP
        EXECUTE format('ALTER TABLE %I RENAME TO %I', part.relname, part.relname || '_v1');
        EXECUTE format('CREATE TABLE %I PARTITION OF gpu_samples %s', part.relname, part.bound);
        EXECUTE format('INSERT INTO %I (%s) SELECT %s FROM %I', part.relname, cols, cols, part.relname || '_v1');
    END LOOP;
END $$;

DROP TABLE gpu_samples_v1;  -- and its old partitions
