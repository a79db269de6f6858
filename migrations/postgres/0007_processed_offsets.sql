-- Processed keys of position ids kept as bits of offset blocks.
--
-- A message without a `message-id` header is named by its position, `topic/partition/offset`.
-- Its processed key is now one bit of a block row: `mask` has bit `offset % 64` set for each
-- processed offset of the block `offset / 64` of that binding, topic and partition. A group
-- commit of a few hundred such messages writes a few dozen block rows instead of a row each;
-- a row cost PostgreSQL more than anything else Weir asks of it per message
-- (docs/PERFORMANCE.md). Ids of any other form stay rows of `processed_keys`. Which form an id
-- takes depends on its text alone (the rule of `store::batch::position`, written again below),
-- so an id always meets its earlier self.
--
-- `processed_at` is the block's last write: the retention sweep drops a block once its newest
-- bit is older than the retention, so no key is forgotten early.
CREATE TABLE processed_offsets (
    binding_id      text COLLATE "C" NOT NULL,
    topic           text COLLATE "C" NOT NULL,
    partition       integer          NOT NULL,
    block           bigint           NOT NULL,
    mask            bigint           NOT NULL,
    processed_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (binding_id, topic, partition, block)
);

CREATE INDEX processed_offsets_by_age ON processed_offsets (processed_at);

-- Move the position ids already processed into blocks: one statement (one snapshot, one scan)
-- deletes them and inserts their blocks. The test is `position`'s: a topic of Kafka's
-- characters (at most 249), canonical decimals that fit int and bigint. Lengths are checked
-- apart from the pattern (a bounded repetition such as {1,249} makes PostgreSQL's regular
-- expressions slow).
WITH moved AS (
    DELETE FROM processed_keys
    WHERE CASE
        WHEN message_id ~ '^[A-Za-z0-9._-]+/(0|[1-9][0-9]*)/(0|[1-9][0-9]*)$' THEN
            length(split_part(message_id, '/', 1)) <= 249
            AND length(split_part(message_id, '/', 2)) <= 10
            AND split_part(message_id, '/', 2)::numeric <= 2147483647
            AND length(split_part(message_id, '/', 3)) <= 19
            AND split_part(message_id, '/', 3)::numeric <= 9223372036854775807
        ELSE false
    END
    RETURNING binding_id, message_id, processed_at
), positions AS (
    SELECT binding_id, processed_at, split_part(message_id, '/', 1) AS topic,
           split_part(message_id, '/', 2)::integer AS partition,
           split_part(message_id, '/', 3)::bigint AS "offset"
    FROM moved
)
INSERT INTO processed_offsets (binding_id, topic, partition, block, mask, processed_at)
    SELECT binding_id, topic, partition, "offset" / 64,
           bit_or((1::bigint) << ("offset" % 64)::integer), max(processed_at)
    FROM positions
    GROUP BY binding_id, topic, partition, "offset" / 64;

-- Every processed key, whichever form it is kept in: for operators and tests.
CREATE VIEW processed_key_ids AS
    SELECT binding_id, message_id, processed_at FROM processed_keys
    UNION ALL
    SELECT o.binding_id, o.topic || '/' || o.partition || '/' || (o.block * 64 + bit.n),
           o.processed_at
    FROM processed_offsets o
    CROSS JOIN generate_series(0, 63) AS bit(n)
    WHERE o.mask & ((1::bigint) << bit.n) <> 0;
