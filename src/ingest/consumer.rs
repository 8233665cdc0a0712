//! The consumer of one upstream domain: the shared batch consumer with the [`Ingestor`]
//! as its handler.

use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    config::Settings,
    domain::Domain,
    ingest::{BatchOutcome, Ingestor},
    kafka::{
        consumer::{self, BatchLimits, ConsumerSpec, IncomingMessage},
        watchdog::Watchdogs,
    },
};

/// How many transactions ingest keeps going at once for one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallelism {
    /// Transactions a batch is split into, by message key.
    pub lanes: usize,
    /// Batches in flight ([`ConsumerSpec::in_flight`]).
    pub in_flight: usize,
}

impl Parallelism {
    /// What an instance's roles call for. One that only ingests splits each batch into two
    /// lanes and keeps two batches in flight, so that PostgreSQL stores on both cores while
    /// Herald prepares the next batch (about 1.4 times the events per second of one
    /// transaction at a time, BENCHMARKS.md). One that also dispatches stores one
    /// transaction at a time: working off a backlog, a faster ingest there only moves the
    /// backlog from Kafka into PostgreSQL ahead of the sends that share its cores, each
    /// delivery's creation then reaches the projector apart from its outcome, and its
    /// `notification_log` row is written twice (measured: 10.0 to 10.1 row versions per
    /// event end to end against 9.4, at the same end-to-end rate).
    pub fn for_roles(dispatches: bool) -> Self {
        if dispatches {
            Parallelism {
                lanes: 1,
                in_flight: 1,
            }
        } else {
            Parallelism {
                lanes: 2,
                in_flight: 2,
            }
        }
    }
}

/// Consumes one domain's topic until `shutdown`. A batch takes up to `per_lane` messages
/// times `parallelism`'s lanes, split by key (so a lane's share varies around `per_lane`).
pub async fn run(
    ingestor: Ingestor,
    settings: &Settings,
    domain: Domain,
    per_lane: BatchLimits,
    parallelism: Parallelism,
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
        limits: BatchLimits {
            max_messages: per_lane.max_messages * parallelism.lanes.max(1),
            ..per_lane
        },
        fetch_wait_ms: settings.kafka.fetch_wait_ms,
        // The next batch is gathered, prepared and sent while the last one's statements
        // wait for their WAL flush: the lanes' workers keep each key's events in order.
        in_flight: parallelism.in_flight,
    };
    let workers: Vec<mpsc::UnboundedSender<Part>> = (0..parallelism.lanes.max(1))
        .map(|_| lane_worker(ingestor.clone(), domain, group.clone(), shutdown.clone()))
        .collect();
    let wakeup = ingestor.wakeup.clone();
    consumer::run(&settings.kafka, spec, watchdogs, shutdown, |batch| {
        let (workers, wakeup) = (&workers, &wakeup);
        async move {
            // Only on an instance that dispatches, which keeps one batch in flight: a
            // wait here never lets a later batch hand its parts over first.
            if wakeup.sends_behind_within(BEHIND_WINDOW) {
                tokio::time::sleep(YIELD_TO_SENDS).await;
            }
            // Sent without waiting, so a batch hands every lane its part before the next
            // batch (whose handler is first polled after this one's) can hand over any.
            let mut replies = Vec::new();
            for (lane, messages) in lanes(&batch, workers.len()).into_iter().enumerate() {
                if messages.is_empty() {
                    continue;
                }
                let (done, reply) = oneshot::channel();
                if workers[lane].send(Part { messages, done }).is_err() {
                    panic!("ingest lane {lane} stopped: its worker panicked");
                }
                replies.push((lane, reply));
            }
            let mut failed = None;
            for (lane, reply) in replies {
                match reply.await {
                    Ok(Ok(outcome)) => tracing::debug!(?outcome, "lane stored"),
                    Ok(Err(error)) => failed = Some(error),
                    Err(_) => panic!("ingest lane {lane} stopped: its worker panicked"),
                }
            }
            failed.map_or(Ok(()), Err)
        }
    })
    .await
}

/// How recently this instance's dispatch loops must have been behind for a batch to
/// yield to them.
const BEHIND_WINDOW: Duration = Duration::from_millis(100);

/// How long a batch waits, on an instance whose own dispatch loops are behind, before it
/// is stored. Working off a backlog, ingest there would otherwise move it from Kafka into
/// PostgreSQL faster than the sends that share its cores take it out: they get less CPU,
/// each delivery's creation reaches the projector seconds before its outcome, so its
/// `notification_log` row is written twice, and a notification sent through the HTTP
/// intake meanwhile queues behind the whole backlog. The pause keeps ingest just ahead of
/// the sends instead (measured on a 100,000-event backlog: 9.2 row versions per event
/// instead of 10.0-10.1 at the same end-to-end rate; longer pauses cut them to 8.2-8.3
/// but left the sends waiting for ingest, BENCHMARKS.md, "Ingest in lanes by key"). Since
/// the sends got cheaper, 3 ms beats 5: about 6 % more events per second end to end for
/// 0.1 more row versions per event; 1 or 2 ms write 0.4 to 0.9 more and gain nothing
/// over 3, and 8 ms loses 5 % (BENCHMARKS.md, "A shorter yield to the sends"). It adds at
/// most this to a batch's latency, only while the sends are behind; an instance that does
/// not dispatch never waits.
const YIELD_TO_SENDS: Duration = Duration::from_millis(3);

