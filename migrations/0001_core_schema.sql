-- Herald's core schema: the write side (notifications, deliveries, idempotency, outbox),
-- the user directory, the read model (notification_log, delivery_stats) and dead letters.
-- See ../shared/DESIGN.md §1-§4. Enumerations are TEXT with CHECK constraints rather than
-- PostgreSQL enums, so a later migration can add a value inside a transaction.

-- The user directory: where and how to reach a user. The envelope's recipient overrides it.
CREATE TABLE user_contacts (
    user_id     BIGINT PRIMARY KEY CHECK (user_id > 0),
    email       TEXT,
    phone       TEXT,
    locale      TEXT,
    timezone    TEXT,
    -- Targeting attributes (age group, tags...) for broadcasts.
    attributes  JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Per-user channel opt-outs. event_type '*' applies to every event type; a row for a
-- specific event type wins over the '*' row.
CREATE TABLE user_preferences (
    user_id     BIGINT NOT NULL CHECK (user_id > 0),
    channel     TEXT NOT NULL
                CHECK (channel IN ('EMAIL', 'SLACK', 'IN_APP', 'SMS', 'KAKAOTALK', 'PUSH')),
    event_type  TEXT NOT NULL DEFAULT '*',
    enabled     BOOLEAN NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, channel, event_type)
);

