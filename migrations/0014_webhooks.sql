-- Issue 15: signed outbound webhooks (src/webhooks/).

-- Endpoints. The secret signs every call, so it is kept as given (unlike API keys, which
-- are only ever checked and are kept as hashes); it is shown once, when the endpoint is made.
CREATE TABLE webhook_endpoints (
    id               UUID PRIMARY KEY,
    url              TEXT NOT NULL,
    -- delivery, notification_status, broadcast
    kinds            TEXT[] NOT NULL,
    secret           TEXT NOT NULL,
    description      TEXT,
    created_by       TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Since when every call has failed (NULL while it answers); a day of it disables it.
    failing_since    TIMESTAMPTZ,
    disabled_at      TIMESTAMPTZ,
    disabled_reason  TEXT,
    deleted_at       TIMESTAMPTZ,
    deleted_by       TEXT
);

-- Calls: one per event and subscribed endpoint, which is also the endpoint's delivery log.
-- `source` is the event's topic position: reading a record twice makes one call.
CREATE TABLE webhook_deliveries (
    id                UUID PRIMARY KEY,
    endpoint_id       UUID NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    source            TEXT NOT NULL,
    kind              TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    payload           BYTEA NOT NULL,
    status            TEXT NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'SUCCESS', 'FAILED')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until       TIMESTAMPTZ,
    give_up_at        TIMESTAMPTZ NOT NULL,
    -- How long it is retried (HERALD_WEBHOOK_GIVE_UP_AFTER when it was made): an operator's
    -- retry of its dead letter gives it that long again.
    retry_window      INTERVAL NOT NULL,
    last_status_code  INTEGER,
    last_error        TEXT,
    last_attempt_at   TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at      TIMESTAMPTZ,
    UNIQUE (endpoint_id, source)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (endpoint_id, id DESC);