/// One lane's share of a batch, and where its outcome goes.
struct Part {
    messages: Vec<IncomingMessage>,
    done: oneshot::Sender<anyhow::Result<BatchOutcome>>,
}

/// Starts the task that stores one lane's parts, one after another in the order they were
/// sent: each in its own transaction, at the same time as the other lanes', so PostgreSQL
/// works on them on its own cores while Herald prepares the next. A part that cannot be
/// stored (PostgreSQL unreachable) is retried here, with backoff, before the next part is
/// taken: a key stays in one lane, so a user's events are stored in order even while two
/// batches overlap and one of them fails. Its batch's handler waits meanwhile, so no
/// offset moves, and the consumer pauses its partitions and keeps its membership as for
/// any handler waiting on a dependency. A part is given up only when shutdown begins (its
/// batch is then read again). The queue holds at most a part per batch in flight. The task
/// ends when the returned sender is dropped.
fn lane_worker(
    ingestor: Ingestor,
    domain: Domain,
    group: String,
    shutdown: CancellationToken,
) -> mpsc::UnboundedSender<Part> {
    let (parts, mut received) = mpsc::unbounded_channel::<Part>();
    let work = async move {
        while let Some(part) = received.recv().await {
            let outcome = consumer::retry_until_done(&group, &shutdown, || {
                ingestor.process(domain, &group, &part.messages)
            })
            .await
            .context("Shut down before an ingest lane was stored");
            // The handler waiting for it may be gone (shutdown): nothing else to do.
            let _ = part.done.send(outcome);
        }
    };
    tokio::spawn(work.in_current_span());
    parts
}

/// Splits a batch into `count` lanes by message key (some may be empty).
///
/// By key rather than by partition: in a backlog, librdkafka hands out a partition's
/// fetched records in a run, so a batch of 100 nearly always holds one partition, and
/// lanes by partition left one transaction a batch and a core idle (measured: 1,005 lanes
/// of 100 events for 100,000 events). A key stays in one lane, in offset order, which is
/// the order Kafka promises: per key (the user id, DESIGN §2). Messages without a key
/// keep their partition's order by going to the lane of their partition.
fn lanes(batch: &[IncomingMessage], count: usize) -> Vec<Vec<IncomingMessage>> {
    let mut lanes: Vec<Vec<IncomingMessage>> = vec![Vec::new(); count];
    for message in batch {
        lanes[lane_of(message, count)].push(message.clone());
    }
    lanes
}

fn lane_of(message: &IncomingMessage, count: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    match &message.key {
        Some(key) => key.hash(&mut hasher),
        None => message.partition.hash(&mut hasher),
    }
    (hasher.finish() % count as u64) as usize
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
            timestamp: None,
        }
    }

    /// Asserts that the messages `picked` are all in one lane, in offset order.
    fn in_one_lane_in_order(
        lanes: &[Vec<IncomingMessage>],
        picked: impl Fn(&IncomingMessage) -> bool,
    ) {
        let holding: Vec<&Vec<IncomingMessage>> = lanes
            .iter()
            .filter(|lane| lane.iter().any(&picked))
            .collect();
        assert_eq!(holding.len(), 1, "the messages are in one lane");
        let offsets: Vec<i64> = holding[0]
            .iter()
            .filter(|m| picked(m))
            .map(|m| m.offset)
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    }

    #[test]
    fn a_key_stays_in_one_lane_in_order() {
        let batch: Vec<IncomingMessage> = (0..60)
            .map(|i| message(0, i64::from(i), Some(&(i % 7).to_string())))
            .collect();
        let lanes = lanes(&batch, 2);
        assert!(
            lanes.iter().all(|lane| !lane.is_empty()),
            "one partition's keys spread over both lanes"
        );
        for key in 0..7 {
            let key = key.to_string().into_bytes();
            in_one_lane_in_order(&lanes, |m| m.key.as_ref() == Some(&key));
        }
        assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 60);
    }

    #[test]
    fn messages_without_a_key_stay_with_their_partition_in_order() {
        let batch: Vec<IncomingMessage> = (0..12)
            .map(|i| message(i % 3, i64::from(i), None))
            .collect();
        let lanes = lanes(&batch, 2);
        for partition in 0..3 {
            in_one_lane_in_order(&lanes, |m| m.partition == partition);
        }
        assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 12);
    }

    #[test]
    fn one_lane_holds_the_whole_batch_in_order() {
        let batch: Vec<IncomingMessage> = (0..12)
            .map(|i| message(i % 3, i64::from(i), Some(&(i % 5).to_string())))
            .collect();
        let lanes = lanes(&batch, 1);
        assert_eq!(lanes.len(), 1);
        let offsets: Vec<i64> = lanes[0].iter().map(|m| m.offset).collect();
        assert_eq!(offsets, (0..12).collect::<Vec<i64>>());
    }

    #[test]
    fn only_an_instance_that_does_not_dispatch_ingests_in_parallel() {
        assert_eq!(
            Parallelism::for_roles(true),
            Parallelism {
                lanes: 1,
                in_flight: 1
            }
        );
        let alone = Parallelism::for_roles(false);
        assert!(alone.lanes > 1 && alone.in_flight > 1, "{alone:?}");
    }
}
