//! Reads of the read model: a user's history and inbox, and the delivery statistics.

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::receipts::ReceiptColumns;

/// One delivery in a user's history.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub delivery_id: Uuid,
    pub notification_id: Uuid,
    pub event_id: Option<String>,
    pub event_type: String,
    pub channel: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub read_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// Why a PENDING delivery waits (quiet_hours, frequency_capped, digest, ...), and
    /// until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_until: Option<DateTime<Utc>>,
    /// The digest it is (or was sent) in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_id: Option<Uuid>,
    /// What the provider said became of the message; null until a receipt.
    #[sqlx(flatten)]
    #[schema(value_type = Option<crate::receipts::ReceiptState>)]
    pub receipt: ReceiptColumns,
}

/// A page of history, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    pub items: Vec<HistoryEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// History filters.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub channel: Option<String>,
    pub status: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Only unread IN_APP entries.
    pub unread_in_app: bool,
}

/// The position after an entry: its creation time and delivery id.
pub fn encode_cursor(entry: &HistoryEntry) -> String {
    format!(
        "{}_{}",
        entry.created_at.timestamp_micros(),
        entry.delivery_id
    )
}

/// Parses a cursor made by [`encode_cursor`].
pub fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        id.parse().ok()?,
    ))
}

/// A user's deliveries, newest first, `limit` per page.
pub async fn history(
    db: &PgPool,
    user_id: i64,
    filter: &HistoryFilter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> anyhow::Result<HistoryPage> {
    let mut items: Vec<HistoryEntry> = sqlx::query_as(
        "SELECT delivery_id, notification_id, event_id, event_type, channel, status, attempts, \
             last_error, read_at, created_at, updated_at, completed_at, hold_reason, \
             hold_until, digest_id, receipt_status, receipt_reason, receipt_permanent, \
             receipt_at \
         FROM notification_log \
         WHERE user_id = $1 \
           AND ($2::text IS NULL OR channel = $2) \
           AND ($3::text IS NULL OR status = $3) \
           AND ($4::timestamptz IS NULL OR created_at >= $4) \
           AND ($5::timestamptz IS NULL OR created_at < $5) \
           AND ($6::timestamptz IS NULL OR (created_at, delivery_id) < ($6, $7)) \
           AND (NOT $8 OR (channel = 'IN_APP' AND read_at IS NULL)) \
         ORDER BY created_at DESC, delivery_id DESC LIMIT $9",
    )
    .bind(user_id)
    .bind(&filter.channel)
    .bind(&filter.status)
    .bind(filter.from)
    .bind(filter.to)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(filter.unread_in_app)
    .bind(limit + 1)
    .fetch_all(db)
    .await
    .context("Failed to read history")?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(encode_cursor)
    } else {
        None
    };
    Ok(HistoryPage { items, next_cursor })
}

/// Unread in-app messages of a user.
pub async fn unread_count(db: &PgPool, user_id: i64) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM notification_log \
         WHERE user_id = $1 AND channel = 'IN_APP' AND status = 'SUCCESS' AND read_at IS NULL",
    )
    .bind(user_id)
    .fetch_one(db)
    .await
    .context("Failed to count unread messages")
}

/// Terminal outcomes of one day on one channel.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DailyStats {
    pub day: NaiveDate,
    pub channel: String,
    /// Attempted to the end: success + failed.
    pub sent: i64,
    pub success: i64,
    pub failed: i64,
    pub skipped: i64,
    /// success / sent, or null when nothing was sent.
    pub success_rate: Option<f64>,
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub receipts: ReceiptCounts,
}

/// What providers reported of the sends they accepted (issue 15).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptCounts {
    /// Sends a provider reported DELIVERED.
    pub delivered: i64,
    /// Sends a provider reported UNDELIVERED or BOUNCED.
    pub undelivered: i64,
    /// delivered / (delivered + undelivered): of the sends a provider reported on, the share
    /// that arrived; null without receipts (Slack and in-app have none).
    pub delivered_rate: Option<f64>,
}

/// Per day and channel, `from` to `to` inclusive.
pub async fn daily(db: &PgPool, from: NaiveDate, to: NaiveDate) -> anyhow::Result<Vec<DailyStats>> {
    sqlx::query_as(
        "SELECT day, channel, success + failed AS sent, success, failed, skipped, \
             CASE WHEN success + failed > 0 THEN success::float8 / (success + failed) END AS success_rate, \
             delivered, undelivered, \
             CASE WHEN delivered + undelivered > 0 \
                  THEN delivered::float8 / (delivered + undelivered) END AS delivered_rate \
         FROM delivery_stats WHERE day BETWEEN $1 AND $2 ORDER BY day, channel",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
    .context("Failed to read statistics")
}

/// Totals of one channel over a period.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStats {
    pub channel: String,
    pub sent: i64,
    pub success: i64,
    pub failed: i64,
    pub skipped: i64,
    pub success_rate: Option<f64>,
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub receipts: ReceiptCounts,
}

/// Per channel, `from` to `to` inclusive.
pub async fn channels(
    db: &PgPool,
    from: NaiveDate,
    to: NaiveDate,
) -> anyhow::Result<Vec<ChannelStats>> {
    sqlx::query_as(
        "SELECT channel, sum(success + failed)::int8 AS sent, sum(success)::int8 AS success, \
             sum(failed)::int8 AS failed, sum(skipped)::int8 AS skipped, \
             CASE WHEN sum(success + failed) > 0 \
                  THEN sum(success)::float8 / sum(success + failed) END AS success_rate, \
             sum(delivered)::int8 AS delivered, sum(undelivered)::int8 AS undelivered, \
             CASE WHEN sum(delivered + undelivered) > 0 \
                  THEN sum(delivered)::float8 / sum(delivered + undelivered) END AS delivered_rate \
         FROM delivery_stats WHERE day BETWEEN $1 AND $2 GROUP BY channel ORDER BY channel",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
    .context("Failed to read channel statistics")
}

/// A recent failure.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub delivery_id: Uuid,
    pub notification_id: Uuid,
    pub event_type: String,
    pub channel: String,
    pub user_id: Option<i64>,
    pub attempts: i32,
    pub reason: Option<String>,
    pub failed_at: Option<DateTime<Utc>>,
}

/// The most recent failures, newest first.
pub async fn failures(db: &PgPool, limit: i64) -> anyhow::Result<Vec<Failure>> {
    sqlx::query_as(
        "SELECT delivery_id, notification_id, event_type, channel, user_id, attempts, \
             last_error AS reason, failed_at \
         FROM notification_log WHERE failed_at IS NOT NULL ORDER BY failed_at DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
    .context("Failed to read failures")
}
