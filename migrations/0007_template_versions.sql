-- Templates edited at run time (issue 13): versions stored here overlay the files in
-- templates/, which stay the defaults and the reviewed path. A template is named by
-- (event_type, locale, part): `ORDER_SHIPPED`/`_adhoc`, `ko`/`en`, and the file name of the
-- part without its extension (`email_subject`, `slack`, ...).

-- Every version ever stored, numbered from 1 per template. Version 0 is the file and has
-- no row. Only versions that rendered against the event type's schema are stored.
CREATE TABLE template_versions (
    event_type  TEXT NOT NULL,
    locale      TEXT NOT NULL,
    part        TEXT NOT NULL,
    version     INTEGER NOT NULL CHECK (version > 0),
    source      TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (event_type, locale, part, version)
);

-- The version in effect per template. A NULL version means the file (a rollback to the
-- file keeps the row, so that who did it and when stays visible).
CREATE TABLE template_active (
    event_type    TEXT NOT NULL,
    locale        TEXT NOT NULL,
    part          TEXT NOT NULL,
    version       INTEGER,
    activated_by  TEXT NOT NULL,
    activated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (event_type, locale, part),
    FOREIGN KEY (event_type, locale, part, version)
        REFERENCES template_versions (event_type, locale, part, version)
);

-- Every activation, for audit: who put which version in effect, and when.
CREATE TABLE template_activations (
    id            BIGSERIAL PRIMARY KEY,
    event_type    TEXT NOT NULL,
    locale        TEXT NOT NULL,
    part          TEXT NOT NULL,
    version       INTEGER NOT NULL,
    activated_by  TEXT NOT NULL,
    activated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX template_activations_by_template
    ON template_activations (event_type, locale, part, id DESC);

-- One row whose counter every change of template_active bumps in the same transaction.
-- Every instance polls it (a primary-key read) and reloads its overlay when it moved.
-- Taking this row's lock first also serialises changes, so the counter's order is the
-- commit order and a poller cannot see a later change while missing an earlier one.
CREATE TABLE template_revision (
    id        BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    revision  BIGINT NOT NULL
);
INSERT INTO template_revision (id, revision) VALUES (true, 0);