-- One accepted event or HTTP request. Its overall status is derived from its deliveries
-- when read, never stored.
CREATE TABLE notifications (
    id               UUID PRIMARY KEY,
    -- Where it came from: a Kafka consumer, the HTTP intake or a broadcast.
    source           TEXT NOT NULL CHECK (source IN ('kafka', 'api', 'broadcast')),
    -- payment | subscription | order | api: picks the dead-letter topic.
    domain           TEXT NOT NULL,
    event_id         TEXT,
    event_type       TEXT NOT NULL,
    user_id          BIGINT CHECK (user_id > 0),
    -- The recipient as resolved at intake (envelope over directory).
    recipient        JSONB NOT NULL DEFAULT '{}'::jsonb,
    locale           TEXT NOT NULL,
    data             JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- Ad-hoc content of an HTTP intake without a template.
    subject          TEXT,
    body             TEXT,
    -- The original message, so a dead letter can carry the original bytes.
    raw_event        BYTEA,
    source_topic     TEXT,
    source_partition INTEGER,
    source_offset    BIGINT,
    occurred_at      TIMESTAMPTZ,
    scheduled_at     TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX notifications_user_created ON notifications (user_id, created_at DESC);
CREATE INDEX notifications_event_id ON notifications (event_id) WHERE event_id IS NOT NULL;

-- One channel of one notification. The dispatcher's work queue.
CREATE TABLE deliveries (
    id               UUID PRIMARY KEY,
    notification_id  UUID NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    channel          TEXT NOT NULL
                     CHECK (channel IN ('EMAIL', 'SLACK', 'IN_APP', 'SMS', 'KAKAOTALK', 'PUSH')),
    status           TEXT NOT NULL
                     CHECK (status IN ('PENDING', 'PROCESSING', 'SUCCESS', 'FAILED', 'SKIPPED')),
    -- The resolved destination (email address, phone, webhook name, user channel).
    address          TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set while PROCESSING: past it, the worker is presumed dead and the row is reclaimed.
    lease_until      TIMESTAMPTZ,
    last_error       TEXT,
    error_class      TEXT,
    -- Why a SKIPPED delivery was not sent (opted out, no address, channel not configured).
    skip_reason      TEXT,
    -- The provider's reference for a sent message (gateway messageId).
    provider_ref     TEXT,
    -- The channel this delivery actually went out on when a fallback was used.
    sent_via         TEXT,
    -- Grows with every state change; orders delivery events for the read model.
    version          BIGINT NOT NULL DEFAULT 1,
    -- In-app inbox read state.
    read_at          TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at     TIMESTAMPTZ,
    UNIQUE (notification_id, channel)
);
-- The dispatcher's claim query: due PENDING rows, oldest first.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'PENDING';
-- The lease sweep: PROCESSING rows whose worker may have died.
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE status = 'PROCESSING';

-- Every send attempt, for audit and latency figures.
CREATE TABLE delivery_attempts (
    delivery_id  UUID NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL CHECK (attempt > 0),
    channel      TEXT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    latency_ms   INTEGER NOT NULL,
    outcome      TEXT NOT NULL CHECK (outcome IN ('SUCCESS', 'RETRYABLE', 'PERMANENT')),
    error        TEXT,
    PRIMARY KEY (delivery_id, attempt)
);

-- Idempotency of the Kafka consumers: an event is processed once per consumer group.
CREATE TABLE processed_events (
    consumer_group   TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    notification_id  UUID,
    processed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);

-- Idempotency of the HTTP intake: the first response to a key is replayed.
CREATE TABLE idempotency_keys (
    idempotency_key  TEXT PRIMARY KEY,
    request_hash     TEXT NOT NULL,
    response_status  SMALLINT NOT NULL,
    response_body    JSONB NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Transactional outbox: Kafka messages written in the same transaction as the state they
-- describe, published by the relay afterwards (at least once).
CREATE TABLE outbox (
    id            BIGSERIAL PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('delivery_event', 'dead_letter', 'broadcast_event')),
    -- Full topic name, prefix included.
    topic         TEXT NOT NULL,
    message_key   BYTEA,
    payload       BYTEA NOT NULL,
    -- Kafka headers as a JSON object of UTF-8 strings.
    headers       JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at  TIMESTAMPTZ
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Read model: one row per delivery, projected from notification.delivery.events.
-- `version` guards against a replayed or late event moving a row backwards.
CREATE TABLE notification_log (
    delivery_id      UUID PRIMARY KEY,
    notification_id  UUID NOT NULL,
    event_id         TEXT,
    event_type       TEXT NOT NULL,
    user_id          BIGINT,
    channel          TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    title            TEXT,
    version          BIGINT NOT NULL,
    read_at          TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    completed_at     TIMESTAMPTZ,
    -- Set once the terminal outcome has been counted in delivery_stats.
    counted_at       TIMESTAMPTZ
);
CREATE INDEX notification_log_user_history
    ON notification_log (user_id, created_at DESC, delivery_id DESC);
CREATE INDEX notification_log_failures
    ON notification_log (completed_at DESC) WHERE status = 'FAILED';

-- Read model: terminal outcomes per reporting day and channel.
CREATE TABLE delivery_stats (
    day      DATE NOT NULL,
    channel  TEXT NOT NULL,
    success  BIGINT NOT NULL DEFAULT 0,
    failed   BIGINT NOT NULL DEFAULT 0,
    skipped  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, channel)
);

-- Dead letters consumed from notification.dlq.<domain>, for the admin API.
CREATE TABLE dlq_messages (
    id               UUID PRIMARY KEY,
    domain           TEXT NOT NULL,
    topic            TEXT NOT NULL,
    kafka_partition  INTEGER NOT NULL,
    kafka_offset     BIGINT NOT NULL,
    message_key      BYTEA,
    payload          BYTEA NOT NULL,
    headers          JSONB NOT NULL DEFAULT '{}'::jsonb,
    error_class      TEXT,
    error_message    TEXT,
    failed_channel   TEXT,
    event_id         TEXT,
    notification_id  UUID,
    delivery_id      UUID,
    status           TEXT NOT NULL DEFAULT 'PENDING'
                     CHECK (status IN ('PENDING', 'RETRIED', 'DISCARDED')),
    retry_outcome    TEXT,
    actioned_by      TEXT,
    actioned_at      TIMESTAMPTZ,
    failed_at        TIMESTAMPTZ,
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (topic, kafka_partition, kafka_offset)
);
-- A delivery failure is stored once even if the relay published it twice.
CREATE UNIQUE INDEX dlq_messages_delivery ON dlq_messages (delivery_id)
    WHERE delivery_id IS NOT NULL;
CREATE INDEX dlq_messages_listing ON dlq_messages (status, received_at DESC, id);
