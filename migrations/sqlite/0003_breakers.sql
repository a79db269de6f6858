-- Binding circuit breakers, shared by every replica of a binding. The same table, columns and
-- constraints as migrations/postgres (see there), in SQLite's types: times are integer
-- microseconds since the Unix epoch, booleans 0 or 1.
CREATE TABLE binding_breakers (
    binding_id           TEXT    PRIMARY KEY NOT NULL,
    state                TEXT    NOT NULL CHECK (state IN ('closed', 'open')),
    forced               INTEGER NOT NULL DEFAULT 0 CHECK (forced IN (0, 1)),
    opened_at            INTEGER,
    open_until           INTEGER,
    consecutive_failures INTEGER CHECK (consecutive_failures >= 0),
    revision             INTEGER NOT NULL DEFAULT 1,
    updated_at           INTEGER NOT NULL,
    CHECK (state = 'open' OR (forced = 0 AND open_until IS NULL))
) STRICT;
