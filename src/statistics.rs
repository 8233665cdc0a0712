//! Keeps PostgreSQL's planner statistics of Herald's busiest tables from lagging far behind
//! a table that is still young.
//!
//! Herald's statements are prepared once per connection, and after five executions
//! PostgreSQL may keep one generic plan for a statement, made with the table's size and
//! statistics of that moment, until the next `ANALYZE` of a table it reads. A plan made
//! while a table was empty (a new installation's first seconds, or a table that a purge
//! emptied) reads it with a sequential scan, and keeps doing so as the table grows: on the
//! bench, the status events' read of a notification's deliveries went from 0.4 to 39 ms a
//! call, the lock of due IN_APP deliveries joined `notifications` by a scan per row, and
//! PostgreSQL's CPU per event went up six times until autovacuum's next round (up to a
//! minute away with the default `autovacuum_naptime`) analysed the tables. That was the
//! steady phase that "collapsed" in a third of the runs (BENCHMARKS.md).
//!
//! So every few seconds each instance looks at how much each of these tables changed since
//! it was last analysed, and analyses one that changed more than it held then (and by at
//! least [`MIN_CHANGES`] rows): a table growing from empty is analysed at about 1,000,
//! 2,000, 4,000 rows and so on, a handful of times in all, and a table of millions of rows
//! never, since autovacuum analyses it after 2 % (migration 0021). The `ANALYZE` invalidates
//! every cached plan that reads the table, so the next execution plans again with its
//! present size. One instance at a time analyses a table (an advisory lock), and never
//! waits for a lock behind a vacuum or a migration.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often the tables' changes are looked at.
const EVERY: Duration = Duration::from_secs(2);

/// The fewest changes since the last `ANALYZE` that make one worth running.
const MIN_CHANGES: i64 = 1000;

/// The tables Herald's hot statements read by key.
const TABLES: &[&str] = &[
    "notifications",
    "deliveries",
    "notification_log",
    "outbox",
    "delivery_attempts",
    "delivery_stats",
    "idempotency_keys",
];

/// Analyses the tables that outgrew their statistics until `shutdown`.
pub async fn run(db: PgPool, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(error) = analyze_outgrown(&db).await {
            tracing::debug!(
                error = format!("{error:#}"),
                "cannot bring the planner's statistics up to date"
            );
        }
    }
}

/// Analyses each table of [`TABLES`] that changed more since its last `ANALYZE` than it
/// held then; returns the tables analysed.
pub async fn analyze_outgrown(db: &PgPool) -> anyhow::Result<Vec<String>> {
    let outgrown: Vec<String> = sqlx::query_scalar(
        "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
         WHERE s.schemaname = current_schema() AND s.relname = ANY($1) \
           AND s.n_mod_since_analyze > GREATEST($2, c.reltuples) \
         ORDER BY s.relname",
    )
    .bind(TABLES)
    .bind(MIN_CHANGES)
    .fetch_all(db)
    .await
    .context("Failed to read the tables' changes since their last analyze")?;
    let mut analysed = Vec::with_capacity(outgrown.len());
    for table in outgrown {
        let mut tx = db.begin().await.context("Failed to begin")?;
        // Another instance analysing it already, or a vacuum or a migration holding it: the
        // next round looks again.
        sqlx::query("SET LOCAL lock_timeout = '1s'")
            .execute(&mut *tx)
            .await
            .context("Failed to set up an analyze")?;
        let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
            .bind(format!("herald.analyze.{table}"))
            .fetch_one(&mut *tx)
            .await
            .context("Failed to take the analyze lock")?;
        if !mine {
            continue;
        }
        // The name comes from TABLES (matched above), never from input.
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table}")))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("Failed to analyze {table}"))?;
        tx.commit().await.context("Failed to commit an analyze")?;
        tracing::debug!(%table, "analysed a table that outgrew its statistics");
        analysed.push(table);
    }
    Ok(analysed)
}
