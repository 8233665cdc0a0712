-- Autovacuum and analyze thresholds for the tables that change with every event (issue 14).
--
-- PostgreSQL's defaults vacuum a table once a fifth of its rows are dead and analyse it once
-- a tenth changed. `deliveries` leaves one or two dead versions per delivery (claim, record)
-- and `notification_log` one (the outcome), so at the default a table of ten million
-- deliveries carries two million dead versions before it is vacuumed, and its indexes and
-- heap grow with them. Statistics that lag a fast-growing table gave the planner plans that
-- only an empty table deserves: the status events' hash join over whole tables and the
-- relay's window run once per row (BENCHMARKS.md, 2026-12-02). These settings vacuum once
-- 1-2 % of a table's rows are dead (5 % inserted), and analyse once 2 % changed; autovacuum
-- still starts on a database at most once per `autovacuum_naptime` (1 minute by default),
-- and its cost limit paces the work.
--
-- Setting these options takes a SHARE UPDATE EXCLUSIVE lock (reads and writes go on), which
-- waits behind a running VACUUM, ANALYZE or CREATE INDEX CONCURRENTLY on the table: give up
-- after 30 s (the migration fails and runs again at the next start) rather than hold every
-- starting instance behind it.
SET LOCAL lock_timeout = '30s';
ALTER TABLE deliveries SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE notification_log SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
-- Inserted, then updated as the relay publishes, then deleted a day later.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
-- Inserted once and deleted only at retention: analysed as they grow, so plans follow them.
ALTER TABLE notifications SET (
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
