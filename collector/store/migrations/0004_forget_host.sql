-- gpuwarden collector schema, version 4: forgetting a host, and why an alert resolved.

-- Set by `gpuwarden collector forget-host` / DELETE /api/v1/hosts/{host}: the host is left
-- out of the fleet state rebuilt at start; its history (samples, events, alerts) stays. The
-- collector clears it when the host reports again (it comes back as a new host).
ALTER TABLE hosts ADD COLUMN forgotten_at timestamptz;

-- A resolution's reason when no healthy reading resolved it: replaced (a new GPU in the
-- slot), moved (the host reports under another provider), forgotten, evicted (bounds).
ALTER TABLE alert_transitions ADD COLUMN reason text;
