//! The operators' side of dead letters: list, retry, retry-all, discard.
//!
//! Retrying a delivery failure re-queues only that delivery (the notification's other
//! channels are not sent again), with a fresh retry budget. Retrying a poison message
//! re-runs ingestion of its stored bytes. Discarding is a soft delete kept for audit.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    domain::Domain,
    ingest::Ingestor,
    kafka::consumer::IncomingMessage,
    outbox::{PAYLOAD_TRUNCATED_HEADER, ReplayOrigin},
};

/// Why an admin action could not be done.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no dead letter {0}")]
    NotFound(Uuid),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// A dead letter as operators see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = DeadLetter)]
pub struct DeadLetterView {
    pub id: Uuid,
    /// The identity the letter was made with (`X-Dead-Letter-Id`, or one derived from the
    /// record for other producers' letters); for a delivery's row, its latest letter's.
    /// None on rows stored before letters had one.
    pub dead_letter_id: Option<Uuid>,
    pub domain: String,
    pub status: String,
    /// For a retried delivery: PENDING until it ends, then SUCCESS or FAILED. For a retried
    /// poison message: ACCEPTED, DUPLICATE or POISON.
    pub retry_outcome: Option<String>,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub failed_channel: Option<String>,
    pub event_id: Option<String>,
    pub notification_id: Option<Uuid>,
    pub delivery_id: Option<Uuid>,
    pub original_topic: Option<String>,
    pub original_partition: Option<i32>,
    pub original_offset: Option<i64>,
    /// Where the letter was read: information, not identity (offsets start again at 0
    /// when a topic is recreated).
    pub topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub headers: Value,
    /// The dead-lettered bytes, as text (lossy for bytes that are not UTF-8).
    #[sqlx(skip)]
    pub payload: String,
    #[serde(skip)]
    pub payload_bytes: Vec<u8>,
    /// The dead-lettered key, for re-ingestion.
    #[serde(skip)]
    pub message_key: Option<Vec<u8>>,
    pub actioned_by: Option<String>,
    pub actioned_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    /// The payload's eventType, when it is JSON that names one.
    pub event_type: Option<String>,
    /// The error class and message with ids and numbers normalised: letters with one cause
    /// share it (migration 0016).
    pub fingerprint: Option<String>,
    /// How many times operators replayed it (one more needs `force` beyond the cap).
    pub replay_count: i32,
    /// The state of the delivery it is about, if any.
    pub delivery_status: Option<String>,
    /// The poison message as an operator corrected it (re-ingested instead of `payload`,
    /// which stays as it arrived), as text.
    #[sqlx(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edited: Option<String>,
    #[serde(skip)]
    pub edited_payload: Option<Vec<u8>>,
    /// The corrections made to it, oldest first (only when one letter is read).
    #[sqlx(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edits: Option<Vec<super::edit::Edit>>,
}

const SELECT: &str = "SELECT m.id, m.dead_letter_id, m.domain, m.status, \
        CASE WHEN m.status = 'RETRIED' AND m.delivery_id IS NOT NULL THEN \
             CASE d.status WHEN 'SUCCESS' THEN 'SUCCESS' WHEN 'FAILED' THEN 'FAILED' ELSE 'PENDING' END \
             ELSE m.retry_outcome END AS retry_outcome, \
        m.error_class, m.error_message, m.failed_channel, m.event_id, m.notification_id, \
        m.delivery_id, m.original_topic, m.original_partition, m.original_offset, m.topic, \
        m.kafka_partition, m.kafka_offset, m.headers, m.payload AS payload_bytes, m.message_key, m.actioned_by, m.actioned_at, \
        m.failed_at, m.received_at, m.event_type, m.fingerprint, m.replay_count, \
        d.status AS delivery_status, m.edited_payload \
    FROM dlq_messages m LEFT JOIN deliveries d ON d.id = m.delivery_id";

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub find: Find,
    /// Newest first, strictly after this (received_at, id).
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// What finds dead letters: every field that is set must hold.
#[derive(Debug, Clone, Default)]
pub struct Find {
    pub domain: Option<String>,
    /// `None` finds every status but DISCARDED.
    pub status: Option<String>,
    pub error_class: Option<String>,
    pub failed_channel: Option<String>,
    pub event_type: Option<String>,
    /// Failed at or after.
    pub from: Option<DateTime<Utc>>,
    /// Failed before.
    pub to: Option<DateTime<Utc>>,
    /// Text the error message contains (any letter case).
    pub text: Option<String>,
    pub fingerprint: Option<String>,
}

