//! Replays by filter: an operator's "retry every letter this find matches", done safely.
//!
//! - A **dry run** reads the letters and answers what a replay would do (deliveries
//!   re-queued, poison messages re-ingested and how many of those would fail again, letters
//!   skipped and why) without changing anything.
//! - A **replay** lists the letters it found in `dlq_replay_items` when it is made, then works
//!   through them in the background at `ratePerSecond`, one instance at a time (a lease on
//!   the `dlq_replays` row, renewed before each letter). It can be cancelled; it survives a
//!   restart: any instance with the DLQ role takes over a replay whose lease lapsed and goes
//!   on from the first item not done.
//! - An item is marked done in the same transaction as its letter's retry (and, for a
//!   delivery, its re-queue), so a replay resumed after a crash replays nothing twice. A
//!   poison message is re-ingested in a transaction of its own first; should the instance
//!   die before the mark, the resumed replay re-ingests it again and ingestion's idempotency
//!   key makes that a DUPLICATE, not a second notification.
//! - An outage (PostgreSQL refusing to answer) never marks an item: the replay stops where
//!   it is and is taken up again when the lease lapses.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::admin::{self, AdminError, FIND, Find, ItemRef, Plan, RetryKind};
use crate::{db::is_data_error, domain::Domain, ingest::Ingestor};

/// The highest rate a replay may ask for, letters per second.
pub const MAX_RATE: u32 = 1000;

/// How long a replay stays with an instance that stopped renewing its lease.
/// Renewed before each letter, so it only has to outlast the slowest single letter.
const LEASE: Duration = Duration::from_secs(30);

/// What a dry run found.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ReplayDryRun)]
pub struct DryRun {
    pub dry_run: bool,
    /// PENDING letters the find matches.
    pub matched: usize,
    /// Failed deliveries (and webhook calls) that would be sent again.
    pub requeue: usize,
    /// Poison messages that would go through ingestion again...
    pub reingest: usize,
    /// ...of which these would be dead-lettered again as they stand, by error class.
    pub reingest_still_poison: BTreeMap<String, usize>,
    /// Letters a replay would leave, by reason (`replay_cap`, `delivery_not_failed`...).
    pub skipped: BTreeMap<&'static str, usize>,
}

/// Answers what a replay of `find` would do.
pub async fn dry_run(
    ingestor: &Ingestor,
    find: &Find,
    force: bool,
    cap: u32,
) -> anyhow::Result<DryRun> {
    let mut report = DryRun {
        dry_run: true,
        ..DryRun::default()
    };
    let mut after = None;
    loop {
        let page = admin::oldest_first(&ingestor.db, find, after, 500).await?;
        let Some(last) = page.last() else { break };
        after = Some((last.received_at, last.id));
        for letter in &page {
            report.matched += 1;
            match admin::plan(letter, force, cap) {
                Plan::Requeue(_) | Plan::RequeueWebhookCall(_) => report.requeue += 1,
                Plan::Reingest => {
                    report.reingest += 1;
                    let bytes = letter
                        .edited_payload
                        .as_deref()
                        .unwrap_or(&letter.payload_bytes);
                    let domain: Domain = letter.domain.parse().map_err(anyhow::Error::msg)?;
                    if let Err(poison) = ingestor.check(domain, bytes) {
                        *report
                            .reingest_still_poison
                            .entry(poison.class.as_str().to_owned())
                            .or_default() += 1;
                    }
                }
                Plan::Skip { code, .. } => *report.skipped.entry(code).or_default() += 1,
            }
        }
    }
    Ok(report)
}

/// A replay and how far it got.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    pub id: Uuid,
    /// RUNNING, COMPLETED or CANCELLED.
    pub status: String,
    /// The filters it was made with.
    pub filter: Value,
    pub rate_per_second: i32,
    pub force: bool,
    /// Letters found when it was made.
    pub total: i32,
    /// Letters dealt with so far (the four counts below).
    pub done: i32,
    pub requeued: i32,
    pub reingested: i32,
    pub skipped: i32,
    pub failed: i32,
    pub skipped_reasons: Value,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancelled_by: Option<String>,
    /// Seconds until it is done at its rate, while it runs.
    pub eta_seconds: Option<f64>,
}

