-- Fewer row versions per event (issue 14, levers 3 and 4).

-- Lever 3: a send that succeeds on its delivery's first attempt writes no delivery_attempts
-- row. Its timing goes onto the delivery, in the UPDATE that records the success anyway, so
-- the common case costs no extra row. Failures (retryable or permanent) and every attempt
-- after one (a retry, or a reclaim after a worker died, including its success) still get a
-- row: the attempts table keeps the audit of everything that went wrong.
-- Nullable and without a default, so adding them rewrites nothing.
ALTER TABLE deliveries
    ADD COLUMN first_attempt_started_at TIMESTAMPTZ,
    ADD COLUMN first_attempt_latency_ms INTEGER;

-- Every attempt, from wherever it is stored: what readers of attempt timing (latency
-- figures, rate audits, tests) query instead of delivery_attempts. Deliveries recorded
-- before this migration have their first success in delivery_attempts and NULL columns
-- above, so each attempt still appears once. The channel is the one the attempt used (a
-- fallback's when there was one), as in delivery_attempts.
CREATE VIEW delivery_attempt_log AS
    SELECT delivery_id, attempt, channel, started_at, latency_ms, outcome, error
    FROM delivery_attempts
    UNION ALL
    SELECT id, 1, COALESCE(sent_via, channel), first_attempt_started_at,
           first_attempt_latency_ms, 'SUCCESS', NULL
    FROM deliveries
    WHERE first_attempt_started_at IS NOT NULL;

-- Lever 4: the Kafka consumers' idempotency is a unique key on the notification itself
-- instead of a processed_events row per event. processed_events was keyed by (consumer
-- group, eventId); a consumer group is the topic prefix plus a fixed name per domain, and so
-- is the topic a Kafka notification records in source_topic, so (source_topic, event_id)
-- is the same key: every existing Kafka notification was stored after winning its
-- processed_events row, so the index builds on existing data. Every processed_events row
-- had a notification (poison messages never got one), so nothing else needs the table.
-- Intake and broadcast notifications (source 'api' or 'broadcast') are outside the index:
-- an eventId they share with a Kafka event does not collide.
CREATE UNIQUE INDEX notifications_kafka_event
    ON notifications (source_topic, event_id) WHERE source = 'kafka';

DROP TABLE processed_events;
