//! Kafka plumbing shared by every role: client configuration, the topic catalogue of
//! `kafka/topics.toml`, topic creation, the reachability probe behind `/health/ready`, and
//! the batch consumer (`consumer`) with the watchdog of its group membership (`watchdog`),
//! and the records consumers set aside (`parked`).

pub mod consumer;
pub mod parked;
pub mod watchdog;

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::{KafkaError, RDKafkaErrorCode},
};
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::config::KafkaSettings;

/// The topic catalogue: every topic Herald uses, by its unprefixed name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicCatalogue {
    pub replication_factor: i32,
    #[serde(rename = "topic")]
    pub topics: Vec<TopicSpec>,
}

/// One topic of the catalogue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub purpose: String,
}

impl TopicCatalogue {
    /// Reads and checks the catalogue file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Failed to read the topic catalogue {}", path.display()))?;
        let catalogue: TopicCatalogue = toml::from_str(&text)
            .with_context(|| format!("Topic catalogue {} is not valid", path.display()))?;
        anyhow::ensure!(
            catalogue.replication_factor >= 1,
            "{}: replication_factor must be at least 1",
            path.display()
        );
        for topic in &catalogue.topics {
            anyhow::ensure!(
                topic.partitions >= 1,
                "{}: topic {} needs at least 1 partition",
                path.display(),
                topic.name
            );
        }
        Ok(catalogue)
    }
}

/// What `create_topics` did with one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicOutcome {
    Created,
    AlreadyExisted,
}

/// Base librdkafka configuration for every client Herald makes (consumers, producers,
/// admin): the brokers, then the operator's `librdkafka_options` (TLS, SASL, timeouts) and
/// secrets. What a client sets after this (group ids, commit mode, idempotence) wins, so an
/// option cannot change how Herald commits offsets.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    config_with(settings, &[])
}

/// [`client_config`] for a consumer: the same, with Herald's defaults for consumers under
/// the operator's options, which may change them.
pub fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    config_with(settings, CONSUMER_DEFAULTS)
}

/// librdkafka properties Herald's consumers take unless the operator's options say
/// otherwise.
///
/// `queued.max.messages.kbytes`: librdkafka prefetches up to 64 MiB per consumer by
/// default, and an instance runs six (three domains, the projector, the webhook fan-out,
/// the dead letters), so a backlog filled Herald's memory with records it would not reach
/// for seconds: 198 to 215 MiB at the peak of `make bench`'s 100,000-event backlog, 134
/// to 142 MiB ingesting alone. At 4 MiB, still many ingest batches (100 records each), those
/// runs peaked at 188 to 191 and 104 MiB with no loss of throughput; smaller fetches cost
/// throughput (BENCHMARKS.md, "Where a backlog's memory goes").
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[("queued.max.messages.kbytes", "4096")];

fn config_with(settings: &KafkaSettings, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", "herald")
        // Bounds how long a request to an unreachable broker can hang a caller.
        .set("socket.timeout.ms", "10000");
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for (key, value) in &settings.librdkafka_options {
        config.set(key, value);
    }
    // rdkafka's `Debug` of a ClientConfig leaves these keys out.
    for (key, value) in &settings.librdkafka_secrets {
        config.set(*key, value.expose_secret());
    }
    config
}

/// An admin connection to the cluster, cheap to clone.
#[derive(Clone)]
pub struct KafkaAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    topic_prefix: String,
}

impl KafkaAdmin {
    /// Creates the client. librdkafka connects lazily, so this succeeds while the brokers are
    /// down; only a malformed configuration fails here.
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        let client = client_config(settings)
            .create()
            .context("Failed to create the Kafka admin client")?;
        Ok(KafkaAdmin {
            client: Arc::new(client),
            topic_prefix: settings.topic_prefix.clone(),
        })
    }

    /// The full name of a catalogue topic, with the configured prefix.
    pub fn topic_name(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// Creates every topic of the catalogue that does not exist yet; returns the full names
    /// with what happened to each.
    pub async fn create_topics(
        &self,
        catalogue: &TopicCatalogue,
    ) -> anyhow::Result<Vec<(String, TopicOutcome)>> {
        let names: Vec<String> = catalogue
            .topics
            .iter()
            .map(|t| self.topic_name(&t.name))
            .collect();
        let new_topics: Vec<NewTopic<'_>> = catalogue
            .topics
            .iter()
            .zip(&names)
            .map(|(spec, name)| {
                NewTopic::new(
                    name,
                    spec.partitions,
                    TopicReplication::Fixed(catalogue.replication_factor),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .client
            .create_topics(&new_topics, &options)
            .await
            .context("Failed to create Kafka topics")?;
        results
            .into_iter()
            .map(|result| match result {
                Ok(name) => Ok((name, TopicOutcome::Created)),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    Ok((name, TopicOutcome::AlreadyExisted))
                }
                Err((name, code)) => Err(anyhow::anyhow!("Failed to create topic {name}: {code}")),
            })
            .collect()
    }

    /// Partition counts of the named topics as the cluster reports them (`None` if absent).
    pub async fn partition_counts(
        &self,
        names: Vec<String>,
        timeout: Duration,
    ) -> Result<Vec<(String, Option<usize>)>, KafkaError> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = client.inner().fetch_metadata(None, timeout)?;
            Ok(names
                .into_iter()
                .map(|name| {
                    let count = metadata
                        .topics()
                        .iter()
                        .find(|t| t.name() == name && t.error().is_none())
                        .map(|t| t.partitions().len());
                    (name, count)
                })
                .collect())
        })
        .await
        .expect("the metadata request does not panic")
    }

    /// Succeeds when a broker answers a metadata request within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.partition_counts(Vec::new(), timeout).await.map(drop)
    }
}
