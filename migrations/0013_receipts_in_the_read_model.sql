-- Issue 15: the read model learns receipts from the delivery events that carry them. The
-- log row shows a delivery's latest receipt; delivery_stats counts, per day of the send and
-- channel, the sends a provider reported DELIVERED and those it reported UNDELIVERED or
-- BOUNCED (the dashboard's delivered rate).
ALTER TABLE notification_log
    ADD COLUMN receipt_status TEXT,
    ADD COLUMN receipt_reason TEXT,
    ADD COLUMN receipt_permanent BOOLEAN,
    ADD COLUMN receipt_at TIMESTAMPTZ;

ALTER TABLE delivery_stats
    ADD COLUMN delivered BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN undelivered BIGINT NOT NULL DEFAULT 0;
