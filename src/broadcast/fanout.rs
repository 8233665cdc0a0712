//! The fan-out: turns due broadcasts into notifications, one batch of recipients per
//! transaction, and ends them when every delivery is final.
//!
//! Each step locks the broadcast's row (`FOR UPDATE`), so however many instances run, one
//! batch is written at a time, and the cursor it moves commits with the notifications it
//! wrote: a crash rolls both back, and whoever resumes starts at the last committed
//! cursor. The unique index on (broadcast_id, user_id) backs this up. A lease
//! (`broadcast.lease_secs`) keeps other instances from contending for a broadcast while its
//! instance is alive; when that instance dies, another takes over after the lease.

use std::{collections::HashSet, sync::Arc, time::Duration};

use anyhow::Context;
use chrono::Utc;
use redis::aio::ConnectionManager;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use super::{Audience, BroadcastRow, BroadcastStatus, birth_years, finished_event, totals};
use crate::{
    config::BroadcastSettings,
    directory,
    domain::{Channel, Domain, EventType, Recipient, UserId},
    intake::{self, Draft, Source},
    preferences,
    routing::RoutingTable,
};

/// How often idle instances look for due broadcasts.
const POLL: Duration = Duration::from_millis(500);
/// How long a step that found nothing to do waits (queue full, or sends still going).
const WAIT: Duration = Duration::from_millis(200);
/// Most broadcasts one instance fans out at once (each step holds two pool connections).
const MAX_ACTIVE: usize = 2;

/// What the fan-out needs.
pub struct Fanout {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub settings: BroadcastSettings,
    pub redis_prefix: String,
    pub topic_prefix: String,
    pub routing: Arc<RoutingTable>,
    pub channel_enabled: Arc<dyn Fn(Channel) -> bool + Send + Sync>,
    /// Woken after a commit that created deliveries.
    pub wakeup: crate::dispatch::wakeup::Wakeup,
}

/// What one step did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// More to do at once.
    Continue,
    /// Nothing to do right now.
    Wait,
    /// The broadcast is over (or another instance owns it now).
    Done,
}

