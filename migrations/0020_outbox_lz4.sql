-- The outbox's arrays carry a whole transaction's messages (migration 0008), so they are
-- large enough to be compressed, and pglz, PostgreSQL's default, was among the hottest
-- functions of its backends in a profile of the end-to-end benchmark (issue 14). lz4
-- compresses several times faster at a similar ratio. It only applies to values written
-- from now on; a server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE outbox
        ALTER COLUMN payloads SET COMPRESSION lz4,
        ALTER COLUMN headers SET COMPRESSION lz4,
        ALTER COLUMN message_keys SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this PostgreSQL has no lz4; the outbox stays compressed with pglz';
END
$$;
