//! From the event topics to webhook calls: each batch the `notif-webhooks` group reads
//! becomes one call per event and subscribed endpoint, in one statement, before its offsets
//! are committed (at least once; a record read again is the same call, by its topic
//! position).

use anyhow::Context;
use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::Kind;
use crate::kafka::consumer::IncomingMessage;

/// The consumer group's name, without prefix.
pub const GROUP: &str = "notif-webhooks";

/// How often an instance looks for a first endpoint while it has none.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How far before the first endpoint's creation the fan-out starts reading: records carry
/// their producer's clock, the creation time PostgreSQL's.
const CLOCK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// Waits until some endpoint exists (deleted ones aside); returns when the fan-out should
/// read from: the earliest such endpoint's creation, less [`CLOCK_MARGIN`]. `None` at
/// `shutdown`. Until then the fan-out reads nothing: with no endpoint, every record it read
/// would be copied out, looked at and dropped (about 4 % of the CPU per event of the
/// bench's end-to-end phase, BENCHMARKS.md).
pub async fn first_endpoint(
    db: &PgPool,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<chrono::DateTime<Utc>> {
    loop {
        match sqlx::query_scalar::<_, Option<chrono::DateTime<Utc>>>(
            "SELECT min(created_at) FROM webhook_endpoints WHERE deleted_at IS NULL",
        )
        .fetch_one(db)
        .await
        {
            Ok(Some(created)) => return Some(created - CLOCK_MARGIN),
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(
                    error = format!("{error:#}"),
                    "cannot look for webhook endpoints"
                )
            }
        }
        tokio::select! {
            () = tokio::time::sleep(LOOK_EVERY) => {}
            () = shutdown.cancelled() => return None,
        }
    }
}

/// The body of a call: `{"type", "timestamp", "data"}` (the Standard Webhooks shape), where
/// `data` is the event as the topic carries it.
fn body(kind: Kind, message: &IncomingMessage) -> Option<(String, Vec<u8>)> {
    let data: Value = serde_json::from_slice(&message.payload).ok()?;
    let event_type = match kind {
        Kind::Delivery => "delivery.updated".to_owned(),
        Kind::NotificationStatus => "notification.status_changed".to_owned(),
        Kind::Broadcast => {
            let name = message
                .headers
                .iter()
                .find(|(k, _)| k == "X-Event-Type")
                .map(|(_, v)| v.to_ascii_lowercase())
                .unwrap_or_else(|| "broadcast_updated".to_owned());
            format!("broadcast.{}", name.trim_start_matches("broadcast_"))
        }
    };
    let body = json!({ "type": event_type, "timestamp": Utc::now(), "data": data });
    Some((event_type, serde_json::to_vec(&body).ok()?))
}

/// Writes the calls a batch makes; `topic_prefix` is stripped from topic names to find the
/// kind. Returns how many calls were made.
pub async fn apply(
    db: &PgPool,
    topic_prefix: &str,
    give_up_after: std::time::Duration,
    batch: &[IncomingMessage],
) -> anyhow::Result<usize> {
    let endpoints: Vec<(Uuid, Vec<String>, chrono::DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, kinds, created_at FROM webhook_endpoints WHERE deleted_at IS NULL",
    )
    .fetch_all(db)
    .await
    .context("Failed to read webhook endpoints")?;
    if endpoints.is_empty() {
        return Ok(0);
    }
    let (mut ids, mut targets, mut sources, mut kinds, mut types, mut payloads) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for message in batch {
        let Some(kind) = message
            .topic
            .strip_prefix(topic_prefix)
            .and_then(Kind::of_topic)
        else {
            continue;
        };
        // An endpoint takes the events from its creation on: a record published before it
        // existed (read late, or again after the fan-out started) is not its.
        let subscribed: Vec<Uuid> = endpoints
            .iter()
            .filter(|(_, k, created)| {
                k.iter().any(|k| k == kind.as_str())
                    && message
                        .timestamp
                        .is_none_or(|at| at >= (*created - CLOCK_MARGIN).timestamp_millis())
            })
            .map(|(id, _, _)| *id)
            .collect();
        if subscribed.is_empty() {
            continue;
        }
        let Some((event_type, payload)) = body(kind, message) else {
            tracing::warn!(topic = %message.topic, offset = message.offset, "not a JSON event; no webhook call");
            continue;
        };
        for endpoint in subscribed {
            ids.push(Uuid::now_v7());
            targets.push(endpoint);
            sources.push(format!(
                "{}:{}:{}",
                message.topic, message.partition, message.offset
            ));
            kinds.push(kind.as_str());
            types.push(event_type.clone());
            payloads.push(payload.clone());
        }
    }
    if ids.is_empty() {
        return Ok(0);
    }
    let made = sqlx::query(
        // A disabled endpoint's calls are kept but not due (due in the year 9999, until it is
        // enabled with a fresh window), so the sender's claim does not wade through them.
        "INSERT INTO webhook_deliveries (id, endpoint_id, source, kind, event_type, payload, \
             give_up_at, retry_window, next_attempt_at) \
         SELECT t.id, t.endpoint_id, t.source, t.kind, t.event_type, t.payload, now() + $7, $7, \
             CASE WHEN e.disabled_at IS NULL THEN now() ELSE '9999-01-01T00:00:00Z' END \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bytea[]) \
             AS t(id, endpoint_id, source, kind, event_type, payload) \
         JOIN webhook_endpoints e ON e.id = t.endpoint_id \
         ON CONFLICT (endpoint_id, source) DO NOTHING",
    )
    .bind(&ids)
    .bind(&targets)
    .bind(&sources)
    .bind(&kinds)
    .bind(&types)
    .bind(&payloads)
    .bind(give_up_after)
    .execute(db)
    .await
    .context("Failed to store webhook calls")?
    .rows_affected();
    Ok(made as usize)
}
