-- Issue 16: finding dead letters. The event type (read from the payload when the letter is
-- stored, where it is JSON with an eventType) and a fingerprint: the error class and message
-- with ids (UUIDs, hex strings of 8 or more) and numbers normalised, so that 10,000 letters with one cause read as one line.
ALTER TABLE dlq_messages ADD COLUMN event_type TEXT;
ALTER TABLE dlq_messages ADD COLUMN fingerprint TEXT GENERATED ALWAYS AS (
    COALESCE(error_class, '') || ': ' || left(
        regexp_replace(
            regexp_replace(
                regexp_replace(COALESCE(error_message, ''),
                    '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}',
                    '<id>', 'g'),
                '\m[0-9a-fA-F]{8,}\M',
                '<id>', 'g'),
            '[0-9]+', '<n>', 'g'),
        300)
) STORED;
CREATE INDEX dlq_messages_fingerprint ON dlq_messages (fingerprint, received_at DESC);
