//! The consumer of one upstream domain: the shared batch consumer with the [`Ingestor`]
//! as its handler.

use std::{collections::HashSet, sync::Mutex};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    domain::Domain,
    ingest::Ingestor,
    kafka::{
        consumer::{self, BatchLimits, ConsumerSpec, IncomingMessage},
        watchdog::Watchdogs,
    },
};

/// Consumes one domain's topic until `shutdown`.
pub async fn run(
    ingestor: Ingestor,
    settings: &Settings,
    domain: Domain,
    limits: BatchLimits,
    watchdogs: &Watchdogs,
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
        fetch_wait_ms: settings.kafka.fetch_wait_ms,
    };
    // Lanes of the current batch already committed (by their first message), so that a
    // retry of the batch after one lane failed stores only the others: their events would
    // be found processed, but their dead letters would be written twice.
    let committed: Mutex<HashSet<(i32, i64)>> = Mutex::new(HashSet::new());
    consumer::run(&settings.kafka, spec, watchdogs, shutdown, |batch| {
        let (ingestor, group, committed) = (&ingestor, &group, &committed);
        async move {
            // One transaction per lane, at the same time: PostgreSQL works on both on its
            // own cores. A partition stays in one lane, so its events are still stored in
            // order.
            let committed = || committed.lock().unwrap_or_else(|e| e.into_inner());
            let todo: Vec<((i32, i64), Vec<IncomingMessage>)> = lanes(&batch)
                .into_iter()
                .map(|lane| ((lane[0].partition, lane[0].offset), lane))
                .filter(|(first, _)| !committed().contains(first))
                .collect();
            let results = futures_util::future::join_all(
                todo.iter()
                    .map(|(_, lane)| ingestor.process(domain, group, lane)),
            )
            .await;
            let mut failed = None;
            for ((first, _), result) in todo.iter().zip(results) {
                match result {
                    Ok(outcome) => {
                        tracing::debug!(?outcome, "lane stored");
                        committed().insert(*first);
                    }
                    Err(error) => failed = Some(error),
                }
            }
            match failed {
                Some(error) => Err(error),
                None => {
                    committed().clear();
                    Ok(())
                }
            }
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