/// Picks up due broadcasts and works each in its own task until `shutdown`.
pub async fn run(fanout: Arc<Fanout>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    let active = Arc::new(std::sync::Mutex::new(HashSet::<Uuid>::new()));
    while !shutdown.is_cancelled() {
        let free = MAX_ACTIVE.saturating_sub(active.lock().expect("not poisoned").len());
        let acquired = if free == 0 {
            Ok(Vec::new())
        } else {
            fanout.acquire(free).await
        };
        match acquired {
            Ok(ids) => {
                for id in ids {
                    if !active.lock().expect("not poisoned").insert(id) {
                        continue;
                    }
                    let (fanout, active, shutdown) =
                        (fanout.clone(), active.clone(), shutdown.clone());
                    tasks.spawn(async move {
                        fanout.work(id, &shutdown).await;
                        active.lock().expect("not poisoned").remove(&id);
                    });
                }
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot look for due broadcasts"
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shutdown.cancelled() => break,
        }
    }
    tasks.close();
    tasks.wait().await;
}

impl Fanout {
    /// Takes the lease of at most `limit` due broadcasts nobody holds (SCHEDULED ones
    /// become RUNNING), and of cancelled ones still to be wound up (even before their
    /// `scheduledAt`, so that their end is announced at once).
    async fn acquire(&self, limit: usize) -> anyhow::Result<Vec<Uuid>> {
        sqlx::query_scalar(
            "UPDATE broadcasts b SET lease_until = now() + $1 * interval '1 millisecond', \
                 status = CASE WHEN b.status = 'SCHEDULED' THEN 'RUNNING' ELSE b.status END, \
                 started_at = CASE WHEN b.status = 'SCHEDULED' THEN now() ELSE b.started_at END \
             WHERE b.id IN (SELECT id FROM broadcasts \
                 WHERE ((status IN ('SCHEDULED', 'RUNNING') AND scheduled_at <= now()) \
                        OR (status = 'CANCELLED' AND finished_at IS NULL)) \
                   AND (lease_until IS NULL OR lease_until < now()) \
                 ORDER BY scheduled_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING b.id",
        )
        .bind(self.settings.lease.as_millis() as i64)
        .bind(limit as i64)
        .fetch_all(&self.db)
        .await
        .context("Failed to acquire broadcasts")
    }

    /// Steps one broadcast until it is over or the instance stops; transient errors
    /// (PostgreSQL away) are retried.
    async fn work(&self, id: Uuid, shutdown: &CancellationToken) {
        tracing::info!(broadcast = %id, "fanning out a broadcast");
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let pause = match self.step(id).await {
                Ok(Step::Continue) => {
                    failures = 0;
                    continue;
                }
                Ok(Step::Wait) => {
                    failures = 0;
                    WAIT
                }
                Ok(Step::Done) => return,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(broadcast = %id, error = format!("{error:#}"), "broadcast step failed; retrying");
                    Duration::from_millis(200 * u64::from(failures.min(25)))
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => break,
            }
        }
        // Stopping: let another instance resume at once instead of after the lease.
        let released = sqlx::query("UPDATE broadcasts SET lease_until = NULL WHERE id = $1")
            .bind(id)
            .execute(&self.db)
            .await;
        if let Err(error) = released {
            tracing::warn!(broadcast = %id, %error, "cannot release a broadcast's lease");
        }
    }

    /// One transaction's worth of work on a broadcast.
    async fn step(&self, id: Uuid) -> anyhow::Result<Step> {
        let mut tx = self.db.begin().await.context("Failed to begin a step")?;
        let Some(row) = super::lock(&mut tx, id).await? else {
            return Ok(Step::Done);
        };
        sqlx::query(
            "UPDATE broadcasts SET lease_until = now() + $2 * interval '1 millisecond' \
             WHERE id = $1",
        )
        .bind(id)
        .bind(self.settings.lease.as_millis() as i64)
        .execute(&mut *tx)
        .await
        .context("Failed to renew a broadcast's lease")?;

        let step = match row.status() {
            BroadcastStatus::Completed | BroadcastStatus::Failed => Step::Done,
            BroadcastStatus::Cancelled if row.finished_at.is_some() => Step::Done,
            // A send in flight at the cancel may have come back for a retry since.
            BroadcastStatus::Cancelled => {
                crate::deliveries::skip_broadcast(
                    &mut tx,
                    id,
                    super::CANCELLED_REASON,
                    &self.topic_prefix,
                )
                .await?;
                self.finish_if_settled(&mut tx, &row, BroadcastStatus::Cancelled)
                    .await?
            }
            BroadcastStatus::Scheduled => Step::Wait,
            BroadcastStatus::Running if row.audience_total.is_none() => {
                let audience = freeze_audience(&mut tx, &row).await?;
                tracing::info!(broadcast = %id, audience, "broadcast audience frozen");
                Step::Continue
            }
            BroadcastStatus::Running if row.fanned_out_at.is_none() => {
                self.fan_out_batch(&mut tx, &row).await?
            }
            BroadcastStatus::Running => {
                let status = BroadcastStatus::Completed;
                self.finish_if_settled(&mut tx, &row, status).await?
            }
        };
        tx.commit()
            .await
            .context("Failed to commit a broadcast step")?;
        if step == Step::Continue {
            self.wakeup.wake_all();
        }
        Ok(step)
    }

    /// Turns the next batch of recipients into notifications, unless the broadcast already
    /// has a full queue of unsent deliveries.
    async fn fan_out_batch(
        &self,
        tx: &mut PgConnection,
        row: &BroadcastRow,
    ) -> anyhow::Result<Step> {
        let queued: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries WHERE broadcast_id = $1 \
             AND status IN ('PENDING', 'PROCESSING')",
        )
        .bind(row.id)
        .fetch_one(&mut *tx)
        .await
        .context("Failed to count a broadcast's queue")?;
        if queued as usize >= self.settings.max_queued_deliveries {
            return Ok(Step::Wait);
        }
        let users: Vec<i64> = sqlx::query_scalar(
            "SELECT user_id FROM broadcast_recipients WHERE broadcast_id = $1 AND user_id > $2 \
             ORDER BY user_id LIMIT $3",
        )
        .bind(row.id)
        .bind(row.cursor_user_id)
        .bind(self.settings.batch_size as i64)
        .fetch_all(&mut *tx)
        .await
        .context("Failed to read a batch of recipients")?;
        let Some(&last) = users.last() else {
            sqlx::query("UPDATE broadcasts SET fanned_out_at = now() WHERE id = $1")
                .bind(row.id)
                .execute(&mut *tx)
                .await
                .context("Failed to mark a broadcast fanned out")?;
            tracing::info!(broadcast = %row.id, recipients = row.created_count, "broadcast fanned out");
            return Ok(Step::Continue);
        };
        let users: Vec<UserId> = users
            .into_iter()
            .filter_map(|u| UserId::new(u).ok())
            .collect();
        let contacts = directory::load_many(&self.db, &users).await?;
        let prefs =
            preferences::load_many(&self.db, &self.redis, &self.redis_prefix, &users).await?;
        let event_type = EventType::parse(&row.event_type)
            .map_err(anyhow::Error::msg)
            .context("a stored broadcast has a bad event type")?;
        let data = match &row.data {
            Value::Object(map) => map.clone(),
            _ => Default::default(),
        };
        let channels = row.channels();
        let now = Utc::now();
        let mut notifications: Vec<_> = users
            .iter()
            .map(|user| {
                let draft = Draft {
                    source: Source::Broadcast,
                    domain: Domain::Api,
                    event_id: None,
                    event_type: event_type.clone(),
                    user_id: Some(*user),
                    recipient: Recipient::default(),
                    data: data.clone(),
                    subject: row.subject.clone(),
                    body: row.body.clone(),
                    raw_event: None,
                    origin: None,
                    occurred_at: Some(now),
                    scheduled_at: None,
                    broadcast_id: Some(row.id),
                    replay: None,
                };
                intake::prepare(
                    &self.routing,
                    draft,
                    &channels,
                    contacts.get(user),
                    &prefs.get(user).cloned().unwrap_or_default(),
                    &*self.channel_enabled,
                )
            })
            .collect();
        intake::insert(&mut *tx, &mut notifications, &self.topic_prefix).await?;
        sqlx::query(
            "UPDATE broadcasts SET cursor_user_id = $2, created_count = created_count + $3 \
             WHERE id = $1",
        )
        .bind(row.id)
        .bind(last)
        .bind(notifications.len() as i32)
        .execute(&mut *tx)
        .await
        .context("Failed to move a broadcast's cursor")?;
        metrics::counter!("herald_broadcast_recipients_total")
            .increment(notifications.len() as u64);
        Ok(Step::Continue)
    }

    /// Ends the broadcast once none of its deliveries is PENDING or PROCESSING: COMPLETED
    /// (FAILED when nothing was sent and something failed), or CANCELLED; either way with
    /// its event on notification.broadcast.events.
    async fn finish_if_settled(
        &self,
        tx: &mut PgConnection,
        row: &BroadcastRow,
        outcome: BroadcastStatus,
    ) -> anyhow::Result<Step> {
        let open: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM deliveries WHERE broadcast_id = $1 \
             AND status IN ('PENDING', 'PROCESSING'))",
        )
        .bind(row.id)
        .fetch_one(&mut *tx)
        .await
        .context("Failed to check a broadcast's open deliveries")?;
        if open {
            return Ok(Step::Wait);
        }
        let totals = totals(&mut *tx, row).await?;
        let status = match outcome {
            BroadcastStatus::Completed if totals.sent == 0 && totals.failed > 0 => {
                BroadcastStatus::Failed
            }
            other => other,
        };
        let finished_at = Utc::now();
        sqlx::query(
            "UPDATE broadcasts SET status = $2, finished_at = $3, lease_until = NULL, \
                 error = CASE WHEN $2 = 'FAILED' THEN 'no delivery succeeded' ELSE error END \
             WHERE id = $1",
        )
        .bind(row.id)
        .bind(status.as_str())
        .bind(finished_at)
        .execute(&mut *tx)
        .await
        .context("Failed to end a broadcast")?;
        let event = finished_event(row, status, &totals, finished_at, &self.topic_prefix);
        crate::outbox::insert(&mut *tx, std::slice::from_ref(&event)).await?;
        metrics::counter!("herald_broadcasts_finished_total", "status" => status.as_str())
            .increment(1);
        tracing::info!(
            broadcast = %row.id,
            status = status.as_str(),
            audience = totals.audience,
            sent = totals.sent,
            failed = totals.failed,
            skipped = totals.skipped,
            "broadcast finished"
        );
        Ok(Step::Done)
    }
}

