//! Storing dead letters as they arrive from the DLQ topics.
//!
//! A dead letter is identified by its `X-Dead-Letter-Id` header, given when the letter was
//! made and written with its outbox row: every copy the relay publishes carries the same
//! id, and two failures never share one, whatever their positions in the topic (offsets
//! start again at 0 when a DLQ topic is recreated or a broker loses its data). Each id is
//! remembered in `dlq_letters_seen`, so a copy is stored once.
//!
//! A letter from another producer has no such header: its id is derived from what the
//! record is, a UUID (version 8) over the SHA-256 of its topic, partition, offset, key,
//! payload and headers. A copy read again at the same position is then stored once; the
//! same bytes and headers written again at the same position after the topic was emptied
//! are taken for that copy (other producers who need more put an `X-Dead-Letter-Id` of
//! their own on their letters).
//!
//! Every record is stored or parked: a letter PostgreSQL refuses (say, a NUL in a header
//! from another producer) is parked in `parked_records` with the reason, and the consumer
//! moves on; only an outage holds the batch back.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    db::is_data_error,
    domain::Domain,
    kafka::{consumer::IncomingMessage, parked},
    outbox::{DEAD_LETTER_ID_HEADER, REPLAY_COUNT_HEADER},
};

/// The DLQ topics, without prefix.
pub fn topics() -> Vec<String> {
    [
        Domain::Payment,
        Domain::Subscription,
        Domain::Order,
        Domain::Api,
    ]
    .iter()
    .map(|d| d.dlq_topic())
    .collect()
}

/// What storing a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Letters stored as new rows, or that reopened a delivery's row.
    pub stored: u64,
    /// Copies of letters stored before.
    pub duplicates: u64,
    /// Letters PostgreSQL refused, parked in `parked_records`.
    pub parked: usize,
}

/// Stores a batch of dead letters read by consumer group `group`. An `Err` is an outage:
/// nothing of the batch is lost by retrying it.
pub async fn store(
    db: &PgPool,
    group: &str,
    topic_prefix: &str,
    messages: &[IncomingMessage],
) -> anyhow::Result<Stored> {
    match store_together(db, topic_prefix, messages).await {
        Err(error) if is_data_error(&error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "a batch of dead letters was refused; storing them one by one"
            );
            let results = parked::replay_alone(db, group, messages, |message| {
                store_together(db, topic_prefix, std::slice::from_ref(message))
            })
            .await?;
            let mut total = Stored::default();
            for result in results {
                match result {
                    Some(one) => {
                        total.stored += one.stored;
                        total.duplicates += one.duplicates;
                    }
                    None => total.parked += 1,
                }
            }
            Ok(total)
        }
        other => other,
    }
}

async fn store_together(
    db: &PgPool,
    topic_prefix: &str,
    messages: &[IncomingMessage],
) -> anyhow::Result<Stored> {
    let mut tx = db.begin().await.context("Failed to begin")?;
    let mut outcome = Stored::default();
    for message in messages {
        let letter = Letter::read(topic_prefix, message)?;
        if store_one(&mut tx, &letter, message).await? {
            outcome.stored += 1;
            metrics::counter!("herald_dlq_received_total", "domain" => letter.domain).increment(1);
        } else {
            outcome.duplicates += 1;
        }
    }
    tx.commit().await.context("Failed to commit dead letters")?;
    Ok(outcome)
}

/// A dead letter's facts, read from its record.
struct Letter {
    id: Uuid,
    domain: String,
    headers: serde_json::Value,
    error_class: Option<String>,
    error_message: Option<String>,
    failed_channel: Option<String>,
    event_id: Option<String>,
    notification_id: Option<Uuid>,
    delivery_id: Option<Uuid>,
    failed_at: Option<DateTime<Utc>>,
    original_topic: Option<String>,
    original_partition: Option<i32>,
    original_offset: Option<i64>,
    /// Replays that led to it (`X-Replay-Count` of a replayed message failing again).
    replay_count: i32,
}

impl Letter {
    fn read(topic_prefix: &str, message: &IncomingMessage) -> anyhow::Result<Letter> {
        let headers: HashMap<&str, &str> = message
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let text = |name: &str| {
            headers
                .get(name)
                .filter(|v| !v.is_empty())
                .map(|v| v.to_string())
        };
        let uuid = |name: &str| text(name).and_then(|v| v.parse::<Uuid>().ok());
        let domain = message
            .topic
            .strip_prefix(topic_prefix)
            .and_then(|t| t.strip_prefix("notification.dlq."))
            .unwrap_or("unknown")
            .to_owned();
        Ok(Letter {
            id: uuid(DEAD_LETTER_ID_HEADER).unwrap_or_else(|| derived_id(message)),
            domain,
            headers: serde_json::to_value(&headers).context("Failed to encode headers")?,
            error_class: text("X-Error-Class"),
            error_message: text("X-Error-Message"),
            failed_channel: text("X-Failed-Channel"),
            event_id: text("X-Event-Id"),
            notification_id: uuid("X-Notification-Id"),
            delivery_id: uuid("X-Delivery-Id"),
            failed_at: text("X-Failed-At").and_then(|v| v.parse().ok()),
            original_topic: text("X-Original-Topic"),
            original_partition: text("X-Original-Partition").and_then(|v| v.parse().ok()),
            original_offset: text("X-Original-Offset").and_then(|v| v.parse().ok()),
            replay_count: text(REPLAY_COUNT_HEADER)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        })
    }
}

