//! Retention: history older than `HERALD_RETENTION` (90 days by default) leaves every table
//! that keeps it, together, so that no table answers for a period the others forgot.
//!
//! - `notifications` created before the cutoff go, with their `deliveries` (in the same
//!   statement: deliveries have no foreign key to cascade from, migration 0022) and those
//!   deliveries' `delivery_attempts` (a foreign key with ON DELETE CASCADE), except a
//!   notification with a delivery still PENDING or PROCESSING (scheduled far ahead, say):
//!   work is never dropped.
//! - `notification_log` rows of terminal deliveries made before the cutoff go.
//! - `delivery_stats` days before the cutoff's day go (in the reporting time zone's days,
//!   which is what the rows count).
//! - `receipts` received before the cutoff go, and finished webhook calls made before it.
//! - Dead letters discarded or retried successfully before `HERALD_DLQ_RETENTION` (30 days)
//!   go; pending ones, and retries that failed or are under way, never go by time. Suppressions stay until lifted: they are
//!   about an address, not a period.
//!
//! Notification and delivery ids are UUIDv7, so "made before the cutoff" is an id below the
//! cutoff's smallest v7 id: the primary keys find them, and no index on a time column is
//! paid for on every insert. Deletes go in batches of [`BATCH`] rows, each its own short
//! transaction, so a first pass over a large backlog never holds locks for long. One
//! instance at a time purges (an advisory lock); the others skip the round.
//!
//! Why batched deletes and not time partitions dropped whole: partitioning `deliveries` or
//! `notifications` by time would put the time in their primary keys and in every lookup by
//! id (GET /notifications/{id}, the dispatcher's records, the read marks), and the foreign
//! keys into `deliveries` cannot point into a partitioned table without it. A batched
//! delete costs one small WAL record per row, measured by `make bench` ("retention" line),
//! against the several row versions each of those rows cost to write.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often a purge runs.
pub const EVERY: Duration = Duration::from_secs(600);

/// Rows one purge transaction deletes from a table.
pub const BATCH: i64 = 5000;

/// The advisory lock that lets one instance purge at a time.
const LOCK: i64 = 0x6865_7261_6c64_7270; // "heraldrp"

/// What one purge deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Notifications (their deliveries and attempts went with them).
    pub notifications: u64,
    /// Read-model rows.
    pub log_rows: u64,
    /// Statistics rows (one per day and channel).
    pub stats_rows: u64,
    /// Provider receipts received before the cutoff.
    pub receipts: u64,
    /// Finished webhook calls made before the cutoff.
    pub webhook_calls: u64,
    /// Digests opened before the cutoff with no member left to send.
    pub digests: u64,
    /// Dead letters discarded or retried successfully before the dead-letter cutoff.
    pub dead_letters: u64,
}

/// Up to when each kind of history goes.
#[derive(Debug, Clone, Copy)]
pub struct Cutoffs {
    /// Notifications, deliveries, the read model, receipts, webhook calls.
    pub history: DateTime<Utc>,
    /// Dead letters discarded or retried successfully before it.
    pub dead_letters: DateTime<Utc>,
}

impl Cutoffs {
    /// Both cutoffs at `at`.
    pub fn at(at: DateTime<Utc>) -> Self {
        Cutoffs {
            history: at,
            dead_letters: at,
        }
    }
}

/// The smallest UUIDv7 of the millisecond `at`: every v7 id made before `at` sorts below it.
pub fn first_id_at(at: DateTime<Utc>) -> Uuid {
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid()
}

/// Deletes the history made before `cutoff` (module docs); `None` when another instance
/// holds the purge.
pub async fn purge(
    db: &PgPool,
    cutoffs: Cutoffs,
    reporting_tz: Tz,
) -> anyhow::Result<Option<Purged>> {
    let mut lock = db.acquire().await.context("Failed to connect")?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK)
        .fetch_one(&mut *lock)
        .await
        .context("Failed to take the purge lock")?;
    if !locked {
        return Ok(None);
    }
    let purged = purge_locked(db, cutoffs, reporting_tz).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK)
        .execute(&mut *lock)
        .await;
    if unlocked.is_err() {
        // A lock this connection cannot give back must not outlive it in the pool.
        lock.detach();
    }
    purged.map(Some)
}

