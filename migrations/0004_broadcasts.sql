-- Broadcasts: one message fanned out to an audience (explicit user ids or a segment of the
-- user directory), through the same notifications and deliveries as everything else.

CREATE TABLE broadcasts (
    id               UUID PRIMARY KEY,
    name             TEXT,
    status           TEXT NOT NULL
                     CHECK (status IN ('SCHEDULED', 'RUNNING', 'COMPLETED', 'CANCELLED', 'FAILED')),
    -- The request's audience: {"userIds": [...]} or {"segment": {...}}.
    audience         JSONB NOT NULL,
    channels         TEXT[] NOT NULL,
    event_type       TEXT NOT NULL,
    data             JSONB NOT NULL DEFAULT '{}'::jsonb,
    subject          TEXT,
    body             TEXT,
    scheduled_at     TIMESTAMPTZ NOT NULL,
    -- Recipients in the audience snapshot (set when the fan-out starts).
    audience_total   INTEGER,
    -- Recipients fanned out so far, and the last user id fanned out (the resume point).
    created_count    INTEGER NOT NULL DEFAULT 0,
    cursor_user_id   BIGINT NOT NULL DEFAULT 0,
    -- The instance fanning it out holds it until then; past it another one resumes it.
    lease_until      TIMESTAMPTZ,
    error            TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    fanned_out_at    TIMESTAMPTZ,
    cancelled_at     TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ
);
-- The fan-out loop's pick: due broadcasts not yet finished.
CREATE INDEX broadcasts_active ON broadcasts (scheduled_at)
    WHERE status IN ('SCHEDULED', 'RUNNING') OR (status = 'CANCELLED' AND finished_at IS NULL);

-- The audience, frozen when the fan-out starts: later directory changes do not move it.
CREATE TABLE broadcast_recipients (
    broadcast_id  UUID NOT NULL REFERENCES broadcasts (id) ON DELETE CASCADE,
    user_id       BIGINT NOT NULL CHECK (user_id > 0),
    PRIMARY KEY (broadcast_id, user_id)
);

-- A broadcast's notifications and deliveries carry its id: one notification per recipient
-- (a resumed fan-out cannot create a second), and the dispatcher gives broadcast deliveries
-- a bounded share of each channel, after transactional ones.
ALTER TABLE notifications ADD COLUMN broadcast_id UUID REFERENCES broadcasts (id);
CREATE UNIQUE INDEX notifications_broadcast_user
    ON notifications (broadcast_id, user_id) WHERE broadcast_id IS NOT NULL;

ALTER TABLE deliveries ADD COLUMN broadcast_id UUID;
CREATE INDEX deliveries_broadcast ON deliveries (broadcast_id, status)
    WHERE broadcast_id IS NOT NULL;
-- The claim reads transactional and broadcast deliveries apart, so a broadcast backlog of
-- 100,000 rows never sits in front of a payment notification in an index scan.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (channel, next_attempt_at)
    WHERE status = 'PENDING' AND broadcast_id IS NULL;
CREATE INDEX deliveries_due_broadcast ON deliveries (channel, next_attempt_at)
    WHERE status = 'PENDING' AND broadcast_id IS NOT NULL;

-- Targeting attributes live in user_contacts.attributes ({"birthYear": 1990, "tags": [...]});
-- a segment filters on them and on locale.
CREATE INDEX user_contacts_tags ON user_contacts USING gin ((attributes -> 'tags'));

-- Broadcast creation is idempotent per Idempotency-Key, like the notification intake.
ALTER TABLE broadcasts ADD COLUMN idempotency_key TEXT UNIQUE;
ALTER TABLE broadcasts ADD COLUMN request_hash TEXT;
