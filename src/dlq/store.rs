//! Storing dead letters as they arrive from the DLQ topics.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{domain::Domain, kafka::consumer::IncomingMessage};

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

/// Stores a batch; a record already stored (the same delivery, or for a poison message the
/// same original position, or the same DLQ position) is ignored. Returns how many were new.
pub async fn store(
    db: &PgPool,
    topic_prefix: &str,
    messages: &[IncomingMessage],
) -> anyhow::Result<u64> {
    let mut tx = db.begin().await.context("Failed to begin")?;
    let mut stored = 0;
    for message in messages {
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
        let domain = message
            .topic
            .strip_prefix(topic_prefix)
            .and_then(|t| t.strip_prefix("notification.dlq."))
            .unwrap_or("unknown")
            .to_owned();
        let uuid = |name: &str| text(name).and_then(|v| v.parse::<Uuid>().ok());
        let failed_at = text("X-Failed-At").and_then(|v| v.parse::<DateTime<Utc>>().ok());
        let header_json = serde_json::to_value(&headers)?;
        let delivery_id = uuid("X-Delivery-Id");
        // A delivery that fails again after an operator's retry is a new dead letter on the
        // same row: it becomes PENDING again with the new failure. A copy published twice by
        // the relay (failed before the retry) changes nothing.
        let on_conflict = if delivery_id.is_some() {
            "ON CONFLICT (delivery_id) WHERE delivery_id IS NOT NULL DO UPDATE SET \
                 status = 'PENDING', retry_outcome = NULL, actioned_by = NULL, actioned_at = NULL, \
                 topic = EXCLUDED.topic, kafka_partition = EXCLUDED.kafka_partition, \
                 kafka_offset = EXCLUDED.kafka_offset, headers = EXCLUDED.headers, \
                 error_class = EXCLUDED.error_class, error_message = EXCLUDED.error_message, \
                 failed_at = EXCLUDED.failed_at, received_at = now() \
             WHERE dlq_messages.status = 'RETRIED' AND EXCLUDED.failed_at > dlq_messages.actioned_at"
        } else {
            "ON CONFLICT DO NOTHING"
        };
        let sql = format!(
            "INSERT INTO dlq_messages (id, domain, topic, kafka_partition, kafka_offset, \
                 message_key, payload, headers, error_class, error_message, failed_channel, \
                 event_id, notification_id, delivery_id, failed_at, original_topic, \
                 original_partition, original_offset) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
             {on_conflict}"
        );
        let inserted = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(Uuid::now_v7())
            .bind(&domain)
            .bind(&message.topic)
            .bind(message.partition)
            .bind(message.offset)
            .bind(&message.key)
            .bind(&message.payload)
            .bind(header_json)
            .bind(text("X-Error-Class"))
            .bind(text("X-Error-Message"))
            .bind(text("X-Failed-Channel"))
            .bind(text("X-Event-Id"))
            .bind(uuid("X-Notification-Id"))
            .bind(delivery_id)
            .bind(failed_at)
            .bind(text("X-Original-Topic"))
            .bind(text("X-Original-Partition").and_then(|v| v.parse::<i32>().ok()))
            .bind(text("X-Original-Offset").and_then(|v| v.parse::<i64>().ok()))
            .execute(&mut *tx)
            .await
            .context("Failed to store a dead letter")?;
        if inserted.rows_affected() > 0 {
            stored += 1;
            metrics::counter!("herald_dlq_received_total", "domain" => domain).increment(1);
        }
    }
    tx.commit().await.context("Failed to commit dead letters")?;
    Ok(stored)
}

/// Exports `herald_dlq_messages{domain, status}`.
pub async fn export_sizes(db: &PgPool) {
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
}
