-- Dead letters are identified by the id they were given when they were made (the
-- X-Dead-Letter-Id header, written with the outbox row), not by where they sit in a topic:
-- offsets start again at 0 when a DLQ topic is recreated or a broker loses its data, and
-- the original coordinates of a poison message repeat the same way. Positions stay as
-- information for operators; they no longer decide what is a duplicate.
ALTER TABLE dlq_messages DROP CONSTRAINT dlq_messages_topic_kafka_partition_kafka_offset_key;
DROP INDEX dlq_messages_poison;
-- The id of the dead letter a row shows (the latest one for a delivery's row, which an
-- operator's retry can reopen). NULL on rows stored before this migration.
ALTER TABLE dlq_messages ADD COLUMN dead_letter_id UUID;

-- Every dead-letter id the DLQ consumer has taken, so that a copy the relay published twice
-- (or one read again after a rebalance) is stored once, while two different failures never
-- merge. Kept apart from dlq_messages because a delivery's row absorbs several letters.
CREATE TABLE dlq_letters_seen (
    dead_letter_id  UUID PRIMARY KEY,
    seen_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Outbox rows Kafka will never take (too large, invalid): moved out of the relay's way with
-- the broker's error, for operators (README, "Parked messages"). The id is the outbox row's.
CREATE TABLE outbox_parked (
    id           BIGINT PRIMARY KEY,
    kind         TEXT NOT NULL,
    topic        TEXT NOT NULL,
    message_key  BYTEA,
    payload      BYTEA NOT NULL,
    headers      JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    error        TEXT NOT NULL,
    parked_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Records a consumer could not store (PostgreSQL refused the data: a constraint, a NUL in
-- a text, a value out of range), kept with the reason so the consumer can move on. Headers
-- are kept as JSON text in BYTEA because a header may hold what JSONB refuses.
CREATE TABLE parked_records (
    id               BIGSERIAL PRIMARY KEY,
    consumer_group   TEXT NOT NULL,
    topic            TEXT NOT NULL,
    kafka_partition  INTEGER NOT NULL,
    kafka_offset     BIGINT NOT NULL,
    message_key      BYTEA,
    payload          BYTEA NOT NULL,
    headers          BYTEA NOT NULL,
    reason           TEXT NOT NULL,
    parked_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX parked_records_recent ON parked_records (parked_at DESC);