async fn purge_locked(db: &PgPool, cutoffs: Cutoffs, reporting_tz: Tz) -> anyhow::Result<Purged> {
    let cutoff = cutoffs.history;
    let below = first_id_at(cutoff);
    // Deliveries have no foreign key to cascade from their notification (migration 0022):
    // the statement that deletes a batch of notifications deletes their deliveries too.
    let notifications = delete_in_batches(
        db,
        "WITH doomed AS ( \
                 SELECT n.id FROM notifications n WHERE n.id < $1 \
                 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = n.id \
                     AND d.status IN ('PENDING', 'PROCESSING')) \
                 ORDER BY n.id LIMIT $2), \
             deliveries_gone AS ( \
                 DELETE FROM deliveries WHERE notification_id IN (SELECT id FROM doomed)) \
         DELETE FROM notifications WHERE id IN (SELECT id FROM doomed)",
        below,
    )
    .await
    .context("Failed to purge notifications")?;
    let log_rows = delete_in_batches(
        db,
        "DELETE FROM notification_log WHERE delivery_id IN ( \
                 SELECT delivery_id FROM notification_log WHERE delivery_id < $1 \
                 AND status IN ('SUCCESS', 'FAILED', 'SKIPPED') \
                 ORDER BY delivery_id LIMIT $2)",
        below,
    )
    .await
    .context("Failed to purge the notification log")?;
    let stats_rows = sqlx::query("DELETE FROM delivery_stats WHERE day < $1")
        .bind(cutoff.with_timezone(&reporting_tz).date_naive())
        .execute(db)
        .await
        .context("Failed to purge delivery statistics")?
        .rows_affected();
    // Receipts come one per gateway send at most, and each round takes the last 10
    // minutes' worth: one statement is short.
    let receipts = sqlx::query("DELETE FROM receipts WHERE received_at < $1")
        .bind(cutoff)
        .execute(db)
        .await
        .context("Failed to purge receipts")?
        .rows_affected();
    let webhook_calls = delete_in_batches(
        db,
        "DELETE FROM webhook_deliveries WHERE id IN ( \
                 SELECT id FROM webhook_deliveries WHERE id < $1 AND status <> 'PENDING' \
                 ORDER BY id LIMIT $2)",
        below,
    )
    .await
    .context("Failed to purge webhook calls")?;
    // A digest older than the history goes unless a member may still be sent (PENDING,
    // PROCESSING, or FAILED and so retryable): the claim finds members through their
    // digest's row. Digests no member ever joined (an event the intake found stored
    // already) go too.
    let digests = delete_in_batches(
        db,
        "DELETE FROM digests WHERE id IN ( \
                 SELECT g.id FROM digests g WHERE g.id < $1 AND NOT EXISTS ( \
                     SELECT 1 FROM deliveries d WHERE d.digest_id = g.id \
                         AND d.status IN ('PENDING', 'PROCESSING', 'FAILED')) \
                 ORDER BY g.id LIMIT $2)",
        below,
    )
    .await
    .context("Failed to purge digests")?;
    // A dead letter goes once an operator dealt with it: discarded, or retried with success
    // (the poison message accepted, or as a duplicate of one stored; the delivery sent).
    // Pending ones, and retries that failed or are still under way, stay.
    let mut dead_letters = 0;
    loop {
        let batch = sqlx::query(
            "DELETE FROM dlq_messages WHERE id IN ( \
                 SELECT m.id FROM dlq_messages m LEFT JOIN deliveries d ON d.id = m.delivery_id \
                 WHERE m.actioned_at < $1 AND (m.status = 'DISCARDED' OR (m.status = 'RETRIED' \
                     AND (m.retry_outcome IN ('ACCEPTED', 'DUPLICATE') OR d.status = 'SUCCESS'))) \
                 LIMIT $2)",
        )
        .bind(cutoffs.dead_letters)
        .bind(BATCH)
        .execute(db)
        .await
        .context("Failed to purge dead letters")?
        .rows_affected();
        dead_letters += batch;
        if batch < BATCH as u64 {
            break;
        }
    }
    // Finished replays go with the letters they dealt with (their items reference them).
    sqlx::query("DELETE FROM dlq_replays WHERE status <> 'RUNNING' AND finished_at < $1")
        .bind(cutoffs.dead_letters)
        .execute(db)
        .await
        .context("Failed to purge finished replays")?;
    let purged = Purged {
        notifications,
        log_rows,
        stats_rows,
        receipts,
        webhook_calls,
        digests,
        dead_letters,
    };
    for (table, n) in [
        ("notifications", purged.notifications),
        ("notification_log", purged.log_rows),
        ("delivery_stats", purged.stats_rows),
        ("receipts", purged.receipts),
        ("webhook_deliveries", purged.webhook_calls),
        ("digests", purged.digests),
        ("dlq_messages", purged.dead_letters),
    ] {
        metrics::counter!("herald_retention_deleted_total", "table" => table).increment(n);
    }
    Ok(purged)
}

/// Runs `delete` (rows below the id `$1`, at most `$2` of them) in its own transaction until
/// it deletes fewer than [`BATCH`] rows; returns how many it deleted in all.
async fn delete_in_batches(
    db: &PgPool,
    delete: &'static str,
    below: Uuid,
) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    loop {
        let batch = sqlx::query(delete)
            .bind(below)
            .bind(BATCH)
            .execute(db)
            .await?
            .rows_affected();
        deleted += batch;
        if batch < BATCH as u64 {
            return Ok(deleted);
        }
    }
}

/// Purges every [`EVERY`] until `shutdown`, keeping `retention` of history.
pub async fn run(
    db: PgPool,
    retention: crate::config::RetentionSettings,
    reporting_tz: Tz,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = Utc::now();
        let cutoffs = Cutoffs {
            history: now - retention.history,
            dead_letters: now - retention.dead_letters,
        };
        match purge(&db, cutoffs, reporting_tz).await {
            Ok(Some(purged)) if purged != Purged::default() => {
                tracing::info!(?purged, ?cutoffs, "history past its retention deleted");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot purge history past its retention"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_id_sorts_above_every_id_made_before_it_and_below_every_id_made_after() {
        let cutoff = Utc::now() - chrono::Duration::days(90);
        let before = uuid::Builder::from_unix_timestamp_millis(
            u64::try_from((cutoff - chrono::Duration::milliseconds(1)).timestamp_millis()).unwrap(),
            &[0xff; 10],
        )
        .into_uuid();
        let now = Uuid::now_v7();
        let below = first_id_at(cutoff);
        assert!(before < below);
        assert!(below < now);
        assert_eq!(below.get_version_num(), 7);
    }
}