/// The conditions of a [`Find`] on `m`, binding $1 to $9 in [`Find::bind`]'s order.
pub(super) const FIND: &str = "($1::text IS NULL OR m.domain = $1) \
    AND (($2::text IS NULL AND m.status <> 'DISCARDED') OR m.status = $2) \
    AND ($3::text IS NULL OR m.error_class = $3) \
    AND ($4::text IS NULL OR m.failed_channel = $4) \
    AND ($5::text IS NULL OR m.event_type = $5) \
    AND ($6::timestamptz IS NULL OR m.failed_at >= $6) \
    AND ($7::timestamptz IS NULL OR m.failed_at < $7) \
    AND ($8::text IS NULL OR m.error_message ILIKE '%' || $8 || '%') \
    AND ($9::text IS NULL OR m.fingerprint = $9)";

impl Find {
    /// Binds the find's values to a query built on [`FIND`].
    pub(super) fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        // The text is matched literally: LIKE's wildcards in it are escaped.
        let text = self.text.as_ref().map(|t| {
            t.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        });
        query
            .bind(self.domain.clone())
            .bind(self.status.clone())
            .bind(self.error_class.clone())
            .bind(self.failed_channel.clone())
            .bind(self.event_type.clone())
            .bind(self.from)
            .bind(self.to)
            .bind(text)
            .bind(self.fingerprint.clone())
    }
}

/// Letters with one cause, counted.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FingerprintCount {
    pub fingerprint: String,
    pub error_class: Option<String>,
    pub count: i64,
    /// The newest letter with it, and its own message.
    pub example_id: Uuid,
    pub example_message: Option<String>,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub last_failed_at: Option<DateTime<Utc>>,
}

/// Letters of one error class, counted.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassCount {
    pub error_class: Option<String>,
    pub count: i64,
}

/// How many letters a find matches, by error class and by fingerprint (the 100 largest).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = DeadLetterCounts)]
pub struct Counts {
    pub total: i64,
    pub by_class: Vec<ClassCount>,
    pub by_fingerprint: Vec<FingerprintCount>,
}

/// Counts the letters a find matches.
pub async fn counts(db: &PgPool, find: &Find) -> anyhow::Result<Counts> {
    let by_class: Vec<ClassCount> = find
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT m.error_class, count(*) AS count FROM dlq_messages m WHERE {FIND} \
             GROUP BY m.error_class ORDER BY count(*) DESC, m.error_class"
        ))))
        .fetch_all(db)
        .await
        .context("Failed to count dead letters")?;
    let by_fingerprint: Vec<FingerprintCount> = find
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT m.fingerprint, min(m.error_class) AS error_class, count(*) AS count, \
                 (array_agg(m.id ORDER BY m.received_at DESC))[1] AS example_id, \
                 (array_agg(m.error_message ORDER BY m.received_at DESC))[1] AS example_message, \
                 min(m.failed_at) AS first_failed_at, max(m.failed_at) AS last_failed_at \
             FROM dlq_messages m WHERE {FIND} \
             GROUP BY m.fingerprint ORDER BY count(*) DESC, m.fingerprint LIMIT 100"
        ))))
        .fetch_all(db)
        .await
        .context("Failed to count dead letters")?;
    Ok(Counts {
        total: by_class.iter().map(|c| c.count).sum(),
        by_class,
        by_fingerprint,
    })
}

