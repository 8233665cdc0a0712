//! The outbox relay: publishes outbox rows to Kafka in id order and marks them published,
//! at least once. A crash between producing and marking re-publishes the batch; readers
//! dedupe (delivery events carry a version, dead letters a delivery id or position).
//!
//! Several relays can run: each batch is locked with `FOR UPDATE SKIP LOCKED`.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{config::KafkaSettings, kafka};

/// Rows one relay transaction publishes: large, because a batch costs a fixed number of
/// statements, a commit and one linger of the producer, whatever its size.
const BATCH: i64 = 5000;
/// How often the outbox lag gauge is refreshed.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Published rows are deleted after this long.
const RETENTION_HOURS: i64 = 24;

/// Publishes outbox rows.
pub struct Relay {
    db: PgPool,
    producer: FutureProducer,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    topic: String,
    message_key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: sqlx::types::Json<BTreeMap<String, String>>,
}

impl Relay {
    /// An idempotent producer (acks=all, no duplicates from its own retries).
    pub fn new(db: PgPool, settings: &KafkaSettings) -> anyhow::Result<Self> {
        let producer = kafka::client_config(settings)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()
            .context("Failed to create the Kafka producer")?;
        Ok(Relay { db, producer })
    }

    /// Publishes one batch; returns how many rows were published.
    pub async fn publish_batch(&self) -> anyhow::Result<usize> {
        let mut tx = self.db.begin().await.context("Failed to begin")?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, topic, message_key, payload, headers FROM outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await
        .context("Failed to read the outbox")?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Enqueue everything first (send_result returns at once), then await the acks in
        // order: the batch costs one round trip, not one per row.
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut headers = OwnedHeaders::new_with_capacity(row.headers.len());
            for (name, value) in row.headers.iter() {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(&row.topic)
                .payload(&row.payload)
                .headers(headers);
            if let Some(key) = &row.message_key {
                record = record.key(key);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push((row.id, delivery)),
                Err((error, _)) => {
                    tracing::debug!(%error, "producer queue full; publishing the rest later");
                    break;
                }
            }
        }
        let mut published = Vec::with_capacity(pending.len());
        for (id, delivery) in pending {
            match delivery.await {
                Ok(Ok(_)) => published.push(id),
                // Every acknowledged row is marked, so one row that keeps failing (say, a
                // topic that does not exist) neither stalls nor re-publishes the others.
                // Readers order by the events' versions, not by arrival.
                Ok(Err((error, _))) => {
                    metrics::counter!("herald_outbox_publish_errors_total").increment(1);
                    tracing::warn!(%error, "cannot publish an outbox row; will retry");
                }
                Err(_) => {}
            }
        }
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&published)
            .execute(&mut *tx)
            .await
            .context("Failed to mark outbox rows published")?;
        tx.commit()
            .await
            .context("Failed to commit the relay batch")?;
        metrics::counter!("herald_outbox_published_total").increment(published.len() as u64);
        Ok(published.len())
    }

    /// Relays until `shutdown`: at once while there is a backlog, otherwise every 50 ms.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_prune = std::time::Instant::now();
        let mut last_lag = std::time::Instant::now() - LAG_EVERY;
        while !shutdown.is_cancelled() {
            let wait = match self.publish_batch().await {
                Ok(n) if n as i64 == BATCH => Duration::ZERO,
                Ok(_) => Duration::from_millis(50),
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "outbox relay failed; retrying"
                    );
                    Duration::from_secs(1)
                }
            };
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = std::time::Instant::now();
                self.export_lag().await;
            }
            if last_prune.elapsed() > Duration::from_secs(600) {
                last_prune = std::time::Instant::now();
                self.prune().await;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }

    async fn export_lag(&self) {
        // The oldest unpublished row by id, found through the partial index; min(created_at)
        // would read the whole backlog on every call.
        let oldest: Result<Option<DateTime<Utc>>, _> = sqlx::query_scalar(
            "SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1",
        )
        .fetch_optional(&self.db)
        .await;
        if let Ok(oldest) = oldest {
            let lag = oldest.map_or(0.0, |at| {
                (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
            });
            metrics::gauge!("herald_outbox_lag_seconds").set(lag);
        }
    }

    async fn prune(&self) {
        let pruned =
            sqlx::query("DELETE FROM outbox WHERE published_at < now() - $1 * interval '1 hour'")
                .bind(RETENTION_HOURS)
                .execute(&self.db)
                .await;
        if let Err(error) = pruned {
            tracing::warn!(%error, "cannot prune the outbox");
        }
    }
}
