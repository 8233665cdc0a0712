-- Issue 15: gateways that do not call back are polled for each sent message's receipt
-- (src/receipts/poll.rs). A row lives from the record of the send until a final answer or
-- the deadline.
CREATE TABLE receipt_polls (
    delivery_id   UUID PRIMARY KEY REFERENCES deliveries (id) ON DELETE CASCADE,
    channel       TEXT NOT NULL,
    provider_ref  TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_poll_at  TIMESTAMPTZ NOT NULL,
    give_up_at    TIMESTAMPTZ NOT NULL,
    lease_until   TIMESTAMPTZ,
    last_error    TEXT
);
CREATE INDEX receipt_polls_due ON receipt_polls (next_poll_at);
