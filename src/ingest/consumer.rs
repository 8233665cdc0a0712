//! The consumer loop of one domain: take a batch (bounded by count and time), hand it to
//! the [`Ingestor`], store the offsets once it is committed, repeat until shutdown.

use std::time::Duration;

use anyhow::Context;
use rdkafka::{
    ClientContext, Message,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
};
use tokio_util::sync::CancellationToken;

use super::{IncomingMessage, Ingestor};
use crate::{config::Settings, domain::Domain, kafka};

/// How one consumer batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_messages: usize,
    pub max_wait: Duration,
}

/// Commits the stored offsets of partitions being taken away, so their next owner starts
/// right after what this instance finished.
struct IngestContext;

impl ClientContext for IngestContext {}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(())
                | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
                Err(error) => tracing::warn!(%error, "committing offsets on revoke failed"),
            }
            tracing::info!(partitions = partitions.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            tracing::info!(partitions = partitions.count(), "partitions assigned");
        }
    }
}

/// Consumes one domain's topic until `shutdown`, then commits what it stored.
pub async fn run(
    ingestor: Ingestor,
    settings: &Settings,
    domain: Domain,
    limits: BatchLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let prefix = &settings.kafka.topic_prefix;
    let topic = format!(
        "{prefix}{}",
        domain
            .source_topic()
            .context("the API domain has no topic")?
    );
    let group = format!("{prefix}{}", domain.consumer_group());
    let consumer: StreamConsumer<IngestContext> = kafka::client_config(&settings.kafka)
        .set("group.id", &group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // Offsets are stored by hand, after the transaction that holds their effects.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            settings.kafka.session_timeout_ms.to_string(),
        )
        .create_with_context(IngestContext)
        .context("Failed to create the Kafka consumer")?;
    consumer
        .subscribe(&[&topic])
        .with_context(|| format!("Failed to subscribe to {topic}"))?;
    tracing::info!(%topic, %group, "consumer started");

    let mut backoff = Backoff::new();
    'batches: loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => break,
            batch = next_batch(&consumer, limits) => batch,
        };
        if batch.is_empty() {
            continue;
        }
        // The same batch is retried until it is stored: an outage of PostgreSQL must not
        // skip or dead-letter anything. No offset moves meanwhile.
        loop {
            match ingestor.process(domain, &group, &batch).await {
                Ok(outcome) => {
                    backoff.reset();
                    tracing::debug!(?outcome, messages = batch.len(), "batch stored");
                    break;
                }
                Err(error) => {
                    let wait = backoff.next();
                    metrics::counter!("herald_ingest_stalls_total", "domain" => domain.as_str())
                        .increment(1);
                    tracing::warn!(
                        %domain,
                        error = format!("{error:#}"),
                        retry_in = ?wait,
                        "cannot store a batch; consumer paused"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => break 'batches,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        for message in &batch {
            if let Err(error) =
                consumer.store_offset(&message.topic, message.partition, message.offset)
            {
                // The partition was revoked meanwhile: its next owner re-reads the message
                // and the idempotency table absorbs the repeat.
                tracing::debug!(%error, partition = message.partition, "offset not stored");
            }
        }
    }

    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(%error, "final offset commit failed"),
    }
    tracing::info!(%topic, "consumer stopped");
    Ok(())
}

/// Waits for one message, then takes what else arrives within `max_wait`, up to
/// `max_messages`.
async fn next_batch(
    consumer: &StreamConsumer<IngestContext>,
    limits: BatchLimits,
) -> Vec<IncomingMessage> {
    let mut batch = Vec::new();
    let first = match consumer.recv().await {
        Ok(message) => message,
        Err(error) => {
            tracing::warn!(%error, "Kafka consumer error");
            tokio::time::sleep(Duration::from_millis(500)).await;
            return batch;
        }
    };
    batch.push(detach(&first));
    drop(first);
    let deadline = tokio::time::Instant::now() + limits.max_wait;
    while batch.len() < limits.max_messages {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(detach(&message)),
            Ok(Err(error)) => {
                tracing::warn!(%error, "Kafka consumer error");
                break;
            }
            Err(_) => break,
        }
    }
    batch
}

fn detach(message: &impl Message) -> IncomingMessage {
    IncomingMessage {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
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
