//! The ceilings Herald's figures are compared with, measured on the same stack in the same
//! run: how fast a bare rdkafka consumer reads the topic, and how fast PostgreSQL takes the
//! same rows in the same batches with nothing else around them.

use std::time::{Duration, Instant};

use chrono::Utc;
use herald::{
    config::KafkaSettings,
    domain::{Domain, EventType, Recipient, UserId},
    intake::{self, Draft, KafkaOrigin, Source},
    routing::RoutingTable,
};
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
};
use sqlx::PgPool;
use uuid::Uuid;

use super::load;

/// Reads `topic` from the beginning with no processing (the client configuration Herald's
/// consumers start from, assigned rather than joined so no group join is timed); returns
/// messages/s from the first message to the last.
pub async fn bare_consumer(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
    expected: usize,
) -> anyhow::Result<f64> {
    let consumer: StreamConsumer = herald::kafka::client_config(settings)
        .set("group.id", format!("bench-bare-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut bytes = 0usize;
    let first = consumer.recv().await?;
    bytes += first.payload_len();
    drop(first);
    let started = Instant::now();
    for _ in 1..expected {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        bytes += message.payload_len();
    }
    std::hint::black_box(bytes);
    Ok(expected as f64 / started.elapsed().as_secs_f64())
}

/// Inserts the rows `count` events become (a notification and its deliveries each) with
/// Herald's own statements, `batch` per transaction, one transaction after the other as
/// one consumer does, but without the outbox and the wake-up (the idempotency record is the
/// notifications' unique key, so it is part of these rows). Returns (events/s, rows/s);
/// building the rows is not timed.
pub async fn bare_insert(
    pool: &PgPool,
    routing: &RoutingTable,
    tag: &str,
    count: usize,
    batch: usize,
) -> anyhow::Result<(f64, f64)> {
    let event_type = EventType::parse("PAYMENT_COMPLETED").map_err(anyhow::Error::msg)?;
    let channels = routing
        .channels(Domain::Payment, &event_type)
        .unwrap_or_default()
        .to_vec();
    let enabled = |_| true;
    let notifications: Vec<_> = (0..count)
        .map(|i| {
            let (_, payload) = load::event(tag, i, event_type.as_str(), Utc::now());
            let event = herald::ingest::decode::decode(payload.as_bytes(), usize::MAX)
                .expect("the generator's events decode");
            let draft = Draft {
                source: Source::Kafka,
                domain: Domain::Payment,
                event_id: Some(event.event_id.as_str().to_owned()),
                event_type: event.event_type,
                user_id: Some(UserId::new(event.user_id.get()).expect("positive")),
                recipient: Recipient { ..event.recipient },
                data: event.data,
                subject: None,
                body: None,
                raw_event: Some(payload.into_bytes()),
                origin: Some(KafkaOrigin {
                    topic: "bare".into(),
                    partition: 0,
                    offset: i as i64,
                }),
                occurred_at: Some(event.occurred_at),
                scheduled_at: None,
                broadcast_id: None,
                replay: None,
            };
            intake::prepare(
                routing,
                draft,
                &channels,
                None,
                &Default::default(),
                &enabled,
            )
        })
        .collect();
    let rows: usize = notifications.iter().map(|n| 1 + n.deliveries.len()).sum();
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    for chunk in notifications.chunks(batch) {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        intake::insert_rows(&mut tx, chunk, &[]).await?;
        tx.commit().await?;
    }
    let took = started.elapsed().as_secs_f64();
    Ok((count as f64 / took, rows as f64 / took))
}
