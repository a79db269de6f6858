-- The processed-key primary key leads with the message id, as on PostgreSQL (its migration 0006
-- says why). SQLite cannot change a primary key in place: the table is copied. Its text already
-- compares bytewise (BINARY).
CREATE TABLE processed_keys_0006 (
    binding_id      TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    processed_at    INTEGER NOT NULL,
    PRIMARY KEY (message_id, binding_id)
) STRICT, WITHOUT ROWID;

INSERT INTO processed_keys_0006 (binding_id, message_id, processed_at)
    SELECT binding_id, message_id, processed_at FROM processed_keys;

DROP TABLE processed_keys;
ALTER TABLE processed_keys_0006 RENAME TO processed_keys;
CREATE INDEX processed_keys_by_age ON processed_keys (processed_at);
