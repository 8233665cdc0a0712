//! The batch consumer every Herald consumer group uses (ingest, projector, DLQ): take a
//! batch (bounded by count and time), hand it to a handler, store the offsets only once
//! the handler has committed its effects, repeat until shutdown.
//!
//! A handler error is never the message's fault (handlers dead-letter poison themselves):
//! the same batch is retried with backoff and no offset moves, so nothing is lost or
//! skipped. Offsets stored are committed after each batch (asynchronously), when
//! partitions are revoked and at shutdown, by Herald only (no librdkafka auto-commit).
//! Consumer lag comes from librdkafka's statistics as `herald_consumer_lag_messages{group,
//! topic}`.
//!
//! When every broker connection is lost, the consumer leaves its partitions at once and
//! joins its group again: once the brokers are back, it resumes from the offsets the group
//! committed. A broker that lost its data (topics recreated, offsets starting again at 0,
//! no group state) would otherwise be fetched from at the old positions, and every record
//! below them in the new topics skipped without a word; a broker that kept its data gives
//! the committed offsets back, and the few records read again are absorbed by the
//! handlers' idempotency.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use rdkafka::{
    ClientContext, Message, Statistics,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    types::RDKafkaErrorCode,
};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;

/// A message as read from Kafka, detached from the consumer.
#[derive(Debug, Clone)]
pub struct IncomingMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Headers as UTF-8 strings (lossy).
    pub headers: Vec<(String, String)>,
}

/// How one consumer batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_messages: usize,
    pub max_wait: Duration,
}

/// What a consumer is.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Full group id, prefix included.
    pub group: String,
    /// Full topic names, prefix included.
    pub topics: Vec<String>,
    pub limits: BatchLimits,
}

struct GroupContext {
    group: String,
    /// Set when librdkafka reports every broker down; cleared by the next assignment.
    brokers_down: AtomicBool,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            let lag: i64 = stats
                .partitions
                .values()
                .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
                .map(|p| p.consumer_lag)
                .sum();
            metrics::gauge!("herald_consumer_lag_messages", "group" => self.group.clone(), "topic" => topic.clone())
                .set(lag as f64);
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // With no broker to answer, a synchronous commit would only block the poll.
            if !self.brokers_down.load(Ordering::Relaxed) {
                commit(consumer, "on revoke");
            }
            tracing::info!(group = %self.group, partitions = partitions.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            self.brokers_down.store(false, Ordering::Relaxed);
            tracing::info!(group = %self.group, partitions = partitions.count(), "partitions assigned");
        }
    }
}

fn commit<C: Consumer<GroupContext>>(consumer: &C, when: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(%error, when, "offset commit failed"),
    }
}

