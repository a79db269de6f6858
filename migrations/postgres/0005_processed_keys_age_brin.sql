-- Processed keys are inserted in time order, so a BRIN index finds the expired ones for the
-- retention sweep as well as the B-tree did, at almost no cost per insert: the B-tree cost one
-- more index insertion for every message processed (one of the two the table had). The
-- primary key stays a B-tree: duplicate detection needs it.
DROP INDEX IF EXISTS processed_keys_by_age;
CREATE INDEX processed_keys_by_age ON processed_keys USING brin (processed_at);
