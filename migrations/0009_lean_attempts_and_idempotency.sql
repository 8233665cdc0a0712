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
