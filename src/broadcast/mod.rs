//! Broadcasts: one message to an audience (explicit user ids, or a segment of the user
//! directory by age, locale and tags), fanned out in the background into ordinary
//! notifications and deliveries, so retries, dead letters, rate limits, breakers and
//! fallbacks all apply to it. The dispatcher serves broadcast deliveries after
//! transactional ones and within a bounded share of each channel.
//!
//! Life of a broadcast: SCHEDULED (until `scheduledAt`) → RUNNING (the audience is frozen,
//! then fanned out batch by batch, each batch one transaction that also moves the cursor,
//! so a crash resumes where the last commit left it) → COMPLETED or FAILED once every
//! delivery is final, with a `BROADCAST_COMPLETED` event on notification.broadcast.events.
//! A cancel (SCHEDULED or RUNNING → CANCELLED) skips every delivery not yet sent and ends
//! with a `BROADCAST_CANCELLED` event.

pub mod client;
pub mod fanout;

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    domain::{Channel, Locale, Tag, UserId},
    outbox::{OutboxKind, OutboxMessage},
};

/// The broadcast-event topic, without prefix.
pub const BROADCAST_EVENTS_TOPIC: &str = "notification.broadcast.events";
/// Why a cancelled broadcast's unsent deliveries are SKIPPED.
pub const CANCELLED_REASON: &str = "broadcast cancelled";

/// Who a broadcast goes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Audience {
    /// These users (with or without a directory entry).
    UserIds(Vec<UserId>),
    /// Every user of the directory that matches.
    Segment(Segment),
}

/// A slice of the user directory; every given criterion must hold. Age is this year minus
/// the birth year; users without a birth year match no age criterion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Segment {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_min: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_max: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locale: Option<Locale>,
    /// The user must carry every one of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Tag>,
}

impl Segment {
    /// Checks that the segment selects something sensible.
    pub fn check(&self) -> Result<(), String> {
        if let (Some(min), Some(max)) = (self.age_min, self.age_max)
            && min > max
        {
            return Err(format!("ageMin {min} is above ageMax {max}"));
        }
        if self.age_min.is_some_and(|a| a > 150) || self.age_max.is_some_and(|a| a > 150) {
            return Err("ages are at most 150".into());
        }
        Ok(())
    }
}

/// A broadcast's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BroadcastStatus {
    Scheduled,
    Running,
    Completed,
    Cancelled,
    Failed,
}

impl BroadcastStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BroadcastStatus::Scheduled => "SCHEDULED",
            BroadcastStatus::Running => "RUNNING",
            BroadcastStatus::Completed => "COMPLETED",
            BroadcastStatus::Cancelled => "CANCELLED",
            BroadcastStatus::Failed => "FAILED",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "SCHEDULED" => BroadcastStatus::Scheduled,
            "RUNNING" => BroadcastStatus::Running,
            "COMPLETED" => BroadcastStatus::Completed,
            "CANCELLED" => BroadcastStatus::Cancelled,
            _ => BroadcastStatus::Failed,
        }
    }
}

/// A broadcast about to be stored (checked by the API).
#[derive(Debug, Clone)]
pub struct NewBroadcast {
    pub name: Option<String>,
    pub audience: Audience,
    pub channels: Vec<Channel>,
    pub event_type: String,
    pub data: Map<String, Value>,
    pub subject: Option<String>,
    pub body: Option<String>,
    pub scheduled_at: Option<DateTime<Utc>>,
    /// With the credential that sent it (`Principal::credential`): keys are per caller.
    pub idempotency_key: Option<String>,
    pub idempotency_credential: String,
    /// How long a key is remembered.
    pub idempotency_ttl: std::time::Duration,
    pub request_hash: String,
    /// The credential's name, for the audit trail.
    pub created_by: String,
}

/// A broadcast as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BroadcastRow {
    pub id: Uuid,
    pub name: Option<String>,
    pub status: String,
    /// The segment, or `{"userCount": n}` for an explicit list.
    pub audience: Value,
    pub channels: Vec<String>,
    pub event_type: String,
    pub data: Value,
    pub subject: Option<String>,
    pub body: Option<String>,
    pub scheduled_at: DateTime<Utc>,
    pub audience_total: Option<i32>,
    pub created_count: i32,
    pub cursor_user_id: i64,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub fanned_out_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub request_hash: Option<String>,
    pub created_by: Option<String>,
    pub cancelled_by: Option<String>,
}