/// A page of dead letters.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = DeadLetterPage)]
pub struct Page {
    pub items: Vec<DeadLetterView>,
    pub next_cursor: Option<String>,
}

/// Lists dead letters, newest first.
pub async fn list(db: &PgPool, filter: &ListFilter) -> anyhow::Result<Page> {
    let sql = format!(
        "{SELECT} WHERE {FIND} \
           AND ($10::timestamptz IS NULL OR (m.received_at, m.id) < ($10, $11)) \
         ORDER BY m.received_at DESC, m.id DESC LIMIT $12"
    );
    let mut items: Vec<DeadLetterView> = filter
        .find
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)))
        .bind(filter.after.map(|a| a.0))
        .bind(filter.after.map(|a| a.1))
        .bind(filter.limit + 1)
        .fetch_all(db)
        .await
        .context("Failed to list dead letters")?;
    items.iter_mut().for_each(with_text);
    let next_cursor = if items.len() as i64 > filter.limit {
        items.truncate(filter.limit as usize);
        items
            .last()
            .map(|m| format!("{}_{}", m.received_at.timestamp_micros(), m.id))
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

/// One dead letter.
pub async fn get(db: &PgPool, id: Uuid) -> Result<DeadLetterView, AdminError> {
    let mut letter: DeadLetterView =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT} WHERE m.id = $1")))
            .bind(id)
            .fetch_optional(db)
            .await
            .context("Failed to read a dead letter")?
            .ok_or(AdminError::NotFound(id))?;
    with_text(&mut letter);
    Ok(letter)
}

fn with_text(letter: &mut DeadLetterView) {
    letter.payload = String::from_utf8_lossy(&letter.payload_bytes).into_owned();
    letter.edited = letter
        .edited_payload
        .as_deref()
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
}

/// What a retry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RetryKind {
    /// The failed delivery (or webhook call) is PENDING again.
    Requeued,
    /// The poison message went through ingestion again.
    Reingested,
}

/// What a retry of one letter would do, decided from the letter alone (and its delivery's
/// state): the same plan serves a single retry, retry-all, a replay and its dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Re-queue the webhook call the letter names.
    RequeueWebhookCall(Uuid),
    /// Re-queue the failed delivery.
    Requeue(Uuid),
    /// Re-ingest the poison message (as edited, if it was).
    Reingest,
    /// Leave it: why, as a stable code and in words.
    Skip { code: &'static str, message: String },
}

impl Plan {
    /// Why a letter carried out with this plan can have been left: the plan's own reason,
    /// or, for a plan that would have gone, that the letter changed since it was read.
    pub fn skip_code(&self) -> &'static str {
        match self {
            Plan::Skip { code, .. } => code,
            _ => "changed_meanwhile",
        }
    }
}

