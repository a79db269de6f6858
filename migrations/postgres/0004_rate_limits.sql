-- Per-tenant rate limits: a token bucket of `rate_limit_burst` messages refilled at
-- `rate_limit_per_second`, enforced by each host on the tenant's bindings there. Both NULL: no
-- limit. The SQLite schema (migrations/sqlite) has the same columns and constraints.
ALTER TABLE tenants
    ADD COLUMN rate_limit_per_second bigint CHECK (rate_limit_per_second >= 1),
    ADD COLUMN rate_limit_burst      bigint CHECK (rate_limit_burst >= 1),
    ADD CONSTRAINT tenants_rate_limit_both
        CHECK ((rate_limit_per_second IS NULL) = (rate_limit_burst IS NULL));
