-- Per-tenant rate limits: the same columns as migrations/postgres (see there). SQLite cannot add
-- a table constraint to an existing table, so "both or neither" is kept by the store's only
-- writer of these columns, which sets them together.
ALTER TABLE tenants ADD COLUMN rate_limit_per_second INTEGER CHECK (rate_limit_per_second >= 1);
ALTER TABLE tenants ADD COLUMN rate_limit_burst INTEGER CHECK (rate_limit_burst >= 1);
