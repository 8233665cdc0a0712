-- In-process delivery-health alerts (issue 16, item 8; src/alerts): one row per alert, a
-- rule and what it is about (a channel, a domain, or '' for the whole platform). Written
-- only by the evaluation round (every 30 s, one instance at a time under an advisory
-- lock), never on the per-event path. It is what survives a restart or a failover to
-- another instance: since when an alert is pending or firing, and what the ops Slack was
-- last told, so that nothing is announced twice.
CREATE TABLE alert_states (
    -- The alert's name, as in dashboards/alerts.yml (HeraldChannelSuccessRateLow...).
    rule          TEXT NOT NULL,
    subject       TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL CHECK (status IN ('ok', 'pending', 'firing')),
    -- When the status began.
    since         TIMESTAMPTZ NOT NULL,
    -- While firing: since when the condition has been clear (it resolves after
    -- HERALD_ALERTS_RESOLVE_AFTER of it).
    clear_since   TIMESTAMPTZ,
    -- The last round's value (NULL: nothing to measure) and the threshold it was held to.
    value         DOUBLE PRECISION,
    threshold     DOUBLE PRECISION NOT NULL,
    -- What the ops Slack was last told, and when; NULL: nothing yet.
    announced     TEXT CHECK (announced IN ('firing', 'resolved')),
    announced_at  TIMESTAMPTZ,
    evaluated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rule, subject)
);
