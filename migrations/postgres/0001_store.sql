-- Weir's store on PostgreSQL: handlers, bindings, processed keys, keyed state, outbox, DLQ.
-- The SQLite schema (migrations/sqlite) has the same tables, columns and constraints.

-- A tenant's named handler and which of its versions runs.
CREATE TABLE handlers (
    tenant          text        NOT NULL,
    name            text        NOT NULL,
    active_version  integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

-- Uploaded components, immutable. Re-uploading the same bytes finds the existing version.
CREATE TABLE handler_versions (
    tenant      text        NOT NULL,
    handler     text        NOT NULL,
    version     integer     NOT NULL CHECK (version >= 1),
    sha256      text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size        bigint      NOT NULL CHECK (size >= 0),
    component   bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, handler, version),
    UNIQUE (tenant, handler, sha256),
    FOREIGN KEY (tenant, handler) REFERENCES handlers (tenant, name)
);

ALTER TABLE handlers
    ADD FOREIGN KEY (tenant, name, active_version)
    REFERENCES handler_versions (tenant, handler, version);

-- Bindings: a handler subscribed with a policy. `spec` is the policy document, uninterpreted.
CREATE TABLE bindings (
    id          text        PRIMARY KEY,
    tenant      text        NOT NULL,
    handler     text        NOT NULL,
    spec        jsonb       NOT NULL,
    revision    bigint      NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX bindings_by_tenant ON bindings (tenant, handler);

-- One row, bumped in the transaction of every binding insert, update and delete.
CREATE TABLE bindings_revision (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    revision    bigint  NOT NULL
);

INSERT INTO bindings_revision (singleton, revision) VALUES (true, 0);

-- Messages whose effects are committed, per binding.
CREATE TABLE processed_keys (
    binding_id      text        NOT NULL,
    message_id      text        NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (binding_id, message_id)
);

CREATE INDEX processed_keys_by_age ON processed_keys (processed_at);

-- Keyed state, scoped to (tenant, handler, message key).
CREATE TABLE keyed_state (
    tenant      text        NOT NULL,
    handler     text        NOT NULL,
    key         bytea       NOT NULL,
    name        text        NOT NULL,
    value       bytea       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, handler, key, name)
);

-- Messages to publish. `lease_until` is set by a relay's claim; the row is claimable again
-- once it has passed.
CREATE TABLE outbox (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      text        NOT NULL UNIQUE,
    tenant          text        NOT NULL,
    binding_id      text,
    topic           text        NOT NULL,
    key             bytea,
    payload         bytea       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '[]',
    causation_id    text        NOT NULL,
    traceparent     text,
    state           text        NOT NULL DEFAULT 'pending'
                                CHECK (state IN ('pending', 'sent', 'error')),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);

CREATE INDEX outbox_unsent ON outbox (id) WHERE state <> 'sent';

-- Dead-lettered messages: the whole record, why it failed, and how it was resolved.
CREATE TABLE dlq_entries (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant              text        NOT NULL,
    binding_id          text        NOT NULL,
    handler             text        NOT NULL,
    handler_version     integer,
    topic               text        NOT NULL,
    kafka_partition     integer     NOT NULL,
    kafka_offset        bigint      NOT NULL,
    message_id          text        NOT NULL,
    key                 bytea,
    payload             bytea       NOT NULL,
    headers             jsonb       NOT NULL DEFAULT '[]',
    timestamp_ms        bigint,
    error_kind          text        NOT NULL
                                    CHECK (error_kind IN ('retryable', 'permanent', 'trap')),
    error_message       text        NOT NULL,
    attempts            integer     NOT NULL,
    first_failure_at    timestamptz NOT NULL,
    last_failure_at     timestamptz NOT NULL,
    state               text        NOT NULL DEFAULT 'pending'
                                    CHECK (state IN ('pending', 'replayed', 'discarded')),
    resolved_at         timestamptz,
    resolution_note     text
);

-- At most one pending entry per message: dead-lettering it again refreshes that entry.
CREATE UNIQUE INDEX dlq_entries_pending ON dlq_entries (binding_id, message_id)
    WHERE state = 'pending';
CREATE INDEX dlq_entries_by_tenant ON dlq_entries (tenant, id);
CREATE INDEX dlq_entries_by_binding ON dlq_entries (binding_id, id);