impl BroadcastRow {
    pub fn status(&self) -> BroadcastStatus {
        BroadcastStatus::parse(&self.status)
    }

    pub fn channels(&self) -> Vec<Channel> {
        self.channels
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect()
    }
}

/// A broadcast's columns. An explicit audience shows as its size (`{"userCount": n}`):
/// the list itself can be 100,000 ids, and only the fan-out's first step reads it.
const ROW: &str = "SELECT id, name, status, \
     CASE WHEN audience ? 'userIds' \
         THEN jsonb_build_object('userCount', jsonb_array_length(audience -> 'userIds')) \
         ELSE audience END AS audience, \
     channels, event_type, data, subject, body, \
     scheduled_at, audience_total, created_count, cursor_user_id, error, created_at, \
     started_at, fanned_out_at, cancelled_at, finished_at, request_hash, created_by, \
     cancelled_by FROM broadcasts";

/// Deliveries of one channel (or all) by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = BroadcastCounts)]
pub struct Counts {
    pub sent: i64,
    pub failed: i64,
    pub skipped: i64,
    /// Not final yet (PENDING or PROCESSING).
    pub pending: i64,
}

impl Counts {
    fn add(&mut self, status: &str, n: i64) {
        match status {
            "SUCCESS" => self.sent += n,
            "FAILED" => self.failed += n,
            "SKIPPED" => self.skipped += n,
            _ => self.pending += n,
        }
    }

    pub fn done(&self) -> i64 {
        self.sent + self.failed + self.skipped
    }
}

/// Where a broadcast stands: recipients and deliveries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = BroadcastTotals)]
pub struct Totals {
    /// Recipients in the frozen audience (0 until the fan-out starts).
    pub audience: i64,
    /// Recipients turned into notifications so far.
    pub created: i64,
    /// Deliveries (one per recipient and channel) by outcome.
    pub deliveries: i64,
    pub sent: i64,
    pub failed: i64,
    pub skipped: i64,
    pub pending: i64,
    /// The same per channel.
    pub channels: BTreeMap<Channel, Counts>,
}

/// Stores a new broadcast, or returns the one stored before under the same
/// Idempotency-Key: `Ok(Err(row))` when the key was used with another request.
pub async fn create(db: &PgPool, new: &NewBroadcast) -> anyhow::Result<Created> {
    if let Some(key) = &new.idempotency_key {
        // Past its TTL a key is new again: it leaves the broadcast it named.
        sqlx::query(
            "UPDATE broadcasts SET idempotency_key = NULL, idempotency_credential = NULL \
             WHERE idempotency_credential = $1 AND idempotency_key = $2 AND created_at <= now() - $3",
        )
        .bind(&new.idempotency_credential)
        .bind(key)
        .bind(new.idempotency_ttl)
        .execute(db)
        .await
        .context("Failed to expire an idempotency key")?;
    }
    let id = Uuid::now_v7();
    let channels: Vec<&str> = new.channels.iter().map(|c| c.as_str()).collect();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO broadcasts (id, name, status, audience, channels, event_type, data, \
             subject, body, scheduled_at, idempotency_key, idempotency_credential, request_hash, \
             created_by) \
         VALUES ($1, $2, 'SCHEDULED', $3, $4, $5, $6, $7, $8, COALESCE($9, now()), $10, \
             CASE WHEN $10::text IS NULL THEN NULL ELSE $11 END, $12, $13) \
         ON CONFLICT (idempotency_credential, idempotency_key) DO NOTHING RETURNING id",
    )
    .bind(id)
    .bind(&new.name)
    .bind(serde_json::to_value(&new.audience).context("Failed to encode an audience")?)
    .bind(&channels)
    .bind(&new.event_type)
    .bind(Value::Object(new.data.clone()))
    .bind(&new.subject)
    .bind(&new.body)
    .bind(new.scheduled_at)
    .bind(&new.idempotency_key)
    .bind(&new.idempotency_credential)
    .bind(&new.request_hash)
    .bind(&new.created_by)
    .fetch_optional(db)
    .await
    .context("Failed to store a broadcast")?;
    if let Some(id) = inserted {
        metrics::counter!("herald_broadcasts_created_total").increment(1);
        let row = load(db, id).await?.context("a new broadcast vanished")?;
        return Ok(Created::New(row));
    }
    let key = new
        .idempotency_key
        .as_deref()
        .context("a broadcast insert without a key cannot conflict")?;
    let row: BroadcastRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{ROW} WHERE idempotency_credential = $1 AND idempotency_key = $2"
    )))
    .bind(&new.idempotency_credential)
    .bind(key)
    .fetch_one(db)
    .await
    .context("Failed to read a broadcast by its key")?;
    if row.request_hash.as_deref() == Some(new.request_hash.as_str()) {
        Ok(Created::Replayed(row))
    } else {
        Ok(Created::KeyReused)
    }
}

