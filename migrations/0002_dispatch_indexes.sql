-- The dispatcher claims per channel, so that one slow channel never starves the others:
-- its queries filter on the channel first.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (channel, next_attempt_at) WHERE status = 'PENDING';
DROP INDEX deliveries_leased;
CREATE INDEX deliveries_leased ON deliveries (channel, lease_until) WHERE status = 'PROCESSING';
-- The relay publishes in id order; published rows are pruned by age.
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