const SELECT: &str = "SELECT id, status, filter, rate_per_second, force, total, \
        requeued + reingested + skipped + failed AS done, requeued, reingested, skipped, failed, \
        skipped_reasons, created_by, created_at, finished_at, cancelled_by, \
        CASE WHEN status = 'RUNNING' THEN \
            (total - requeued - reingested - skipped - failed)::float8 / rate_per_second END \
            AS eta_seconds \
    FROM dlq_replays";

/// Makes a replay of the PENDING letters `find` matches (oldest first), to be worked
/// through in the background.
pub async fn start(
    db: &PgPool,
    find: &Find,
    filter: Value,
    rate_per_second: u32,
    force: bool,
    actor: &str,
) -> anyhow::Result<Replay> {
    let id = Uuid::now_v7();
    let mut tx = db.begin().await.context("Failed to begin")?;
    sqlx::query(
        "INSERT INTO dlq_replays (id, filter, rate_per_second, force, total, created_by) \
         VALUES ($1, $2, $3, $4, 0, $5)",
    )
    .bind(id)
    .bind(&filter)
    .bind(rate_per_second as i32)
    .bind(force)
    .bind(actor)
    .execute(&mut *tx)
    .await
    .context("Failed to store a replay")?;
    let found = find
        .bind(sqlx::query_as::<_, (i64,)>(sqlx::AssertSqlSafe(format!(
            "WITH found AS (INSERT INTO dlq_replay_items (replay_id, position, letter_id) \
                 SELECT $10, row_number() OVER (ORDER BY m.received_at, m.id), m.id \
                 FROM dlq_messages m WHERE {FIND} RETURNING 1) \
             SELECT count(*) FROM found"
        ))))
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .context("Failed to list a replay's letters")?
        .0;
    sqlx::query("UPDATE dlq_replays SET total = $2 WHERE id = $1")
        .bind(id)
        .bind(found as i32)
        .execute(&mut *tx)
        .await
        .context("Failed to count a replay's letters")?;
    tx.commit().await.context("Failed to commit a replay")?;
    get(db, id).await?.context("the replay just stored is gone")
}

/// One replay.
pub async fn get(db: &PgPool, id: Uuid) -> anyhow::Result<Option<Replay>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT} WHERE id = $1")))
        .bind(id)
        .fetch_optional(db)
        .await
        .context("Failed to read a replay")
}

/// The newest replays first.
pub async fn list(db: &PgPool, limit: i64) -> anyhow::Result<Vec<Replay>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} ORDER BY created_at DESC, id DESC LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(db)
    .await
    .context("Failed to list replays")
}

/// Cancels a running replay: the letters not yet replayed stay as they are.
pub async fn cancel(db: &PgPool, id: Uuid, actor: &str) -> Result<Replay, AdminError> {
    let cancelled = sqlx::query(
        "UPDATE dlq_replays SET status = 'CANCELLED', cancelled_by = $2, finished_at = now(), \
             lease_owner = NULL, lease_until = NULL \
         WHERE id = $1 AND status = 'RUNNING'",
    )
    .bind(id)
    .bind(actor)
    .execute(db)
    .await
    .context("Failed to cancel a replay")?
    .rows_affected();
    let replay = get(db, id).await?.ok_or(AdminError::NotFound(id))?;
    if cancelled == 0 {
        return Err(AdminError::Conflict(format!(
            "replay {id} is {}, not RUNNING",
            replay.status
        )));
    }
    Ok(replay)
}

