//! The consumer of one upstream domain: the shared batch consumer with the [`Ingestor`]
//! as its handler.

use crate::{
    config::Settings,
    domain::Domain,
    ingest::Ingestor,
    kafka::consumer::{self, BatchLimits, ConsumerSpec, IncomingMessage},
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
            // One transaction per lane, at the same time: PostgreSQL works on both on its
            // own cores. A partition stays in one lane, so its events are still stored in
            // order. If one lane fails, the whole batch is retried; the lane that had
            // committed finds its events already processed.
            let lanes = lanes(&batch);
            let results = futures_util::future::join_all(
                lanes
                    .iter()
                    .map(|lane| ingestor.process(domain, group, lane)),
            )
            .await;
            for result in results {
                let outcome = result?;
                tracing::debug!(?outcome, "lane stored");
            }
            Ok(())
        }
    })
    .await
}

/// Transactions one batch is split into.
const LANES: usize = 2;

/// Splits a batch into [`LANES`] by partition, leaving out empty lanes.
fn lanes(batch: &[IncomingMessage]) -> Vec<Vec<IncomingMessage>> {
    let mut lanes: Vec<Vec<IncomingMessage>> = vec![Vec::new(); LANES];
    for message in batch {
        lanes[message.partition.unsigned_abs() as usize % LANES].push(message.clone());
    }
    lanes.retain(|lane| !lane.is_empty());
    lanes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(partition: i32, offset: i64) -> IncomingMessage {
        IncomingMessage {
            topic: "t".into(),
            partition,
            offset,
            key: None,
            payload: Vec::new(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn a_partition_stays_in_one_lane_in_order() {
        let batch: Vec<IncomingMessage> = (0..12).map(|i| message(i % 3, i64::from(i))).collect();
        let lanes = lanes(&batch);
        assert_eq!(lanes.len(), 2);
        for partition in 0..3 {
            let holding: Vec<&Vec<IncomingMessage>> = lanes
                .iter()
                .filter(|lane| lane.iter().any(|m| m.partition == partition))
                .collect();
            assert_eq!(holding.len(), 1, "partition {partition} is in one lane");
            let offsets: Vec<i64> = holding[0]
                .iter()
                .filter(|m| m.partition == partition)
                .map(|m| m.offset)
                .collect();
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        }
        assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 12);
        assert_eq!(super::lanes(&[message(4, 0)]).len(), 1, "no empty lane");
    }
}
