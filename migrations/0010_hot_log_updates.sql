-- Fewer index entries per event (issue 14, lever 9).
--
-- notification_log: a delivery's outcome updated its log row with a new entry in every
-- index, because `status` (changed by the outcome) sat in the predicate of
-- notification_log_failures. That index now keys on `failed_at`, a column generated from
-- the status that stays NULL unless the delivery FAILED: an outcome other than FAILED
-- changes no indexed column, so its update can be HOT (no index entry written), and a
-- fillfactor leaves each page room for it.
ALTER TABLE notification_log
    ADD COLUMN failed_at TIMESTAMPTZ
        GENERATED ALWAYS AS (CASE WHEN status = 'FAILED' THEN completed_at END) STORED;
DROP INDEX notification_log_failures;
CREATE INDEX notification_log_failures
    ON notification_log (failed_at DESC) WHERE failed_at IS NOT NULL;
ALTER TABLE notification_log SET (fillfactor = 80);

-- notifications: nothing looks a notification up by eventId alone. The consumers' lookup is
-- notifications_kafka_event (source_topic, event_id), which an operator can use as well.
DROP INDEX notifications_event_id;
