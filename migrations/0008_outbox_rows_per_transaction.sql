-- One outbox row per transaction and topic, carrying all of that transaction's messages for
-- the topic, instead of one row per message (issue 14, lever 1). Each row costs an insert, a
-- mark when it is published and a delete when it is pruned, and those row versions were the
-- largest share of Herald's writes per event: an ingest batch or a group-committed batch of
-- sends now pays them once per topic, whatever its number of messages. A row keeps a single
-- topic so that the relay can still hold back a missing topic's rows on their own.
--
-- Message i of a row is (message_keys[i], payloads[i], headers->(i-1)). `done` lists the
-- positions (1-based) the relay has settled (published or parked) while others of the row
-- wait, so that no message of a partly published row is published twice over; the row is
-- marked published when every position is settled.
ALTER TABLE outbox
    ADD COLUMN message_keys  BYTEA[],
    ADD COLUMN payloads      BYTEA[],
    ADD COLUMN header_list   JSONB,
    ADD COLUMN done          INTEGER[] NOT NULL DEFAULT '{}';
UPDATE outbox SET message_keys = ARRAY[message_key], payloads = ARRAY[payload],
    header_list = jsonb_build_array(headers);
ALTER TABLE outbox
    DROP COLUMN message_key,
    DROP COLUMN payload,
    DROP COLUMN headers;
ALTER TABLE outbox RENAME COLUMN header_list TO headers;
ALTER TABLE outbox
    ALTER COLUMN message_keys SET NOT NULL,
    ALTER COLUMN payloads SET NOT NULL,
    ALTER COLUMN headers SET NOT NULL,
    -- The relay sizes its batches by messages, not rows, without reading the arrays.
    ADD COLUMN messages INTEGER GENERATED ALWAYS AS (cardinality(payloads)) STORED,
    ADD CONSTRAINT outbox_messages_line_up CHECK (
        cardinality(payloads) > 0
        AND cardinality(message_keys) = cardinality(payloads)
        AND jsonb_typeof(headers) = 'array'
        AND jsonb_array_length(headers) = cardinality(payloads)
    );

-- Every message of the outbox, one per line, for people and tests: what a row carries, and
-- whether the relay has published it.
CREATE VIEW outbox_messages AS
SELECT o.id,
       m.position,
       o.kind,
       o.topic,
       o.message_keys[m.position] AS message_key,
       m.payload,
       o.headers -> (m.position - 1) AS headers,
       o.created_at,
       (o.published_at IS NOT NULL OR m.position = ANY (o.done)) AS published,
       o.published_at AS row_published_at
FROM outbox o,
     LATERAL (SELECT payload, n::integer AS position
              FROM unnest(o.payloads) WITH ORDINALITY AS u(payload, n)) m;

-- A parked message is named by its row and its position in it.
ALTER TABLE outbox_parked ADD COLUMN position INTEGER NOT NULL DEFAULT 1;
ALTER TABLE outbox_parked DROP CONSTRAINT outbox_parked_pkey;
ALTER TABLE outbox_parked ADD PRIMARY KEY (id, position);
