-- PostgreSQL's migration 0005 turns its processed-key age index into a BRIN index; SQLite has
-- no BRIN and keeps its B-tree. This file keeps the two engines' migration numbers in step.
SELECT 1;
