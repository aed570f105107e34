-- Remediation (docs/remediation.md): each action (a remediation rule applied to one alert
-- episode) with its state, the audit trail of everything proposed, approved, denied, run,
-- failed and undone, and each provider's circuit breaker. The action id is stable
-- (rule, alert fingerprint, episode), so a restarted collector neither starts an action
-- twice nor drains a node twice.
CREATE TABLE IF NOT EXISTS remediation_actions (
    id          text PRIMARY KEY,
    rule        text NOT NULL,
    fingerprint text NOT NULL,
    host        text NOT NULL,
    provider    text NOT NULL,
    node        text NOT NULL,
    mode        text NOT NULL,
    state       text NOT NULL,
    created_at  double precision NOT NULL,
    updated_at  double precision NOT NULL,
    record      jsonb NOT NULL                 -- collector.remediation.engine.Action.to_dict()
);
CREATE INDEX IF NOT EXISTS remediation_actions_host ON remediation_actions (host);
CREATE INDEX IF NOT EXISTS remediation_actions_updated ON remediation_actions (updated_at);

CREATE TABLE IF NOT EXISTS remediation_audit (
    id          bigserial PRIMARY KEY,
    action_id   text,                          -- NULL for a breaker's events
    at          double precision NOT NULL,
    event       text NOT NULL,                 -- proposed, planned, approved, denied, blocked, started, ...
    who         text NOT NULL,
    why         text NOT NULL DEFAULT '',
    step        text NOT NULL DEFAULT '',
    exit_code   integer,
    output      text NOT NULL DEFAULT '',      -- the tail of a step's output (4 KiB)
    provider    text NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS remediation_audit_action ON remediation_audit (action_id, id);

CREATE TABLE IF NOT EXISTS remediation_breakers (
    provider    text PRIMARY KEY,
    record      jsonb NOT NULL                 -- collector.remediation.engine.BreakerState.to_dict()
);
