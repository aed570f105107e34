-- gpuwarden collector schema, version 2: alert state, history and the notification outbox.
-- Each collector partition owns its hosts' alerts (partition column); see docs/alerts.md
-- ("Persistence") for what is written when.

-- Current state of every alert the engine holds (one row per fingerprint). ``data`` is the
-- engine's record (collector.alerts.model.Alert) including its escalation state: policy,
-- level reached, when escalation started counting, channels told this episode.
CREATE TABLE alerts (
    fingerprint  text PRIMARY KEY,
    partition    integer NOT NULL,
    rule         text NOT NULL,
    labels       jsonb NOT NULL,
    severity     text NOT NULL,
    state        text NOT NULL,
    level        integer NOT NULL DEFAULT -1,
    policy       text,
    incident     text,
    data         jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alerts_partition ON alerts (partition);

-- Every transition (pending, firing, resolved, acknowledged, silenced, ...), append-only.
CREATE TABLE alert_transitions (
    id           bigserial PRIMARY KEY,
    partition    integer NOT NULL,
    fingerprint  text NOT NULL,
    rule         text NOT NULL,
    labels       jsonb NOT NULL,
    at           timestamptz NOT NULL,
    kind         text NOT NULL,
    state        text NOT NULL,
    severity     text NOT NULL,
    summary      text NOT NULL,
    incident     text
);
CREATE INDEX alert_transitions_fp ON alert_transitions (fingerprint, at);
CREATE INDEX alert_transitions_at ON alert_transitions USING brin (at);

CREATE TABLE incidents (
    id           text PRIMARY KEY,
    partition    integer NOT NULL,
    provider     text NOT NULL,
    host         text,
    opened_at    timestamptz NOT NULL,
    closed_at    timestamptz,
    data         jsonb NOT NULL
);
CREATE INDEX incidents_partition ON incidents (partition, closed_at);

-- Silences added at run time (API). Config-file silences are not stored: the file is.
CREATE TABLE silences (
    id           text PRIMARY KEY,
    matchers     jsonb NOT NULL,
    starts_at    timestamptz NOT NULL,
    ends_at      timestamptz NOT NULL,
    author       text NOT NULL,
    comment      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expired_at   timestamptz
);

-- The rest of a partition's alert-engine state (open incident slots, hosts seen, active
-- silences, next due time) and its health state (collector.health.codec snapshot).
CREATE TABLE alert_engine_state (
    partition    integer PRIMARY KEY,
    data         jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE health_state (
    partition    integer PRIMARY KEY,
    data         jsonb NOT NULL,
    saved_at     timestamptz NOT NULL DEFAULT now()
);

-- Transactional outbox: written with the alert change that caused it, then delivered and
-- marked sent (or failed, with a dead-letter row). ``delivery_key`` makes a delivery unique.
CREATE TABLE notification_outbox (
    id            bigserial PRIMARY KEY,
    partition     integer NOT NULL,
    channel       text NOT NULL,
    delivery_key  text NOT NULL UNIQUE,
    payload       jsonb NOT NULL,
    status        text NOT NULL DEFAULT 'pending',  -- pending | sent | failed
    attempts      integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    last_error    text
);
CREATE INDEX notification_outbox_pending ON notification_outbox (partition, id) WHERE status = 'pending';

CREATE TABLE notification_dead_letter (
    id          bigserial PRIMARY KEY,
    outbox_id   bigint NOT NULL REFERENCES notification_outbox (id),
    channel     text NOT NULL,
    payload     jsonb NOT NULL,
    error       text NOT NULL,
    attempts    integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