/// Marks a replay's item done with `outcome` (REQUEUED, REINGESTED, SKIPPED or FAILED) and
/// counts it, inside the caller's transaction. An item done before is left as it was.
pub async fn item_done(
    conn: &mut PgConnection,
    item: ItemRef,
    outcome: &str,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let marked = sqlx::query(
        "UPDATE dlq_replay_items SET outcome = $3, reason = $4, done_at = now() \
         WHERE replay_id = $1 AND position = $2 AND outcome IS NULL",
    )
    .bind(item.replay_id)
    .bind(item.position)
    .bind(outcome)
    .bind(reason)
    .execute(&mut *conn)
    .await
    .context("Failed to mark a replay's letter done")?
    .rows_affected();
    if marked == 0 {
        return Ok(());
    }
    sqlx::query(
        "UPDATE dlq_replays SET \
             requeued = requeued + ($2 = 'REQUEUED')::int, \
             reingested = reingested + ($2 = 'REINGESTED')::int, \
             skipped = skipped + ($2 = 'SKIPPED')::int, \
             failed = failed + ($2 = 'FAILED')::int, \
             skipped_reasons = CASE WHEN $3::text IS NULL THEN skipped_reasons \
                 ELSE jsonb_set(skipped_reasons, ARRAY[$3::text], \
                     to_jsonb(COALESCE((skipped_reasons ->> $3::text)::int, 0) + 1)) END \
         WHERE id = $1",
    )
    .bind(item.replay_id)
    .bind(outcome)
    .bind(reason)
    .execute(&mut *conn)
    .await
    .context("Failed to count a replay's letter")?;
    Ok(())
}