/// Consumes until `shutdown`, calling `handle` with each batch until it succeeds.
pub async fn run<F, Fut>(
    settings: &KafkaSettings,
    spec: ConsumerSpec,
    shutdown: CancellationToken,
    handle: F,
) -> anyhow::Result<()>
where
    F: Fn(Arc<Vec<IncomingMessage>>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let consumer: StreamConsumer<GroupContext> = crate::kafka::client_config(settings)
        .set("group.id", &spec.group)
        // Commits are Herald's own (after each batch, on revoke, at shutdown). librdkafka's
        // auto-commit would also commit on every revoke, and after a broker lost its data
        // that writes the old positions into the new group, past the new topics' records.
        .set("enable.auto.commit", "false")
        // Offsets are stored by hand, after the handler committed the batch's effects.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            settings.session_timeout_ms.to_string(),
        )
        .set("fetch.wait.max.ms", settings.fetch_wait_ms.to_string())
        .set("statistics.interval.ms", "10000")
        // A subscribed topic that does not exist (yet, or again after a broker lost its
        // data) is looked for at each metadata refresh: every 5 s rather than librdkafka's
        // 5 minutes, so a recreated topic is consumed at once.
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create_with_context(GroupContext {
            group: spec.group.clone(),
            brokers_down: AtomicBool::new(false),
        })
        .context("Failed to create a Kafka consumer")?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .with_context(|| format!("Failed to subscribe to {topics:?}"))?;
    tracing::info!(group = %spec.group, ?topics, "consumer started");

    let mut backoff = Backoff::new();
    let mut rejoined = false;
    'batches: loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => break,
            batch = next_batch(&consumer, spec.limits) => batch,
        };
        let brokers_down = consumer.context().brokers_down.load(Ordering::Relaxed);
        if brokers_down && !rejoined {
            rejoin(&consumer, &topics)?;
            tracing::warn!(
                group = %spec.group,
                "every broker is down; partitions dropped, the group is joined again from its committed offsets"
            );
        }
        rejoined = brokers_down;
        if batch.is_empty() {
            continue;
        }
        let batch = Arc::new(batch);
        loop {
            match handle(batch.clone()).await {
                Ok(()) => {
                    backoff.reset();
                    break;
                }
                Err(error) => {
                    let wait = backoff.next();
                    metrics::counter!("herald_consumer_stalls_total", "group" => spec.group.clone())
                        .increment(1);
                    tracing::warn!(
                        group = %spec.group,
                        error = format!("{error:#}"),
                        retry_in = ?wait,
                        "cannot process a batch; consumer paused"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => break 'batches,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        for message in batch.iter() {
            if let Err(error) =
                consumer.store_offset(&message.topic, message.partition, message.offset)
            {
                // The partition was revoked meanwhile: its next owner reads the message
                // again and the handler's idempotency absorbs the repeat.
                tracing::debug!(%error, partition = message.partition, "offset not stored");
            }
        }
        // Committed at once: a restart then re-reads little, and "stored" means
        // "committed" within a round trip. An asynchronous commit that failed is covered
        // by the next batch's, which commits every stored offset.
        if let Err(error) = consumer.commit_consumer_state(CommitMode::Async) {
            tracing::debug!(%error, "asynchronous offset commit not sent");
        }
    }
    // Closing blocks: a synchronous commit, then leaving the group, whose revoke callback
    // commits synchronously again. On a loaded broker that takes seconds, and on the
    // runtime's own threads it would stall every task still finishing its work (sends
    // whose rate-limit check then times out, records waiting for a connection).
    let closed = tokio::task::spawn_blocking(move || {
        commit(&consumer, "at shutdown");
        drop(consumer);
    })
    .await;
    if let Err(error) = closed {
        tracing::warn!(group = %spec.group, %error, "consumer did not close cleanly");
    }
    tracing::info!(group = %spec.group, "consumer stopped");
    Ok(())
}

/// Drops the assignment and subscribes again (module docs).
fn rejoin(consumer: &StreamConsumer<GroupContext>, topics: &[&str]) -> anyhow::Result<()> {
    consumer.unsubscribe();
    consumer
        .subscribe(topics)
        .with_context(|| format!("Failed to subscribe to {topics:?} again"))
}

/// Notes an error of the consumer's stream; every broker down calls for a rejoin.
fn note_error(consumer: &StreamConsumer<GroupContext>, error: &KafkaError) {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
        consumer
            .context()
            .brokers_down
            .store(true, Ordering::Relaxed);
    }
    tracing::warn!(%error, "Kafka consumer error");
}

/// Waits for one message, then takes what else arrives within `max_wait`, up to
/// `max_messages`.
async fn next_batch(
    consumer: &StreamConsumer<GroupContext>,
    limits: BatchLimits,
) -> Vec<IncomingMessage> {
    let mut batch = Vec::new();
    match consumer.recv().await {
        Ok(message) => batch.push(detach(&message)),
        Err(error) => {
            note_error(consumer, &error);
            tokio::time::sleep(Duration::from_millis(500)).await;
            return batch;
        }
    }
    let deadline = tokio::time::Instant::now() + limits.max_wait;
    while batch.len() < limits.max_messages {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(detach(&message)),
            Ok(Err(error)) => {
                note_error(consumer, &error);
                break;
            }
            Err(_) => break,
        }
    }
    batch
}

/// Copies a message out of the consumer's buffers.
pub fn detach(message: &impl Message) -> IncomingMessage {
    use rdkafka::message::Headers;
    IncomingMessage {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers: message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Exponential backoff from 100 ms to 30 s.
struct Backoff {
    current: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Backoff {
            current: Self::FIRST,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self.current;
        self.current = (self.current * 2).min(Self::MAX);
        wait
    }

    fn reset(&mut self) {
        self.current = Self::FIRST;
    }
}
