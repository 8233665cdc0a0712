-- Issue 15: what providers say became of a message after accepting it, and the addresses
-- that must not be sent to again.

-- The receipt state beside the delivery status (which keeps its meaning: SUCCESS is "the
-- provider accepted it"). `receipt_at` is the provider's time of the latest receipt applied;
-- an older receipt arriving later is not applied over a newer one.
ALTER TABLE deliveries
    ADD COLUMN receipt_status TEXT,
    ADD COLUMN receipt_reason TEXT,
    ADD COLUMN receipt_permanent BOOLEAN,
    ADD COLUMN receipt_at TIMESTAMPTZ;
-- NOT VALID: the new column is NULL in every existing row, so there is nothing to check, and
-- a validating scan would hold the table's lock for as long as it takes.
ALTER TABLE deliveries ADD CONSTRAINT deliveries_receipt_status_check
    CHECK (receipt_status IN ('DELIVERED', 'UNDELIVERED', 'BOUNCED')) NOT VALID;

-- Receipts find their delivery by the provider's message id, on the channel the message
-- went out on (a fallback's, when it took one). Only the gateway channels are indexed (an
-- in-app delivery's provider_ref counts subscribers, and an email is found by the delivery
-- id its Message-ID carries), so other channels' updates pay nothing for it.
CREATE INDEX deliveries_gateway_ref ON deliveries ((COALESCE(sent_via, channel)), provider_ref)
    WHERE provider_ref IS NOT NULL AND COALESCE(sent_via, channel) IN ('SMS', 'KAKAOTALK', 'PUSH');

-- Every receipt received, signed and fresh: its webhook-id refuses a replay, and one that
-- names a message no delivery has yet (the provider called back before the send was
-- recorded) waits here, unmatched, until the sweeper finds its delivery.
CREATE TABLE receipts (
    channel       TEXT NOT NULL,
    webhook_id    TEXT NOT NULL,
    provider_ref  TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('DELIVERED', 'UNDELIVERED', 'BOUNCED')),
    reason        TEXT,
    permanent     BOOLEAN NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivery_id   UUID,
    -- applied, superseded (an older receipt than the one applied) or NULL while unmatched.
    outcome       TEXT,
    -- When the sweeper last looked for its delivery (the least recently checked go first).
    checked_at    TIMESTAMPTZ,
    PRIMARY KEY (channel, webhook_id)
);
CREATE INDEX receipts_unmatched ON receipts (checked_at NULLS FIRST) WHERE delivery_id IS NULL;
CREATE INDEX receipts_received ON receipts (received_at);

-- Addresses a channel must not send to: a hard bounce or a permanent undeliverable receipt
-- adds one; an operator lifts it (kept for audit).
CREATE TABLE suppressions (
    id            UUID PRIMARY KEY,
    channel       TEXT NOT NULL,
    address       TEXT NOT NULL,
    reason        TEXT NOT NULL,
    delivery_id   UUID,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    lifted_at     TIMESTAMPTZ,
    lifted_by     TEXT
);
CREATE UNIQUE INDEX suppressions_active ON suppressions (channel, address) WHERE lifted_at IS NULL;