/// The id of a letter that came without [`DEAD_LETTER_ID_HEADER`] (module docs).
pub fn derived_id(message: &IncomingMessage) -> Uuid {
    let mut hash = Sha256::new();
    // Each part is length-prefixed, so that moving bytes from one part to the next cannot
    // give another letter the same id.
    let mut part = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    part(message.topic.as_bytes());
    part(&message.partition.to_be_bytes());
    part(&message.offset.to_be_bytes());
    part(message.key.as_deref().unwrap_or_default());
    part(&message.payload);
    for (name, value) in &message.headers {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Stores one letter; false when its id was seen before (a copy).
async fn store_one(
    tx: &mut PgConnection,
    letter: &Letter,
    message: &IncomingMessage,
) -> anyhow::Result<bool> {
    let first_time = sqlx::query(
        "INSERT INTO dlq_letters_seen (dead_letter_id) VALUES ($1) ON CONFLICT DO NOTHING",
    )
    .bind(letter.id)
    .execute(&mut *tx)
    .await
    .context("Failed to record a dead letter's id")?
    .rows_affected()
        == 1;
    if !first_time {
        return Ok(false);
    }
    // A delivery has one row. A new letter for it can only be a failure after an operator's
    // retry (a failed delivery fails again only once it was re-queued), so it reopens the
    // row with the new failure; no clock is compared. A discarded row stays discarded.
    let on_conflict = if letter.delivery_id.is_some() {
        "ON CONFLICT (delivery_id) WHERE delivery_id IS NOT NULL DO UPDATE SET \
             status = 'PENDING', retry_outcome = NULL, actioned_by = NULL, actioned_at = NULL, \
             dead_letter_id = EXCLUDED.dead_letter_id, \
             topic = EXCLUDED.topic, kafka_partition = EXCLUDED.kafka_partition, \
             kafka_offset = EXCLUDED.kafka_offset, headers = EXCLUDED.headers, \
             payload = EXCLUDED.payload, message_key = EXCLUDED.message_key, \
             error_class = EXCLUDED.error_class, error_message = EXCLUDED.error_message, \
             failed_at = EXCLUDED.failed_at, received_at = now() \
         WHERE dlq_messages.status <> 'DISCARDED'"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO dlq_messages (id, dead_letter_id, domain, topic, kafka_partition, \
             kafka_offset, message_key, payload, headers, error_class, error_message, \
             failed_channel, event_id, notification_id, delivery_id, failed_at, \
             original_topic, original_partition, original_offset, event_type, replay_count) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20, $21) \
         {on_conflict}"
    );
    let written = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(letter.id)
        .bind(&letter.domain)
        .bind(&message.topic)
        .bind(message.partition)
        .bind(message.offset)
        .bind(&message.key)
        .bind(&message.payload)
        .bind(&letter.headers)
        .bind(&letter.error_class)
        .bind(&letter.error_message)
        .bind(&letter.failed_channel)
        .bind(&letter.event_id)
        .bind(letter.notification_id)
        .bind(letter.delivery_id)
        .bind(letter.failed_at)
        .bind(&letter.original_topic)
        .bind(letter.original_partition)
        .bind(letter.original_offset)
        .bind(event_type_of(&message.payload))
        .bind(letter.replay_count)
        .execute(&mut *tx)
        .await
        .context("Failed to store a dead letter")?;
    Ok(written.rows_affected() > 0)
}

/// Exports `herald_dlq_messages{domain, status}`, `herald_dlq_pending{domain, class}` and
/// `herald_dlq_oldest_pending_seconds{domain}`. A label set that had letters and has none
/// now reads 0 rather than its last value.
pub async fn export_sizes(db: &PgPool) {
    static SEEN: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let counts: Result<Vec<(String, String, i64)>, _> =
        sqlx::query_as("SELECT domain, status, count(*) FROM dlq_messages GROUP BY domain, status")
            .fetch_all(db)
            .await;
    if let Ok(counts) = counts {
        for (domain, status, n) in counts {
            metrics::gauge!("herald_dlq_messages", "domain" => domain, "status" => status)
                .set(n as f64);
        }
    }
    let pending: Result<Vec<(String, String, i64, f64)>, _> = sqlx::query_as(
        "SELECT domain, COALESCE(error_class, 'unknown'), count(*), \
             EXTRACT(EPOCH FROM now() - min(COALESCE(failed_at, received_at)))::float8 \
         FROM dlq_messages WHERE status = 'PENDING' GROUP BY 1, 2",
    )
    .fetch_all(db)
    .await;
    let Ok(pending) = pending else { return };
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut oldest: std::collections::BTreeMap<&str, f64> = Default::default();
    for (domain, class, n, age) in &pending {
        metrics::gauge!("herald_dlq_pending", "domain" => domain.clone(), "class" => class.clone())
            .set(*n as f64);
        let entry = oldest.entry(domain.as_str()).or_default();
        *entry = entry.max(*age);
    }
    for (domain, class) in seen.iter() {
        if !pending.iter().any(|(d, c, ..)| d == domain && c == class) {
            metrics::gauge!("herald_dlq_pending", "domain" => domain.clone(), "class" => class.clone())
                .set(0.0);
            oldest.entry(domain.as_str()).or_default();
        }
    }
    for (domain, age) in oldest {
        metrics::gauge!("herald_dlq_oldest_pending_seconds", "domain" => domain.to_owned())
            .set(age);
    }
    for (domain, class, ..) in &pending {
        if !seen.iter().any(|(d, c)| d == domain && c == class) {
            seen.push((domain.clone(), class.clone()));
        }
    }
}

/// The `eventType` of a dead-lettered payload, when it is a JSON object that names one (a
/// poison message may not be JSON at all).
fn event_type_of(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Typed {
        event_type: Option<String>,
    }
    serde_json::from_slice::<Typed>(payload)
        .ok()?
        .event_type
        .map(|t| t.replace('\0', "").chars().take(100).collect())
}