/// What [`create`] did.
#[derive(Debug)]
pub enum Created {
    New(BroadcastRow),
    /// The same key and request as before: the broadcast stored then.
    Replayed(BroadcastRow),
    /// The key was used with another request.
    KeyReused,
}

/// One broadcast.
pub async fn load(db: &PgPool, id: Uuid) -> anyhow::Result<Option<BroadcastRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("{ROW} WHERE id = $1")))
        .bind(id)
        .fetch_optional(db)
        .await
        .context("Failed to read a broadcast")
}

/// The newest broadcasts, newest first.
pub async fn list(db: &PgPool, limit: i64) -> anyhow::Result<Vec<BroadcastRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{ROW} ORDER BY created_at DESC, id DESC LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(db)
    .await
    .context("Failed to list broadcasts")
}

/// Counts a broadcast's deliveries by channel and outcome.
pub async fn totals(conn: &mut PgConnection, row: &BroadcastRow) -> anyhow::Result<Totals> {
    let counts: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT channel, status, count(*) FROM deliveries WHERE broadcast_id = $1 \
         GROUP BY channel, status",
    )
    .bind(row.id)
    .fetch_all(conn)
    .await
    .context("Failed to count a broadcast's deliveries")?;
    let mut totals = Totals {
        audience: i64::from(row.audience_total.unwrap_or(0)),
        created: i64::from(row.created_count),
        ..Totals::default()
    };
    for channel in row.channels() {
        totals.channels.insert(channel, Counts::default());
    }
    let mut all = Counts::default();
    for (channel, status, n) in counts {
        all.add(&status, n);
        if let Ok(channel) = channel.parse::<Channel>() {
            totals.channels.entry(channel).or_default().add(&status, n);
        }
    }
    totals.deliveries = all.done() + all.pending;
    totals.sent = all.sent;
    totals.failed = all.failed;
    totals.skipped = all.skipped;
    totals.pending = all.pending;
    Ok(totals)
}

/// Per cent of the expected deliveries (audience × channels) that are final.
pub fn progress(row: &BroadcastRow, totals: &Totals) -> f64 {
    match row.status() {
        BroadcastStatus::Completed | BroadcastStatus::Failed => 100.0,
        _ => {
            let expected = totals.audience * row.channels.len() as i64;
            if expected == 0 {
                0.0
            } else {
                let done = totals.sent + totals.failed + totals.skipped;
                ((done as f64 / expected as f64) * 1000.0).floor() / 10.0
            }
        }
    }
}

/// Reads a broadcast and locks its row until the transaction ends: whoever changes a
/// broadcast (a fan-out step, a cancel) holds this lock.
async fn lock(conn: &mut PgConnection, id: Uuid) -> anyhow::Result<Option<BroadcastRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{ROW} WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
    .context("Failed to lock a broadcast")
}

/// Outcome of a cancel request.
#[derive(Debug)]
pub enum Cancelled {
    /// Cancelled now (or before): the broadcast as it stands.
    Done(BroadcastRow),
    /// It had already finished.
    TooLate(BroadcastRow),
    NotFound,
}