/// The plan for `letter` when `cap` replays need `force` to go beyond.
pub fn plan(letter: &DeadLetterView, force: bool, cap: u32) -> Plan {
    let skip = |code, message: String| Plan::Skip { code, message };
    let id = letter.id;
    if letter.status == "DISCARDED" {
        return skip("discarded", format!("dead letter {id} was discarded"));
    }
    if !force && letter.replay_count >= cap as i32 {
        return skip(
            "replay_cap",
            format!(
                "dead letter {id} was replayed {} times, the cap (HERALD_DLQ_REPLAY_CAP) is \
                 {cap}: replay it again with force",
                letter.replay_count
            ),
        );
    }
    let webhook_call = letter
        .headers
        .get(crate::webhooks::sender::WEBHOOK_CALL_HEADER)
        .and_then(Value::as_str)
        .and_then(|id| id.parse::<Uuid>().ok());
    if let Some(call) = webhook_call {
        return Plan::RequeueWebhookCall(call);
    }
    if let Some(delivery) = letter.delivery_id {
        return match letter.delivery_status.as_deref() {
            Some("FAILED") => Plan::Requeue(delivery),
            Some(status) => skip(
                "delivery_not_failed",
                format!("delivery {delivery} is {status}, not FAILED"),
            ),
            None => skip(
                "delivery_gone",
                format!("delivery {delivery} no longer exists"),
            ),
        };
    }
    if letter.edited_payload.is_none()
        && let Some(size) = letter
            .headers
            .get(PAYLOAD_TRUNCATED_HEADER)
            .and_then(Value::as_str)
    {
        return skip(
            "payload_truncated",
            format!(
                "dead letter {id} holds only the start of a {size}-byte event (Kafka refused \
                     the whole of it); publish the original again from its topic, or correct it \
                     with PATCH first"
            ),
        );
    }
    if letter.original_topic.is_none()
        || letter.original_partition.is_none()
        || letter.original_offset.is_none()
    {
        return skip(
            "no_original_position",
            format!("dead letter {id} has no original position to re-ingest"),
        );
    }
    if letter.domain.parse::<Domain>().is_err() {
        return skip(
            "unknown_domain",
            format!("dead letter {id} is of no known domain ({})", letter.domain),
        );
    }
    Plan::Reingest
}

/// A replay's item, marked done in the same transaction as its letter.
#[derive(Debug, Clone, Copy)]
pub struct ItemRef {
    pub replay_id: Uuid,
    pub position: i32,
}

/// Retries one dead letter on behalf of `actor`; beyond `cap` replays only with `force`.
pub async fn retry(
    ingestor: &Ingestor,
    id: Uuid,
    actor: &str,
    force: bool,
    cap: u32,
) -> Result<RetryKind, AdminError> {
    let letter = get(&ingestor.db, id).await?;
    let plan = plan(&letter, force, cap);
    carry_out(ingestor, &letter, &plan, actor, None).await
}

/// Carries out a plan for `letter`, marking `item` done with it when a replay does it.
pub async fn carry_out(
    ingestor: &Ingestor,
    letter: &DeadLetterView,
    plan: &Plan,
    actor: &str,
    item: Option<ItemRef>,
) -> Result<RetryKind, AdminError> {
    let origin = ReplayOrigin {
        dead_letter_id: letter.dead_letter_id.unwrap_or(letter.id),
        replay_count: letter.replay_count + 1,
    };
    let retried = match plan {
        Plan::Skip { message, .. } => Err(AdminError::Conflict(message.clone())),
        Plan::RequeueWebhookCall(call) => {
            requeue_webhook_call(ingestor, letter, *call, actor, item).await
        }
        Plan::Requeue(delivery) => requeue(ingestor, letter, *delivery, origin, actor, item).await,
        Plan::Reingest => reingest(ingestor, letter, origin, actor, item).await,
    };
    let outcome = match &retried {
        Ok(RetryKind::Requeued) => "requeued",
        Ok(RetryKind::Reingested) => "reingested",
        Err(AdminError::Conflict(_) | AdminError::NotFound(_)) => "refused",
        Err(_) => "failed",
    };
    metrics::counter!("herald_dlq_replays_total", "domain" => letter.domain.clone(), "outcome" => outcome)
        .increment(1);
    retried
}

/// Retries a webhook call that failed until its deadline: it goes out again, with a fresh
/// window of retries.
async fn requeue_webhook_call(
    ingestor: &Ingestor,
    letter: &DeadLetterView,
    call: Uuid,
    actor: &str,
    item: Option<ItemRef>,
) -> Result<RetryKind, AdminError> {
    let mut tx = ingestor.db.begin().await.context("Failed to begin")?;
    if !crate::webhooks::sender::requeue(&mut tx, call).await? {
        return Err(AdminError::Conflict(format!(
            "webhook call {call} is not FAILED (or no longer exists)"
        )));
    }
    mark(&mut tx, letter.id, actor, None, item, RetryKind::Requeued).await?;
    tx.commit().await.context("Failed to commit the retry")?;
    Ok(RetryKind::Requeued)
}

