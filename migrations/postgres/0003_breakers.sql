-- Binding circuit breakers, shared by every replica of a binding. A worker whose breaker opens
-- (or closes again after its probes) writes the row; every worker reads it about once a second
-- and follows a change it did not make (another replica's, or an operator's reset or
-- force-open). `revision` grows on every write so a reader can tell a change from a state it
-- has already seen. Half-open is not stored: it is `open` past `open_until`.
-- The SQLite schema (migrations/sqlite) has the same table, columns and constraints.
CREATE TABLE binding_breakers (
    binding_id           text        PRIMARY KEY,
    state                text        NOT NULL CHECK (state IN ('closed', 'open')),
    -- Open by an operator until reset: never half-opens.
    forced               boolean     NOT NULL DEFAULT false,
    opened_at            timestamptz,
    -- When an open (not forced) breaker lets probes through.
    open_until           timestamptz,
    -- Consecutive failures that opened it, as its writer counted them.
    consecutive_failures integer     CHECK (consecutive_failures >= 0),
    revision             bigint      NOT NULL DEFAULT 1,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (state = 'open' OR (NOT forced AND open_until IS NULL))
);
