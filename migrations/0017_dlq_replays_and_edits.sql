-- Issue 16: replaying dead letters safely, and correcting them first.

-- How many times operators replayed a letter (a letter that fails again after a replay
-- carries the count on, in X-Replay-Count); beyond the cap a replay needs force.
ALTER TABLE dlq_messages ADD COLUMN replay_count INTEGER NOT NULL DEFAULT 0;
-- A poison message as an operator corrected it: re-ingested instead of `payload`, which
-- keeps the bytes as they arrived.
ALTER TABLE dlq_messages ADD COLUMN edited_payload BYTEA;

-- Where a delivery came from when an operator's replay made or re-queued it: the dead
-- letter and its replay count. NULL for every other delivery (no cost on the write path).
ALTER TABLE deliveries ADD COLUMN replay_of UUID;
ALTER TABLE deliveries ADD COLUMN replay_count INTEGER;

-- A replay by filter (POST /api/v1/admin/dlq/replay), worked through in the background at
-- its rate by one instance at a time (the lease), resumed by any instance after a crash.
CREATE TABLE dlq_replays (
    id               UUID PRIMARY KEY,
    -- The filters as the operator gave them (for display; the letters are listed in
    -- dlq_replay_items when the replay is made).
    filter           JSONB NOT NULL,
    rate_per_second  INTEGER NOT NULL CHECK (rate_per_second > 0),
    force            BOOLEAN NOT NULL,
    status           TEXT NOT NULL DEFAULT 'RUNNING'
                     CHECK (status IN ('RUNNING', 'COMPLETED', 'CANCELLED')),
    total            INTEGER NOT NULL,
    requeued         INTEGER NOT NULL DEFAULT 0,
    reingested       INTEGER NOT NULL DEFAULT 0,
    skipped          INTEGER NOT NULL DEFAULT 0,
    failed           INTEGER NOT NULL DEFAULT 0,
    -- Why letters were skipped: {"replay_cap": 3, "delivery is SUCCESS, not FAILED": 1}.
    skipped_reasons  JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_by       TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at      TIMESTAMPTZ,
    cancelled_by     TEXT,
    lease_owner      UUID,
    lease_until      TIMESTAMPTZ
);
CREATE INDEX dlq_replays_running ON dlq_replays (created_at) WHERE status = 'RUNNING';

-- The letters a replay found when it was made, in order. An item is done (outcome set) in
-- the same transaction as the letter's retry, so a replay resumed after a crash goes on
-- from the first item not done and replays nothing twice.
CREATE TABLE dlq_replay_items (
    replay_id  UUID NOT NULL REFERENCES dlq_replays (id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    letter_id  UUID NOT NULL REFERENCES dlq_messages (id) ON DELETE CASCADE,
    -- REQUEUED, REINGESTED, SKIPPED or FAILED; NULL until done.
    outcome    TEXT,
    reason     TEXT,
    done_at    TIMESTAMPTZ,
    PRIMARY KEY (replay_id, position)
);
CREATE INDEX dlq_replay_items_letter ON dlq_replay_items (letter_id);

-- Every correction of a dead letter: who, when, and what changed (an RFC 6902 patch from
-- the value before to the value after, both kept).
CREATE TABLE dlq_edits (
    id         UUID PRIMARY KEY,
    letter_id  UUID NOT NULL REFERENCES dlq_messages (id) ON DELETE CASCADE,
    -- payload (a poison message's event) or delivery (a failed delivery's data and address)
    target     TEXT NOT NULL CHECK (target IN ('payload', 'delivery')),
    edited_by  TEXT NOT NULL,
    edited_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    before     JSONB NOT NULL,
    after      JSONB NOT NULL,
    diff       JSONB NOT NULL
);
CREATE INDEX dlq_edits_letter ON dlq_edits (letter_id, edited_at);
