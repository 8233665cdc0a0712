-- Read model: which terminal outcome of a delivery is counted in delivery_stats, and on
-- which reporting day, so that each delivery is counted exactly once even under replay,
-- and moved (not counted twice) when an operator's retry changes its outcome.
ALTER TABLE notification_log DROP COLUMN counted_at;
ALTER TABLE notification_log ADD COLUMN counted_status TEXT;
ALTER TABLE notification_log ADD COLUMN counted_day DATE;
CREATE INDEX notification_log_inbox
    ON notification_log (user_id, created_at DESC) WHERE channel = 'IN_APP' AND read_at IS NULL;

-- Deliveries: an operator's retry of a dead letter starts a fresh retry budget at the
-- attempts made so far (attempt numbers keep growing, so the audit trail stays whole).
ALTER TABLE deliveries ADD COLUMN retry_base INTEGER NOT NULL DEFAULT 0;

-- Dead letters: where the failed message originally was. A poison message is stored once
-- per original position; a delivery failure once per delivery.
ALTER TABLE dlq_messages ADD COLUMN original_topic TEXT;
ALTER TABLE dlq_messages ADD COLUMN original_partition INTEGER;
ALTER TABLE dlq_messages ADD COLUMN original_offset BIGINT;
CREATE UNIQUE INDEX dlq_messages_poison
    ON dlq_messages (original_topic, original_partition, original_offset)
    WHERE delivery_id IS NULL AND original_topic IS NOT NULL;