/// Works through running replays until `shutdown`: the loop of the DLQ role.
pub async fn run(ingestor: Ingestor, cap: u32, shutdown: CancellationToken) {
    let me = Uuid::new_v4();
    loop {
        let idle = match take(&ingestor.db, me).await {
            Ok(Some(replay)) => {
                if let Err(error) = work(&ingestor, cap, me, &replay, &shutdown).await {
                    tracing::warn!(replay = %replay.id, error = format!("{error:#}"),
                        "a replay stopped; it goes on when its lease lapses");
                }
                Duration::from_millis(100)
            }
            Ok(None) => Duration::from_secs(1),
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "could not look for replays");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(idle) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// The replay's parts `work` needs.
#[derive(Debug, sqlx::FromRow)]
struct Taken {
    id: Uuid,
    rate_per_second: i32,
    force: bool,
    created_by: String,
}

/// Takes the oldest running replay no live instance holds.
async fn take(db: &PgPool, me: Uuid) -> anyhow::Result<Option<Taken>> {
    sqlx::query_as(
        "UPDATE dlq_replays SET lease_owner = $1, lease_until = now() + $2 * interval '1 millisecond' \
         WHERE id = (SELECT id FROM dlq_replays WHERE status = 'RUNNING' \
                 AND (lease_until IS NULL OR lease_until < now()) \
                 ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING id, rate_per_second, force, created_by",
    )
    .bind(me)
    .bind(LEASE.as_millis() as i64)
    .fetch_optional(db)
    .await
    .context("Failed to take a replay")
}

/// Renews the lease; false once the replay was cancelled (or another instance holds it).
async fn renew(db: &PgPool, id: Uuid, me: Uuid) -> anyhow::Result<bool> {
    Ok(sqlx::query(
        "UPDATE dlq_replays SET lease_until = now() + $3 * interval '1 millisecond' \
         WHERE id = $1 AND lease_owner = $2 AND status = 'RUNNING'",
    )
    .bind(id)
    .bind(me)
    .bind(LEASE.as_millis() as i64)
    .execute(db)
    .await
    .context("Failed to renew a replay's lease")?
    .rows_affected()
        == 1)
}

async fn work(
    ingestor: &Ingestor,
    cap: u32,
    me: Uuid,
    replay: &Taken,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let db = &ingestor.db;
    let every = Duration::from_secs_f64(1.0 / f64::from(replay.rate_per_second.max(1)));
    let actor = format!("{} (replay {})", replay.created_by, replay.id);
    let mut next = Instant::now();
    loop {
        let items: Vec<(i32, Uuid)> = sqlx::query_as(
            "SELECT position, letter_id FROM dlq_replay_items \
             WHERE replay_id = $1 AND outcome IS NULL ORDER BY position LIMIT 100",
        )
        .bind(replay.id)
        .fetch_all(db)
        .await
        .context("Failed to read a replay's letters")?;
        if items.is_empty() {
            sqlx::query(
                "UPDATE dlq_replays SET status = 'COMPLETED', finished_at = now(), \
                     lease_owner = NULL, lease_until = NULL \
                 WHERE id = $1 AND status = 'RUNNING' AND lease_owner = $2",
            )
            .bind(replay.id)
            .bind(me)
            .execute(db)
            .await
            .context("Failed to complete a replay")?;
            tracing::info!(replay = %replay.id, "replay completed");
            return Ok(());
        }
        for (position, letter) in items {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = shutdown.cancelled() => {
                    // Another instance may take it at once.
                    sqlx::query("UPDATE dlq_replays SET lease_until = NULL WHERE id = $1 AND lease_owner = $2")
                        .bind(replay.id)
                        .bind(me)
                        .execute(db)
                        .await
                        .context("Failed to release a replay")?;
                    return Ok(());
                }
            }
            // Paced from when this letter starts: a pause (an outage, a slow letter) is never
            // made up for with a burst, so no two letters start closer than 1 / rate.
            next = Instant::now() + every;
            // Before every letter, so that a cancel stops it at once (a primary-key update
            // of one row: cheap next to the letter's own transaction).
            if !renew(db, replay.id, me).await? {
                tracing::info!(replay = %replay.id, "replay cancelled");
                return Ok(());
            }
            one(ingestor, cap, replay, &actor, position, letter).await?;
        }
    }
}

/// Replays one item. An `Err` is an outage: the item stays to be done.
async fn one(
    ingestor: &Ingestor,
    cap: u32,
    replay: &Taken,
    actor: &str,
    position: i32,
    letter: Uuid,
) -> anyhow::Result<()> {
    let item = ItemRef {
        replay_id: replay.id,
        position,
    };
    let (outcome, reason) = match admin::get(&ingestor.db, letter).await {
        Ok(letter) => {
            // A letter someone else retried since the replay was made is not replayed
            // again by it.
            let plan = if letter.status == "PENDING" {
                admin::plan(&letter, replay.force, cap)
            } else {
                Plan::Skip {
                    code: "no_longer_pending",
                    message: String::new(),
                }
            };
            match admin::carry_out(ingestor, &letter, &plan, actor, Some(item)).await {
                // Marked with the letter.
                Ok(RetryKind::Requeued | RetryKind::Reingested) => return Ok(()),
                Err(AdminError::Conflict(_) | AdminError::NotFound(_)) => {
                    ("SKIPPED", Some(plan.skip_code()))
                }
                // A value PostgreSQL refuses would stop the replay for ever.
                Err(AdminError::Internal(error)) if is_data_error(&error) => {
                    tracing::warn!(%letter.id, error = format!("{error:#}"), "replay refused");
                    ("FAILED", None)
                }
                Err(AdminError::Internal(error)) => return Err(error),
            }
        }
        Err(AdminError::NotFound(_)) => ("SKIPPED", Some("gone")),
        Err(AdminError::Conflict(_)) => ("SKIPPED", Some("changed_meanwhile")),
        Err(AdminError::Internal(error)) => return Err(error),
    };
    let mut tx = ingestor.db.begin().await.context("Failed to begin")?;
    item_done(&mut tx, item, outcome, reason).await?;
    tx.commit()
        .await
        .context("Failed to commit a replay's letter")?;
    Ok(())
}
