-- Access control (DESIGN §5a): API keys, idempotency keys scoped to the credential that
-- sent them, and audit fields that name a credential instead of a header.

-- API keys for upstream services, operators and analysts. Only the SHA-256 digest of a key
-- is stored: keys are 256 random bits, so a fast digest is as good as a slow one and keeps
-- the check cheap. `key_prefix` (the key's first characters) lets a person tell keys apart
-- in a listing without the key itself.
CREATE TABLE api_keys (
    id            UUID PRIMARY KEY,
    name          TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    scopes        TEXT[] NOT NULL,
    key_hash      BYTEA NOT NULL UNIQUE,
    key_prefix    TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at  TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ,
    revoked_by    TEXT
);

-- An Idempotency-Key belongs to the credential that sent it: two services may use the same
-- key. Rows made before this migration belonged to the only caller there was.
ALTER TABLE idempotency_keys ADD COLUMN credential TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE idempotency_keys ALTER COLUMN credential DROP DEFAULT;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (credential, idempotency_key);
-- Expired keys are pruned by age.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- The same for broadcasts, whose row is the stored answer to a keyed request. An expired
-- key is cleared from its broadcast, so it may be used again.
ALTER TABLE broadcasts ADD COLUMN idempotency_credential TEXT;
UPDATE broadcasts SET idempotency_credential = 'admin' WHERE idempotency_key IS NOT NULL;
ALTER TABLE broadcasts DROP CONSTRAINT broadcasts_idempotency_key_key;
CREATE UNIQUE INDEX broadcasts_idempotency ON broadcasts (idempotency_credential, idempotency_key);

-- Who created and who cancelled a broadcast (the credential's name).
ALTER TABLE broadcasts ADD COLUMN created_by TEXT;
ALTER TABLE broadcasts ADD COLUMN cancelled_by TEXT;
