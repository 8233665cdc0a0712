//! The consumer of one upstream domain: the shared batch consumer with the [`Ingestor`]
//! as its handler.

use std::{collections::HashSet, sync::Mutex};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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
            // One transaction per lane, at the same time, each in a task of its own: Herald
            // prepares the lanes on two threads while PostgreSQL stores them on its own
            // cores. A key stays in one lane, so a user's events are still stored in order.
            let committed = || committed.lock().unwrap_or_else(|e| e.into_inner());
            let tasks: Vec<((i32, i64), tokio::task::JoinHandle<_>)> = lanes(&batch)
                .into_iter()
                .map(|lane| ((lane[0].partition, lane[0].offset), lane))
                .filter(|(first, _)| !committed().contains(first))
                .map(|(first, lane)| {
                    let (ingestor, group) = (ingestor.clone(), group.clone());
                    let task = async move { ingestor.process(domain, &group, &lane).await };
                    (first, tokio::spawn(task.in_current_span()))
                })
                .collect();
            let mut failed = None;
            for (first, task) in tasks {
                match task.await {
                    Ok(Ok(outcome)) => {
                        tracing::debug!(?outcome, "lane stored");
                        committed().insert(first);
                    }
                    Ok(Err(error)) => failed = Some(error),
                    Err(panicked) => {
                        failed = Some(anyhow::anyhow!(panicked).context("An ingest lane panicked"))
                    }
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

/// Splits a batch into [`LANES`] by message key, leaving out empty lanes.
///
/// By key rather than by partition: in a backlog, librdkafka hands out a partition's
/// fetched records in a run, so a batch of 100 nearly always holds one partition, and
/// lanes by partition left one transaction a batch and a core idle (measured: 1,005 lanes
/// of 100 events for 100,000 events). A key stays in one lane, in offset order, which is
/// the order Kafka promises: per key (the user id, DESIGN §2). Messages without a key
/// keep their partition's order by going to the lane of their partition.
fn lanes(batch: &[IncomingMessage]) -> Vec<Vec<IncomingMessage>> {
    let mut lanes: Vec<Vec<IncomingMessage>> = vec![Vec::new(); LANES];
    for message in batch {
        lanes[lane_of(message)].push(message.clone());
    }
    lanes.retain(|lane| !lane.is_empty());
    lanes
}

fn lane_of(message: &IncomingMessage) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    match &message.key {
        Some(key) => key.hash(&mut hasher),
        None => message.partition.hash(&mut hasher),
    }
    (hasher.finish() % LANES as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(partition: i32, offset: i64, key: Option<&str>) -> IncomingMessage {
        IncomingMessage {
            topic: "t".into(),
            partition,
            offset,
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: Vec::new(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn a_key_stays_in_one_lane_in_order() {
        let batch: Vec<IncomingMessage> = (0..60)
            .map(|i| message(0, i64::from(i), Some(&(i % 7).to_string())))
            .collect();
        let lanes = lanes(&batch);
        assert_eq!(
            lanes.len(),
            2,
            "one partition's keys spread over both lanes"
        );
        for key in 0..7 {
            let key = key.to_string().into_bytes();
            let holding: Vec<&Vec<IncomingMessage>> = lanes
                .iter()
                .filter(|lane| lane.iter().any(|m| m.key.as_ref() == Some(&key)))
                .collect();
            assert_eq!(holding.len(), 1, "key {key:?} is in one lane");
            let offsets: Vec<i64> = holding[0]
                .iter()
                .filter(|m| m.key.as_ref() == Some(&key))
                .map(|m| m.offset)
                .collect();
            assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        }
        assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 60);
    }

    #[test]
    fn messages_without_a_key_stay_with_their_partition_in_order() {
        let batch: Vec<IncomingMessage> = (0..12)
            .map(|i| message(i % 3, i64::from(i), None))
            .collect();
        let lanes = lanes(&batch);
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
        assert_eq!(
            super::lanes(&[message(4, 0, None)]).len(),
            1,
            "no empty lane"
        );
    }
}