/// Freezes the audience into broadcast_recipients and records its size.
async fn freeze_audience(tx: &mut PgConnection, row: &BroadcastRow) -> anyhow::Result<i64> {
    // Read here only: an explicit list can be 100,000 ids.
    let audience: Value = sqlx::query_scalar("SELECT audience FROM broadcasts WHERE id = $1")
        .bind(row.id)
        .fetch_one(&mut *tx)
        .await
        .context("Failed to read a broadcast's audience")?;
    let audience: Audience =
        serde_json::from_value(audience).context("a stored broadcast has a bad audience")?;
    match audience {
        Audience::UserIds(users) => {
            let ids: Vec<i64> = users.iter().map(|u| u.get()).collect();
            sqlx::query(
                "INSERT INTO broadcast_recipients (broadcast_id, user_id) \
                 SELECT $1, u FROM UNNEST($2::int8[]) AS u ON CONFLICT DO NOTHING",
            )
            .bind(row.id)
            .bind(&ids)
            .execute(&mut *tx)
            .await
        }
        Audience::Segment(segment) => {
            let (born_from, born_to) = birth_years(&segment, Utc::now());
            let tags: Vec<&str> = segment.tags.iter().map(|t| t.as_str()).collect();
            sqlx::query(
                "INSERT INTO broadcast_recipients (broadcast_id, user_id) \
                 SELECT $1, user_id FROM user_contacts \
                 WHERE ($2::int IS NULL OR birth_year(attributes) >= $2) \
                   AND ($3::int IS NULL OR birth_year(attributes) <= $3) \
                   AND ($4::text IS NULL OR locale = $4) \
                   AND (cardinality($5::text[]) = 0 OR attributes -> 'tags' @> to_jsonb($5::text[])) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(row.id)
            .bind(born_from)
            .bind(born_to)
            .bind(segment.locale.map(|l| l.as_str()))
            .bind(&tags)
            .execute(&mut *tx)
            .await
        }
    }
    .context("Failed to freeze a broadcast's audience")?;
    let total: i64 = sqlx::query_scalar(
        "UPDATE broadcasts SET audience_total = \
             (SELECT count(*) FROM broadcast_recipients WHERE broadcast_id = $1) \
         WHERE id = $1 RETURNING audience_total::int8",
    )
    .bind(row.id)
    .fetch_one(&mut *tx)
    .await
    .context("Failed to record a broadcast's audience")?;
    Ok(total)
}
