-- gpuwarden collector schema, version 1.
-- Sample tables are range-partitioned by day on ts; the collector creates the daily
-- partitions (gpu_samples_pYYYYMMDD, host_samples_pYYYYMMDD) ahead of time and drops them
-- after retention. Unavailable values are NULL, never NaN or -1.

CREATE TABLE providers (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    first_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE hosts (
    id              serial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    provider_id     integer NOT NULL REFERENCES providers (id),
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    boot_id         text,
    backend         text,
    driver_version  text,
    cuda_version    text,
    nvml_version    text,
    facts           jsonb,
    inventory_ts    timestamptz
);
CREATE INDEX hosts_provider ON hosts (provider_id);

-- One row per physical GPU of a host (by UUID); idx is its current index.
CREATE TABLE gpus (
    id              serial PRIMARY KEY,
    host_id         integer NOT NULL REFERENCES hosts (id),
    uuid            text NOT NULL,
    idx             smallint NOT NULL,
    name            text,
    serial          text,
    pci_bus_id      text,
    mem_total_bytes bigint,
    vbios           text,
    mig_mode        boolean,
    info            jsonb,
    present         boolean NOT NULL DEFAULT true,
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    UNIQUE (host_id, uuid)
);

CREATE TABLE gpu_inventory_changes (
    id        bigserial PRIMARY KEY,
    host_id   integer NOT NULL REFERENCES hosts (id),
    uuid      text NOT NULL,
    ts        timestamptz NOT NULL,
    change    text NOT NULL CHECK (change IN ('added', 'removed', 'changed')),
    old       jsonb,
    new       jsonb
);
CREATE INDEX gpu_inventory_changes_host_ts ON gpu_inventory_changes (host_id, ts);

-- Every inventory frame once (idempotence on host, boot id, sequence), with its content.
CREATE TABLE inventory_reports (
    host_id  integer NOT NULL REFERENCES hosts (id),
    boot_id  text NOT NULL,
    seq      bigint NOT NULL,
    ts       timestamptz NOT NULL,
    data     jsonb NOT NULL,
    PRIMARY KEY (host_id, boot_id, seq)
);

-- One row per sample frame: the host's system metrics. Its primary key is what makes
-- sample ingest idempotent: the GPU rows of a frame are written only when this row is new.
CREATE TABLE host_samples (
    ts                   timestamptz NOT NULL,
    host_id              integer NOT NULL,
    boot_id              text NOT NULL,
    seq                  bigint NOT NULL,
    interval_s           double precision,
    cpu_pct              double precision,
    cpu_count            integer,
    load_1               double precision,
    load_5               double precision,
    load_15              double precision,
    mem_total_bytes      bigint,
    mem_available_bytes  bigint,
    swap_total_bytes     bigint,
    swap_used_bytes      bigint,
    fds_open             bigint,
    fds_max              bigint,
    uptime_s             double precision,
    -- disks, nics, checks, agent figures and per-GPU processes as compact JSON arrays in the
    -- field order of shared.frames (see docs/storage.md)
    detail               jsonb,
    PRIMARY KEY (host_id, boot_id, seq, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX host_samples_ts ON host_samples USING brin (ts);
CREATE INDEX host_samples_host_ts ON host_samples (host_id, ts);

-- One row per GPU per sample frame; columns named as shared.frames.GpuSample's fields.
CREATE TABLE gpu_samples (
    ts                          timestamptz NOT NULL,
    host_id                     integer NOT NULL,
    gpu_index                   smallint NOT NULL,
    lost                        boolean NOT NULL,
    util_gpu_pct                double precision,
    util_mem_pct                double precision,
    mem_total_bytes             bigint,
    mem_used_bytes              bigint,
    mem_reserved_bytes          bigint,
    temp_c                      double precision,
    mem_temp_c                  double precision,
    temp_slowdown_c             double precision,
    temp_shutdown_c             double precision,
    temp_max_operating_c        double precision,
    fan_pct                     double precision,
    power_w                     double precision,
    power_limit_w               double precision,
    energy_j                    double precision,
    pstate                      smallint,
    clock_sm_mhz                integer,
    clock_mem_mhz               integer,
    clock_event_reasons         bigint,
    throttle_thermal_ns         bigint,
    throttle_power_ns           bigint,
    ecc_enabled                 boolean,
    ecc_sbe_volatile            bigint,
    ecc_dbe_volatile            bigint,
    ecc_sbe_aggregate           bigint,
    ecc_dbe_aggregate           bigint,
    retired_pages_sbe           bigint,
    retired_pages_dbe           bigint,
    retired_pages_pending       boolean,
    remapped_rows_correctable   bigint,
    remapped_rows_uncorrectable bigint,
    remap_pending               boolean,
    remap_failure               boolean,
    pcie_replay_count           bigint,
    pcie_link_gen               smallint,
    pcie_link_width             smallint,
    pcie_link_gen_max           smallint,
    pcie_link_width_max         smallint,
    nvlink_links_total          smallint,
    nvlink_links_up             smallint,
    nvlink_crc_errors           bigint,
    nvlink_replay_errors        bigint,
    nvlink_recovery_errors      bigint,
    recovery_action             smallint,
    persistence_mode            boolean
) PARTITION BY RANGE (ts);
CREATE INDEX gpu_samples_ts ON gpu_samples USING brin (ts);
CREATE INDEX gpu_samples_host_ts ON gpu_samples (host_id, ts);

-- One-minute rollups per GPU, maintained by the writer from newly stored samples only.
CREATE TABLE gpu_rollup_1m (
    host_id        integer NOT NULL,
    gpu_index      smallint NOT NULL,
    minute         timestamptz NOT NULL,
    n              integer NOT NULL,
    temp_c_min     double precision, temp_c_max     double precision, temp_c_sum     double precision, temp_c_n     integer NOT NULL DEFAULT 0,
    util_gpu_pct_min double precision, util_gpu_pct_max double precision, util_gpu_pct_sum double precision, util_gpu_pct_n integer NOT NULL DEFAULT 0,
    util_mem_pct_min double precision, util_mem_pct_max double precision, util_mem_pct_sum double precision, util_mem_pct_n integer NOT NULL DEFAULT 0,
    mem_used_bytes_min double precision, mem_used_bytes_max double precision, mem_used_bytes_sum double precision, mem_used_bytes_n integer NOT NULL DEFAULT 0,
    power_w_min    double precision, power_w_max    double precision, power_w_sum    double precision, power_w_n    integer NOT NULL DEFAULT 0,
    clock_sm_mhz_min double precision, clock_sm_mhz_max double precision, clock_sm_mhz_sum double precision, clock_sm_mhz_n integer NOT NULL DEFAULT 0,
    mem_temp_c_min double precision, mem_temp_c_max double precision, mem_temp_c_sum double precision, mem_temp_c_n integer NOT NULL DEFAULT 0,
    fan_pct_min    double precision, fan_pct_max    double precision, fan_pct_sum    double precision, fan_pct_n    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (host_id, gpu_index, minute)
);
CREATE INDEX gpu_rollup_1m_minute ON gpu_rollup_1m USING brin (minute);

CREATE TABLE events (
    id         bigserial PRIMARY KEY,
    ts         timestamptz NOT NULL,
    host_id    integer NOT NULL REFERENCES hosts (id),
    boot_id    text NOT NULL,
    seq        bigint NOT NULL,
    type       text NOT NULL,
    source     text NOT NULL,
    gpu_index  smallint,
    gpu_uuid   text,
    xid        integer,
    count      bigint,
    value      bigint,
    message    text,
    UNIQUE (host_id, boot_id, seq)
);
CREATE INDEX events_host_ts ON events (host_id, ts);
CREATE INDEX events_ts ON events USING brin (ts);

CREATE TABLE rejected_frames (
    id          bigserial PRIMARY KEY,
    received    timestamptz NOT NULL DEFAULT now(),
    stream_seq  bigint UNIQUE,
    subject     text NOT NULL,
    reason      text NOT NULL,
    field       text,
    size        integer NOT NULL,
    head        bytea NOT NULL
);
CREATE INDEX rejected_frames_received ON rejected_frames (received);
