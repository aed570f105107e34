-- GpuSample fields added for the rest of a GPU node (docs/protocol.md): HBM temperature limit,
-- SM application clock, NVSwitch fabric registration. NULL in rows written before.
ALTER TABLE gpu_samples
    ADD COLUMN IF NOT EXISTS temp_mem_max_c     double precision,
    ADD COLUMN IF NOT EXISTS clock_sm_app_mhz   integer,
    ADD COLUMN IF NOT EXISTS fabric_state       smallint,
    ADD COLUMN IF NOT EXISTS fabric_status      bigint,
    ADD COLUMN IF NOT EXISTS fabric_clique_id   bigint,
    ADD COLUMN IF NOT EXISTS fabric_health_mask bigint;