async fn requeue(
    ingestor: &Ingestor,
    letter: &DeadLetterView,
    delivery: Uuid,
    origin: ReplayOrigin,
    actor: &str,
    item: Option<ItemRef>,
) -> Result<RetryKind, AdminError> {
    let mut tx = ingestor.db.begin().await.context("Failed to begin")?;
    if !crate::deliveries::requeue_failed(&mut tx, delivery, origin, &ingestor.topic_prefix).await?
    {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM deliveries WHERE id = $1")
                .bind(delivery)
                .fetch_optional(&mut *tx)
                .await
                .context("Failed to read the delivery")?;
        return Err(AdminError::Conflict(match status {
            Some(status) => format!("delivery {delivery} is {status}, not FAILED"),
            None => format!("delivery {delivery} no longer exists"),
        }));
    }
    mark(&mut tx, letter.id, actor, None, item, RetryKind::Requeued).await?;
    tx.commit().await.context("Failed to commit the retry")?;
    ingestor.wakeup.wake_all();
    Ok(RetryKind::Requeued)
}

/// Runs ingestion again on the letter's bytes (its correction, if an operator made one),
/// with the replay's origin in `X-Replay-Of` / `X-Replay-Count`. The event's idempotency
/// key (topic and eventId) makes a second re-ingestion of an accepted event a DUPLICATE, so
/// a replay resumed after a crash between ingestion and the mark sends nothing twice.
async fn reingest(
    ingestor: &Ingestor,
    letter: &DeadLetterView,
    origin: ReplayOrigin,
    actor: &str,
    item: Option<ItemRef>,
) -> Result<RetryKind, AdminError> {
    let domain: Domain = letter
        .domain
        .parse()
        .map_err(|e: String| AdminError::Conflict(e))?;
    let (Some(topic), Some(partition), Some(offset)) = (
        letter.original_topic.clone(),
        letter.original_partition,
        letter.original_offset,
    ) else {
        return Err(AdminError::Conflict(format!(
            "dead letter {} has no original position to re-ingest",
            letter.id
        )));
    };
    let group = letter
        .headers
        .get("X-Consumer-Group")
        .and_then(Value::as_str)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{}{}", ingestor.topic_prefix, domain.consumer_group()));
    let message = IncomingMessage {
        topic,
        partition,
        offset,
        key: letter.message_key.clone(),
        payload: letter
            .edited_payload
            .clone()
            .unwrap_or_else(|| letter.payload_bytes.clone()),
        headers: origin.headers().to_vec(),
        timestamp: None,
    };
    let outcome = ingestor.process(domain, &group, &[message]).await?;
    let result = if outcome.accepted > 0 {
        "ACCEPTED"
    } else if outcome.duplicates > 0 {
        "DUPLICATE"
    } else {
        "POISON"
    };
    let mut tx = ingestor.db.begin().await.context("Failed to begin")?;
    mark(
        &mut tx,
        letter.id,
        actor,
        Some(result),
        item,
        RetryKind::Reingested,
    )
    .await?;
    tx.commit().await.context("Failed to commit the retry")?;
    Ok(RetryKind::Reingested)
}

/// Marks a letter retried (one more replay counted) and, for a replay, its item done.
async fn mark(
    tx: &mut sqlx::PgConnection,
    id: Uuid,
    actor: &str,
    outcome: Option<&str>,
    item: Option<ItemRef>,
    kind: RetryKind,
) -> Result<(), AdminError> {
    let marked = sqlx::query(
        "UPDATE dlq_messages SET status = 'RETRIED', retry_outcome = $3, actioned_by = $2, \
             actioned_at = now(), replay_count = replay_count + 1 \
         WHERE id = $1 AND status <> 'DISCARDED'",
    )
    .bind(id)
    .bind(actor)
    .bind(outcome)
    .execute(&mut *tx)
    .await
    .context("Failed to mark the dead letter retried")?
    .rows_affected();
    // Discarded (or purged) since it was read: the caller's transaction, re-queue included,
    // is rolled back.
    if marked == 0 {
        return Err(AdminError::Conflict(format!(
            "dead letter {id} was discarded meanwhile"
        )));
    }
    if let Some(item) = item {
        let outcome = match kind {
            RetryKind::Requeued => "REQUEUED",
            RetryKind::Reingested => "REINGESTED",
        };
        super::replay::item_done(tx, item, outcome, None).await?;
    }
    Ok(())
}