/// Cancels a SCHEDULED or RUNNING broadcast: no more recipients are fanned out, and every
/// delivery not yet sent is SKIPPED. Sends already in flight finish. Cancelling twice is
/// harmless.
pub async fn cancel(
    db: &PgPool,
    id: Uuid,
    topic_prefix: &str,
    cancelled_by: &str,
) -> anyhow::Result<Cancelled> {
    let mut tx = db.begin().await.context("Failed to begin a cancel")?;
    let Some(row) = lock(&mut tx, id).await? else {
        return Ok(Cancelled::NotFound);
    };
    match row.status() {
        BroadcastStatus::Completed | BroadcastStatus::Failed => {
            return Ok(Cancelled::TooLate(row));
        }
        BroadcastStatus::Cancelled => return Ok(Cancelled::Done(row)),
        BroadcastStatus::Scheduled | BroadcastStatus::Running => {}
    }
    sqlx::query(
        "UPDATE broadcasts SET status = 'CANCELLED', cancelled_at = now(), cancelled_by = $2 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(cancelled_by)
    .execute(&mut *tx)
    .await
    .context("Failed to cancel a broadcast")?;
    let skipped =
        crate::deliveries::skip_broadcast(&mut tx, id, CANCELLED_REASON, topic_prefix).await?;
    tx.commit().await.context("Failed to commit a cancel")?;
    tracing::info!(broadcast = %id, skipped, cancelled_by, "broadcast cancelled");
    Ok(Cancelled::Done(
        load(db, id).await?.context("a broadcast vanished")?,
    ))
}

/// The event announcing that a broadcast ended, for notification.broadcast.events.
pub fn finished_event(
    row: &BroadcastRow,
    status: BroadcastStatus,
    totals: &Totals,
    finished_at: DateTime<Utc>,
    topic_prefix: &str,
) -> OutboxMessage {
    let event_type = match status {
        BroadcastStatus::Cancelled => "BROADCAST_CANCELLED",
        _ => "BROADCAST_COMPLETED",
    };
    let payload = json!({
        "eventId": Uuid::now_v7(),
        "eventType": event_type,
        "occurredAt": finished_at,
        "broadcastId": row.id,
        "name": row.name,
        "status": status,
        "channels": row.channels,
        "totals": totals,
        "createdAt": row.created_at,
        "startedAt": row.started_at,
        "finishedAt": finished_at,
    });
    OutboxMessage {
        kind: OutboxKind::BroadcastEvent,
        topic: format!("{topic_prefix}{BROADCAST_EVENTS_TOPIC}"),
        key: Some(row.id.to_string().into_bytes()),
        payload: serde_json::to_vec(&payload).expect("a broadcast event serializes"),
        headers: BTreeMap::from([("X-Event-Type".to_owned(), event_type.to_owned())]),
    }
}

/// The year range of birth years for an age range, as of `today`.
pub fn birth_years(segment: &Segment, today: DateTime<Utc>) -> (Option<i32>, Option<i32>) {
    let year = today.year();
    (
        segment.age_max.map(|age| year - age as i32),
        segment.age_min.map(|age| year - age as i32),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_age_range_is_a_birth_year_range() {
        let today = "2026-11-21T00:00:00Z".parse().unwrap();
        let segment = Segment {
            age_min: Some(20),
            age_max: Some(29),
            ..Segment::default()
        };
        assert_eq!(birth_years(&segment, today), (Some(1997), Some(2006)));
        assert_eq!(birth_years(&Segment::default(), today), (None, None));
    }

    #[test]
    fn a_reversed_age_range_is_refused() {
        let segment = Segment {
            age_min: Some(30),
            age_max: Some(20),
            ..Segment::default()
        };
        assert!(segment.check().is_err());
    }

    #[test]
    fn audiences_read_both_forms() {
        let ids: Audience = serde_json::from_value(json!({"userIds": [1, 2]})).unwrap();
        assert_eq!(
            ids,
            Audience::UserIds(vec![UserId::new(1).unwrap(), UserId::new(2).unwrap()])
        );
        let segment: Audience =
            serde_json::from_value(json!({"segment": {"ageMin": 20, "tags": ["vip"]}})).unwrap();
        assert!(matches!(segment, Audience::Segment(s) if s.age_min == Some(20)));
        assert!(serde_json::from_value::<Audience>(json!({"segment": {"bogus": 1}})).is_err());
    }
}
