-- The control plane: tenants with their quotas, API tokens, and DLQ replay.
-- The SQLite schema (migrations/sqlite) has the same tables, columns and constraints.

-- Tenants and their own quotas (NULL: the platform default). Handlers and bindings deployed
-- before tenants existed (`weir handler deploy`) have no row here, so neither table references
-- this one: a tenant row is what the admin API knows, not a condition for running.
CREATE TABLE tenants (
    id              text        PRIMARY KEY,
    max_handlers    bigint      CHECK (max_handlers >= 0),
    max_total_bytes bigint      CHECK (max_total_bytes >= 0),
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- API tokens. Only the SHA-256 of the secret is stored, and tokens are found by it (the unique
-- constraint is the index). Deleting a tenant deletes its tokens.
CREATE TABLE tokens (
    id          text        PRIMARY KEY,
    tenant      text        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    sha256      text        NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);

CREATE INDEX tokens_by_tenant ON tokens (tenant, created_at);

-- DLQ replay: pending -> replaying (queued, then leased by a worker's claim) -> replayed, or
-- back to pending when the replay fails again.
ALTER TABLE dlq_entries
    ADD COLUMN lease_until timestamptz,
    DROP CONSTRAINT dlq_entries_state_check,
    ADD CONSTRAINT dlq_entries_state_check
        CHECK (state IN ('pending', 'replaying', 'replayed', 'discarded'));

-- At most one open (pending or replaying) entry per message: dead-lettering it again, also
-- while a replay is queued, refreshes that entry.
DROP INDEX dlq_entries_pending;
CREATE UNIQUE INDEX dlq_entries_open ON dlq_entries (binding_id, message_id)
    WHERE state IN ('pending', 'replaying');

-- A binding's queued replays, oldest first.
CREATE INDEX dlq_entries_replaying ON dlq_entries (binding_id, id) WHERE state = 'replaying';
