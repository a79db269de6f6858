-- The control plane: tenants with their quotas, API tokens, and DLQ replay. The same tables,
-- columns and constraints as migrations/postgres, in SQLite's types.

-- Tenants and their own quotas (NULL: the platform default). Handlers and bindings deployed
-- before tenants existed (`weir handler deploy`) have no row here, so neither table references
-- this one: a tenant row is what the admin API knows, not a condition for running.
CREATE TABLE tenants (
    id              TEXT    PRIMARY KEY NOT NULL,
    max_handlers    INTEGER CHECK (max_handlers >= 0),
    max_total_bytes INTEGER CHECK (max_total_bytes >= 0),
    created_at      INTEGER NOT NULL
) STRICT;

-- API tokens. Only the SHA-256 of the secret is stored, and tokens are found by it (the unique
-- constraint is the index). Deleting a tenant deletes its tokens.
CREATE TABLE tokens (
    id          TEXT    PRIMARY KEY NOT NULL,
    tenant      TEXT    NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    sha256      TEXT    NOT NULL UNIQUE
                        CHECK (length(sha256) = 64 AND sha256 NOT GLOB '*[^0-9a-f]*'),
    label       TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
) STRICT;

CREATE INDEX tokens_by_tenant ON tokens (tenant, created_at);

-- DLQ replay: pending -> replaying (queued, then leased by a worker's claim) -> replayed, or
-- back to pending when the replay fails again. SQLite cannot change a CHECK constraint in
-- place, so the table is rebuilt (https://www.sqlite.org/lang_altertable.html#otheralter),
-- keeping its ids and its AUTOINCREMENT counter (ids are never reused).
CREATE TABLE dlq_entries_new (
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
                                CHECK (state IN ('pending', 'replaying', 'replayed', 'discarded')),
    resolved_at         INTEGER,
    resolution_note     TEXT,
    lease_until         INTEGER
) STRICT;

INSERT INTO dlq_entries_new (id, tenant, binding_id, handler, handler_version, topic,
        kafka_partition, kafka_offset, message_id, key, payload, headers, timestamp_ms,
        error_kind, error_message, attempts, first_failure_at, last_failure_at, state,
        resolved_at, resolution_note)
    SELECT id, tenant, binding_id, handler, handler_version, topic, kafka_partition,
           kafka_offset, message_id, key, payload, headers, timestamp_ms, error_kind,
           error_message, attempts, first_failure_at, last_failure_at, state, resolved_at,
           resolution_note
    FROM dlq_entries;

-- The copy set the new counter to the highest id copied; the old one may be higher.
DELETE FROM sqlite_sequence WHERE name = 'dlq_entries_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'dlq_entries_new', max(seq)
    FROM (SELECT seq FROM sqlite_sequence WHERE name = 'dlq_entries'
          UNION ALL SELECT max(id) FROM dlq_entries_new)
    HAVING max(seq) IS NOT NULL;

DROP TABLE dlq_entries;
ALTER TABLE dlq_entries_new RENAME TO dlq_entries;

-- At most one open (pending or replaying) entry per message: dead-lettering it again, also
-- while a replay is queued, refreshes that entry.
CREATE UNIQUE INDEX dlq_entries_open ON dlq_entries (binding_id, message_id)
    WHERE state IN ('pending', 'replaying');
CREATE INDEX dlq_entries_by_tenant ON dlq_entries (tenant, id);
CREATE INDEX dlq_entries_by_binding ON dlq_entries (binding_id, id);

-- A binding's queued replays, oldest first.
CREATE INDEX dlq_entries_replaying ON dlq_entries (binding_id, id) WHERE state = 'replaying';
