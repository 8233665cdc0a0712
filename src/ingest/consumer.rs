//! The consumer of one upstream domain: the shared batch consumer with the [`Ingestor`]
//! as its handler.

use crate::{
    config::Settings,
    domain::Domain,
    ingest::Ingestor,
    kafka::consumer::{self, BatchLimits, ConsumerSpec},
};
use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// Consumes one domain's topic until `shutdown`.
pub async fn run(
    ingestor: Ingestor,
    settings: &Settings,
    domain: Domain,
    limits: BatchLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let prefix = &settings.kafka.topic_prefix;
    let topic = domain
        .source_topic()
        .context("the API domain has no topic")?;
    let group = format!("{prefix}{}", domain.consumer_group());
    let spec = ConsumerSpec {
        group: group.clone(),
        topics: vec![format!("{prefix}{topic}")],
        limits,
    };
    consumer::run(&settings.kafka, spec, shutdown, |batch| {
        let (ingestor, group) = (&ingestor, &group);
        async move {
            let outcome = ingestor.process(domain, group, &batch).await?;
            tracing::debug!(?outcome, messages = batch.len(), "batch stored");
            Ok(())
        }
    })
    .await
}
