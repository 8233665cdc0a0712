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
//! So every few seconds each instance compares each of these tables' live rows
//! (`pg_stat_user_tables.n_live_tup`) with the rows its statistics last counted
//! (`pg_class.reltuples`), and analyses one that has more than doubled, by at least
//! [`MIN_ROWS`] rows: a table growing from empty is analysed at about 1,000, 2,000, 4,000
//! rows and so on, a handful of times in all, and a table whose size holds steady (a busy
//! outbox, or `deliveries` after months) never, however fast its rows churn; autovacuum
//! keeps those up to date (migration 0021). The `ANALYZE` reads only the columns Herald's
//! statements look rows up by ([`TABLES`]): it updates the table's size all the same, and
//! invalidates every cached plan that reads the table, so the next execution plans again
//! with its present size. A whole-table `ANALYZE` of the outbox read its compressed message
//! arrays and took 10 s under load, holding a snapshot all that time. One instance at a
//! time analyses a table (an advisory lock), and never waits for a lock behind a vacuum or
//! a migration.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often the tables' changes are looked at.
const EVERY: Duration = Duration::from_secs(2);

/// The fewest live rows that make an `ANALYZE` worth running.
const MIN_ROWS: i64 = 1000;

/// The statistics target of these analyses (PostgreSQL samples 300 rows per unit): 10
/// instead of the default 100 made an `ANALYZE` of 200,000 deliveries take 14 ms instead of
/// 60 to 76 ms, and these analyses took 4 % of PostgreSQL's statement time while the
/// bench's tables grew from empty (BENCHMARKS.md).
const SAMPLE_TARGET: u32 = 10;

/// The tables Herald's hot statements read by key, each with the columns they filter,
/// join and sort on.
const TABLES: &[(&str, &str)] = &[
    ("notifications", "id, user_id, created_at"),
    (
        "deliveries",
        "id, notification_id, channel, status, next_attempt_at, lease_until, broadcast_id, digest_id",
    ),
    (
        "notification_log",
        "delivery_id, notification_id, user_id, status, created_at",
    ),
    ("outbox", "id, topic, published_at"),
    ("delivery_attempts", "delivery_id"),
    (
        "idempotency_keys",
        "credential, idempotency_key, created_at",
    ),
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

/// Analyses each table of [`TABLES`] that holds more than twice the rows its statistics
/// counted; returns the tables analysed.
pub async fn analyze_outgrown(db: &PgPool) -> anyhow::Result<Vec<String>> {
    let names: Vec<&str> = TABLES.iter().map(|(table, _)| *table).collect();
    let outgrown: Vec<String> = sqlx::query_scalar(
        "SELECT s.relname::text FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
         WHERE s.schemaname = current_schema() AND s.relname = ANY($1) \
           AND s.n_live_tup >= GREATEST($2, 2 * c.reltuples) \
         ORDER BY s.relname",
    )
    .bind(&names)
    .bind(MIN_ROWS)
    .fetch_all(db)
    .await
    .context("Failed to read the tables' sizes")?;
    let mut analysed = Vec::with_capacity(outgrown.len());
    for (table, columns) in TABLES
        .iter()
        .filter(|(t, _)| outgrown.iter().any(|o| o == t))
    {
        let mut tx = db.begin().await.context("Failed to begin")?;
        // Another instance analysing it already, or a vacuum or a migration holding it: the
        // next round looks again. The sample is a tenth of the default one (3,000 rows, not
        // 30,000): what these plans need is the table's size, which any sample brings up to
        // date, and the handful of statuses and channels, which 3,000 rows catch all of.
        // Autovacuum's next analyse of the table (migration 0021) takes the full sample.
        sqlx::query(
            "SELECT set_config('lock_timeout', '1s', true), \
                 set_config('default_statistics_target', $1, true)",
        )
        .bind(SAMPLE_TARGET.to_string())
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
        // Names and columns come from TABLES, never from input.
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table} ({columns})")))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("Failed to analyze {table}"))?;
        tx.commit().await.context("Failed to commit an analyze")?;
        tracing::debug!(%table, "analysed a table that outgrew its statistics");
        analysed.push((*table).to_owned());
    }
    Ok(analysed)
}
