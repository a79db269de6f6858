-- The processed-key primary key leads with the message id, and both key columns compare
-- bytewise (COLLATE "C").
--
-- Every insertion into the primary key compares the new key with about twenty others. Led by
-- the binding id, each comparison first went through the binding id, the same for every row of a
-- binding; led by the message id, comparisons mostly end at its first differing byte. Comparing
-- keys was about a fifth of PostgreSQL's time per processed message, measured on a server whose
-- collation is C (docs/PERFORMANCE.md). Under any other default collation each comparison also
-- went through strcoll, which COLLATE "C" ends.
--
-- The host never looks processed keys up by binding alone: commits look up whole keys, and the
-- retention sweep goes by age. Changing only the collation does not rewrite the table; the
-- primary key is built again, once, when this migration runs.
ALTER TABLE processed_keys
    DROP CONSTRAINT processed_keys_pkey,
    ALTER COLUMN binding_id TYPE text COLLATE "C",
    ALTER COLUMN message_id TYPE text COLLATE "C",
    ADD PRIMARY KEY (message_id, binding_id);
