-- Issue 14: a durable mark before a quick channel's sends.
--
-- A channel whose sends are quick sends its due deliveries inside the transaction that
-- locks them, and records them there, without a claim (`dispatch::send_speed`). Should that
-- transaction die after a send (the process killed, PostgreSQL restarted), the delivery is
-- PENDING again with no trace of the attempt. So before a batch goes out, one row here
-- names its deliveries, committed on its own; the transaction deletes it with its record.
-- A row whose transaction died stays, and a sweep counts an attempt on each delivery it
-- names once no transaction holds them (`deliveries::count_abandoned_marks`). One row per
-- batch of sends, where a claim wrote a row version and three index entries per delivery.
CREATE TABLE send_marks (
    id          BIGSERIAL PRIMARY KEY,
    deliveries  UUID[] NOT NULL,
    marked_at   TIMESTAMPTZ NOT NULL DEFAULT now()
) WITH (
    -- Every row is deleted within milliseconds: vacuumed often, so it stays a few pages.
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000
);
