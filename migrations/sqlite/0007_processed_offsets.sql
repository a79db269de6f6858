-- Processed keys of position ids kept as bits of offset blocks, as on PostgreSQL (its migration
-- 0007 says why). `processed_at` is the block's last write.
CREATE TABLE processed_offsets (
    binding_id      TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    partition       INTEGER NOT NULL,
    block           INTEGER NOT NULL,
    mask            INTEGER NOT NULL,
    processed_at    INTEGER NOT NULL,
    PRIMARY KEY (binding_id, topic, partition, block)
) STRICT, WITHOUT ROWID;

CREATE INDEX processed_offsets_by_age ON processed_offsets (processed_at);

-- Move the position ids already processed into blocks, by `store::batch::position`'s rule
-- written with SQLite's string functions: exactly two slashes, a topic of Kafka's characters,
-- canonical decimals that fit a 32-bit and a 64-bit integer.
CREATE TEMP TABLE processed_positions AS
    SELECT binding_id, message_id, processed_at, topic,
           CAST(partition_text AS INTEGER) AS partition, CAST(offset_text AS INTEGER) AS "offset"
    FROM (
        SELECT binding_id, message_id, processed_at, topic,
               substr(rest, 1, instr(rest, '/') - 1) AS partition_text,
               substr(rest, instr(rest, '/') + 1) AS offset_text
        FROM (
            SELECT binding_id, message_id, processed_at,
                   substr(message_id, 1, instr(message_id, '/') - 1) AS topic,
                   substr(message_id, instr(message_id, '/') + 1) AS rest
            FROM processed_keys
            -- ASCII and no NUL (SQLite's text functions stop at one): as many bytes as
            -- characters.
            WHERE instr(message_id, '/') > 0
              AND length(CAST(message_id AS BLOB)) = length(message_id)
        )
        WHERE instr(rest, '/') > 0
    )
    WHERE length(topic) BETWEEN 1 AND 249
      AND topic NOT GLOB '*[^A-Za-z0-9._-]*'
      AND length(partition_text) BETWEEN 1 AND 10
      AND partition_text NOT GLOB '*[^0-9]*'
      AND (partition_text = '0' OR partition_text NOT GLOB '0*')
      AND (length(partition_text) < 10 OR partition_text <= '2147483647')
      AND length(offset_text) BETWEEN 1 AND 19
      AND offset_text NOT GLOB '*[^0-9]*'
      AND (offset_text = '0' OR offset_text NOT GLOB '0*')
      AND (length(offset_text) < 19 OR offset_text <= '9223372036854775807');

-- The bits of a block are distinct powers of two: their sum is their union (SQLite has no
-- bitwise aggregate), and never overflows.
INSERT INTO processed_offsets (binding_id, topic, partition, block, mask, processed_at)
    SELECT binding_id, topic, partition, "offset" / 64, sum(1 << ("offset" % 64)),
           max(processed_at)
    FROM processed_positions
    GROUP BY binding_id, topic, partition, "offset" / 64;

DELETE FROM processed_keys
    WHERE (binding_id, message_id) IN (SELECT binding_id, message_id FROM processed_positions);

DROP TABLE processed_positions;

-- Every processed key, whichever form it is kept in: for operators and tests.
CREATE VIEW processed_key_ids AS
    WITH RECURSIVE bit(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM bit WHERE n < 63)
    SELECT binding_id, message_id, processed_at FROM processed_keys
    UNION ALL
    SELECT o.binding_id, o.topic || '/' || o.partition || '/' || (o.block * 64 + bit.n),
           o.processed_at
    FROM processed_offsets o, bit
    WHERE o.mask & (1 << bit.n) <> 0;
