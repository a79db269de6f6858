-- Weir's store on SQLite (the embedded dev mode): the same tables, columns and constraints as
-- migrations/postgres, in SQLite's types. Bytes are BLOB, JSON is TEXT, and timestamps are
-- INTEGER microseconds since the Unix epoch, written by the host.

-- A tenant's named handler and which of its versions runs.
CREATE TABLE handlers (
    tenant          TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    active_version  INTEGER,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (tenant, name),
    FOREIGN KEY (tenant, name, active_version)
        REFERENCES handler_versions (tenant, handler, version)
) STRICT;

-- Uploaded components, immutable. Re-uploading the same bytes finds the existing version.
CREATE TABLE handler_versions (
    tenant      TEXT    NOT NULL,
    handler     TEXT    NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    sha256      TEXT    NOT NULL CHECK (length(sha256) = 64 AND sha256 NOT GLOB '*[^0-9a-f]*'),
    size        INTEGER NOT NULL CHECK (size >= 0),
    component   BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, handler, version),
    UNIQUE (tenant, handler, sha256),
    FOREIGN KEY (tenant, handler) REFERENCES handlers (tenant, name)
) STRICT;

-- Bindings: a handler subscribed with a policy. `spec` is the policy document, uninterpreted.
CREATE TABLE bindings (
    id          TEXT    PRIMARY KEY NOT NULL,
    tenant      TEXT    NOT NULL,
    handler     TEXT    NOT NULL,
    spec        TEXT    NOT NULL CHECK (json_valid(spec)),
    revision    INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE INDEX bindings_by_tenant ON bindings (tenant, handler);

-- One row, bumped in the transaction of every binding insert, update and delete.
CREATE TABLE bindings_revision (
    singleton   INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (singleton = 1),
    revision    INTEGER NOT NULL
) STRICT;

INSERT INTO bindings_revision (singleton, revision) VALUES (1, 0);

-- Messages whose effects are committed, per binding.
CREATE TABLE processed_keys (
    binding_id      TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    processed_at    INTEGER NOT NULL,
    PRIMARY KEY (binding_id, message_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX processed_keys_by_age ON processed_keys (processed_at);

-- Keyed state, scoped to (tenant, handler, message key).
CREATE TABLE keyed_state (
    tenant      TEXT    NOT NULL,
    handler     TEXT    NOT NULL,
    key         BLOB    NOT NULL,
    name        TEXT    NOT NULL,
    value       BLOB    NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, handler, key, name)
) STRICT, WITHOUT ROWID;

-- Messages to publish. `lease_until` is set by a relay's claim; the row is claimable again
-- once it has passed. AUTOINCREMENT: ids are never reused.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT    NOT NULL UNIQUE,
    tenant          TEXT    NOT NULL,
    binding_id      TEXT,
    topic           TEXT    NOT NULL,
    key             BLOB,
    payload         BLOB    NOT NULL,
    headers         TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(headers)),
    causation_id    TEXT    NOT NULL,
    traceparent     TEXT,
    state           TEXT    NOT NULL DEFAULT 'pending'
                            CHECK (state IN ('pending', 'sent', 'error')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    lease_until     INTEGER,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER
) STRICT;

CREATE INDEX outbox_unsent ON outbox (id) WHERE state <> 'sent';

-- Dead-lettered messages: the whole record, why it failed, and how it was resolved.
CREATE TABLE dlq_entries (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant              TEXT    NOT NULL,
    binding_id          TEXT    NOT NULL,
    handler             TEXT    NOT NULL,
    handler_version     INTEGER,
    topic               TEXT    NOT NULL,
    kafka_partition     INTEGER NOT NULL,
    kafka_offset        INTEGER NOT NULL,
    message_id          TEXT    NOT NULL,
    key                 BLOB,
    payload             BLOB    NOT NULL,
    headers             TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(headers)),
    timestamp_ms        INTEGER,
    error_kind          TEXT    NOT NULL
                                CHECK (error_kind IN ('retryable', 'permanent', 'trap')),
    error_message       TEXT    NOT NULL,
    attempts            INTEGER NOT NULL,
    first_failure_at    INTEGER NOT NULL,
    last_failure_at     INTEGER NOT NULL,
    state               TEXT    NOT NULL DEFAULT 'pending'
                                CHECK (state IN ('pending', 'replayed', 'discarded')),
    resolved_at         INTEGER,
    resolution_note     TEXT
) STRICT;

-- At most one pending entry per message: dead-lettering it again refreshes that entry.
CREATE UNIQUE INDEX dlq_entries_pending ON dlq_entries (binding_id, message_id)
    WHERE state = 'pending';
CREATE INDEX dlq_entries_by_tenant ON dlq_entries (tenant, id);
CREATE INDEX dlq_entries_by_binding ON dlq_entries (binding_id, id);