/// What retry-all did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryAllReport {
    pub requeued: usize,
    pub reingested: usize,
    /// Could not be retried as they stand (their delivery is no longer FAILED, the replay
    /// cap...): how many, and how many for each reason.
    pub skipped: usize,
    pub skipped_reasons: std::collections::BTreeMap<&'static str, usize>,
    /// Retrying failed; they stay PENDING.
    pub failed: usize,
    /// PENDING dead letters beyond this call's limit.
    pub remaining: i64,
}

/// Retries up to `limit` PENDING dead letters, oldest first, at once: a replay of the
/// domain's pending letters without a rate, a background run or force.
pub async fn retry_all(
    ingestor: &Ingestor,
    domain: Option<&str>,
    limit: i64,
    actor: &str,
    cap: u32,
) -> anyhow::Result<RetryAllReport> {
    let find = Find {
        domain: domain.map(str::to_owned),
        status: Some("PENDING".to_owned()),
        ..Find::default()
    };
    let letters = oldest_first(&ingestor.db, &find, None, limit).await?;
    let mut report = RetryAllReport::default();
    for letter in letters {
        let plan = plan(&letter, false, cap);
        match carry_out(ingestor, &letter, &plan, actor, None).await {
            Ok(RetryKind::Requeued) => report.requeued += 1,
            Ok(RetryKind::Reingested) => report.reingested += 1,
            Err(AdminError::Conflict(_) | AdminError::NotFound(_)) => {
                report.skipped += 1;
                *report.skipped_reasons.entry(plan.skip_code()).or_default() += 1;
            }
            Err(AdminError::Internal(error)) => {
                tracing::warn!(id = %letter.id, error = format!("{error:#}"), "retry failed");
                report.failed += 1;
            }
        }
    }
    report.remaining = sqlx::query_scalar(
        "SELECT count(*) FROM dlq_messages WHERE status = 'PENDING' AND ($1::text IS NULL OR domain = $1)",
    )
    .bind(domain)
    .fetch_one(&ingestor.db)
    .await
    .context("Failed to count pending dead letters")?;
    Ok(report)
}

/// Up to `limit` letters a find matches, oldest first, strictly after `after`
/// (received_at, id).
pub async fn oldest_first(
    db: &PgPool,
    find: &Find,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> anyhow::Result<Vec<DeadLetterView>> {
    let sql = format!(
        "{SELECT} WHERE {FIND} \
           AND ($10::timestamptz IS NULL OR (m.received_at, m.id) > ($10, $11)) \
         ORDER BY m.received_at, m.id LIMIT $12"
    );
    let mut letters: Vec<DeadLetterView> = find
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)))
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(limit)
        .fetch_all(db)
        .await
        .context("Failed to list dead letters")?;
    letters.iter_mut().for_each(with_text);
    Ok(letters)
}

/// Discards one dead letter (kept, hidden from the default list).
pub async fn discard(db: &PgPool, id: Uuid, actor: &str) -> Result<DeadLetterView, AdminError> {
    sqlx::query(
        "UPDATE dlq_messages SET status = 'DISCARDED', actioned_by = $2, actioned_at = now() \
         WHERE id = $1 AND status <> 'DISCARDED'",
    )
    .bind(id)
    .bind(actor)
    .execute(db)
    .await
    .context("Failed to discard a dead letter")?;
    get(db, id).await
}
