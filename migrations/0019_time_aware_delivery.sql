-- Time-aware delivery (issue 18; src/timing): quiet hours, frequency caps and digests.

-- Why a PENDING delivery waits past its creation (src/timing/mod.rs `Hold`): scheduled,
-- quiet_hours, frequency_capped, digest, rate_limited, circuit_open. Written when it is
-- created or deferred, cleared when a send is recorded; not indexed, so the updates that
-- set and clear it stay what they were.
ALTER TABLE deliveries ADD COLUMN hold_reason TEXT;

-- One digest: a user's events of one type (and key) gathered until `closes_at`, then sent
-- as one message per channel. Open while `closed_at` is NULL; at most one open digest per
-- user, type and key, which is what joining relies on.
CREATE TABLE digests (
    id              UUID PRIMARY KEY,
    user_id         BIGINT NOT NULL,
    event_type      TEXT NOT NULL,
    -- The value of the route's digest key field, '' without one.
    digest_key      TEXT NOT NULL DEFAULT '',
    opened_at       TIMESTAMPTZ NOT NULL,
    closes_at       TIMESTAMPTZ NOT NULL,
    last_joined_at  TIMESTAMPTZ,
    -- Set by the first claim of its deliveries (or a join after its window): no event
    -- joins it any more.
    closed_at       TIMESTAMPTZ
);
CREATE UNIQUE INDEX digests_open ON digests (user_id, event_type, digest_key)
    WHERE closed_at IS NULL;

-- The digest a delivery is a member of. Members are claimed together, per digest and
-- channel, so the ordinary claim leaves them out (its index too).
ALTER TABLE deliveries ADD COLUMN digest_id UUID;
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (channel, next_attempt_at)
    WHERE status = 'PENDING' AND broadcast_id IS NULL AND digest_id IS NULL;
CREATE INDEX deliveries_due_digest ON deliveries (channel, next_attempt_at)
    WHERE status = 'PENDING' AND digest_id IS NOT NULL;
CREATE INDEX deliveries_digest ON deliveries (digest_id, channel) WHERE digest_id IS NOT NULL;

-- A user's own quiet hours (a JSON array of {from, to, channels?}); no row: the event
-- types' defaults from the routing file; an empty array: none at all.
CREATE TABLE user_quiet_hours (
    user_id     BIGINT PRIMARY KEY,
    windows     JSONB NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The read model shows why a PENDING delivery waits and until when, and the digest it
-- went out in.
ALTER TABLE notification_log ADD COLUMN hold_reason TEXT;
ALTER TABLE notification_log ADD COLUMN hold_until TIMESTAMPTZ;
ALTER TABLE notification_log ADD COLUMN digest_id UUID;
