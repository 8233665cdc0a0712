//! The batch consumer every Herald consumer group uses (ingest, projector, DLQ): take a
//! batch (bounded by count and time), hand it to a handler, store the offsets only once
//! the handler has committed its effects, repeat until shutdown.
//!
//! A handler error is never the message's fault (handlers dead-letter poison themselves):
//! the same batch is retried with backoff and no offset moves, so nothing is lost or
//! skipped. Offsets stored are committed after each batch (asynchronously), when
//! partitions are revoked and at shutdown, by Herald only (no librdkafka auto-commit). A
//! batch still gathering when shutdown begins is dropped unhandled: none of its offsets
//! was stored, so the group reads it again.
//!
//! When every broker connection is lost, the consumer leaves its partitions at once and
//! joins its group again: once the brokers are back, it resumes from the offsets the group
//! committed. A broker that lost its data (topics recreated, offsets starting again at 0,
//! no group state) would otherwise be fetched from at the old positions, and every record
//! below them in the new topics skipped without a word; a broker that kept its data gives
//! the committed offsets back, and the few records read again are absorbed by the
//! handlers' idempotency.
//!
//! A batch is handed over with only the messages of partitions the member still holds: a
//! rebalance while the batch was gathering (the projector gathers for half a second) gives
//! a revoked partition to its next owner, which reads it again from the committed offset,
//! so handling its messages here as well would apply them after the group gave them away
//! (and their offsets could not be stored). Revocations take effect only while the
//! consumer polls, and it does not poll while a handler runs (until `keep_membership`
//! steps in for a handler waiting on a dependency), so what is handed over stays held
//! until its offsets are stored. A consumer that keeps more than one batch in flight
//! ([`ConsumerSpec::in_flight`], ingest on an instance that does not dispatch) polls while
//! the handler works: a partition revoked then still has its batch stored here, and its
//! next owner (this member again, after a rebalance that gives it back) reads from the
//! last committed offset, so the batch may be read and stored twice, which the handler's
//! idempotency absorbs (the notifications' unique key on topic and eventId).
//!
//! Group membership is watched ([`super::watchdog`]): every rebalance is recorded, and a
//! consumer left without an assignment beyond `HERALD_KAFKA_ASSIGNMENT_TIMEOUT_MS` is
//! closed and made again, as a new member of the same group. Nothing is lost or applied
//! twice by that: offsets are stored only after the handler committed, so the new member
//! starts from the last committed offset and the handlers' idempotency absorbs the repeat
//! of what was stored but not yet committed. While a batch waits on a dependency (a
//! PostgreSQL outage), the consumer pauses its partitions and keeps polling, so that the
//! outage does not also cost the group membership (`max.poll.interval.ms`).
//!
//! Metrics: `herald_consumer_lag_messages{group, topic}` and
//! `herald_consumer_partition_lag_messages{group, topic, partition}` from librdkafka's
//! statistics; `herald_consumer_assigned_partitions{group}`,
//! `herald_consumer_seconds_since_assignment{group}`,
//! `herald_consumer_rebalances_total{group, kind}` and
//! `herald_consumer_recreations_total{group}` from the watchdog.

use std::{
    collections::HashSet,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::{StreamExt, stream::FuturesOrdered};
use rdkafka::{
    ClientContext, Message, Statistics, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    types::RDKafkaErrorCode,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::watchdog::{ConsumerWatch, Watchdogs};
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
    /// The record's timestamp (its producer's clock, or the broker's), in milliseconds
    /// since the epoch, when it has one.
    pub timestamp: Option<i64>,
}

/// How one consumer batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_messages: usize,
    pub max_wait: Duration,
    /// Ends a batch before `max_wait` once waiting longer cannot serve its purpose.
    pub settled: Option<Settled>,
}

/// For a consumer that lingers so that the messages about one thing (a delivery's creation
/// and its outcome) meet in one batch: once no message in the batch leaves its thing open,
/// lingering on would gather only messages about other things, so the batch ends as soon
/// as the topic has been quiet for `quiet`.
///
/// Messages are classified only when the topic falls quiet, each at most once. Against a
/// broker that holds every fetch for its whole wait (Tansu) the topic falls quiet between
/// fetches even under load, so nearly every message is classified: for the projector about
/// half a microsecond each (BENCHMARKS.md, "A projector batch with nothing left to wait
/// for").
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    /// How long the topic must stay quiet before the batch is looked at.
    pub quiet: Duration,
    /// The thing a message is about and whether it is still open after that message
    /// (later messages about it are to come); `None` for a message that leaves nothing
    /// open (or that cannot be read).
    pub classify: fn(&IncomingMessage) -> Option<(Uuid, bool)>,
}

/// The things a gathering batch leaves open, by the latest message about each, over its
/// first `seen` messages.
struct OpenThings {
    spec: Settled,
    open: HashSet<Uuid>,
    seen: usize,
}

impl OpenThings {
    /// Whether nothing in `batch` is open, classifying the messages not seen yet.
    fn settled(&mut self, batch: &[IncomingMessage]) -> bool {
        for message in &batch[self.seen..] {
            match (self.spec.classify)(message) {
                Some((id, true)) => {
                    self.open.insert(id);
                }
                Some((id, false)) => {
                    self.open.remove(&id);
                }
                None => {}
            }
        }
        self.seen = batch.len();
        self.open.is_empty()
    }
}

/// What a consumer is.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Full group id, prefix included.
    pub group: String,
    /// Full topic names, prefix included.
    pub topics: Vec<String>,
    pub limits: BatchLimits,
    /// librdkafka's `fetch.wait.max.ms` for this consumer: `KafkaSettings::fetch_wait_ms`
    /// for ingest, whose events someone waits on, `internal_fetch_wait_ms` for the
    /// consumers of Herald's own topics.
    pub fetch_wait_ms: u32,
    /// Batches handed to the handler before the oldest of them is stored (at least 1).
    /// Above 1 the consumer gathers the next batch while the handler still works on the
    /// last, so the two overlap; offsets are still stored in order, each batch's once it
    /// and every batch before it are stored. Only for a handler whose effects are
    /// idempotent and that keeps its own order among overlapping batches: a rebalance can
    /// then take a partition away while its batch is still in the handler's hands (module
    /// docs), and its next owner reads that batch again.
    pub in_flight: usize,
}

/// How often an idle consumer looks at its watchdog.
const TICK: Duration = Duration::from_secs(1);

/// How long closing a consumer that is being recreated may take before the new one is
/// made anyway (the old one finishes closing on its own thread): a broker that left the
/// member without partitions may not answer its leave request either.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

struct GroupContext {
    group: String,
    watch: Arc<ConsumerWatch>,
    /// Fetch requests the brokers had been sent at the last statistics. librdkafka keeps
    /// one fetch in flight per broker, so the count only moves while fetches come back.
    fetches: AtomicI64,
    /// Set when librdkafka reports every broker down; cleared by the next assignment.
    brokers_down: AtomicBool,
    /// The partitions this member holds, kept from the rebalance callbacks themselves.
    /// Asking librdkafka (`assignment()`) from inside a callback blocks on the group's
    /// queue, which nobody serves while the consumer is being closed: dropping a consumer
    /// whose close revoked its partitions then hung for good.
    held: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl GroupContext {
    fn held(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            let mut lag_sum = 0;
            for partition in stats.partitions.values().filter(|p| p.partition >= 0) {
                // A partition this member does not hold is another member's to report.
                let lag = if partition.desired && partition.consumer_lag >= 0 {
                    partition.consumer_lag
                } else {
                    0
                };
                lag_sum += lag;
                metrics::gauge!(
                    "herald_consumer_partition_lag_messages",
                    "group" => self.group.clone(),
                    "topic" => topic.clone(),
                    "partition" => partition.partition.to_string()
                )
                .set(lag as f64);
            }
            metrics::gauge!("herald_consumer_lag_messages", "group" => self.group.clone(), "topic" => topic.clone())
                .set(lag_sum as f64);
        }
        let fetches: i64 = statistics
            .brokers
            .values()
            .filter(|broker| broker.state == "UP")
            .filter_map(|broker| broker.req.get("Fetch"))
            .sum();
        if fetches > self.fetches.swap(fetches, Ordering::Relaxed) {
            self.watch.fetched();
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let lost = consumer.assignment_lost();
            if lost {
                // The group already gave these partitions away: a commit would be refused
                // (and waits for a broker that may be the reason). What was stored and not
                // committed is read again by the next owner; the handlers are idempotent.
                tracing::warn!(group = %self.group, partitions = partitions.count(), "assignment lost");
            } else {
                // With no broker to answer, a synchronous commit would only block the poll.
                if !self.brokers_down.load(Ordering::Relaxed) {
                    commit(consumer, "on revoke");
                }
                tracing::info!(group = %self.group, partitions = partitions.count(), "partitions revoked");
            }
            self.watch.revoked(lost, Instant::now());
            let kind = if lost { "lost" } else { "revoke" };
            metrics::counter!("herald_consumer_rebalances_total", "group" => self.group.clone(), "kind" => kind)
                .increment(1);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.brokers_down.store(false, Ordering::Relaxed);
                tracing::info!(group = %self.group, partitions = partitions.count(), "partitions assigned");
                // The whole assignment, not only this step's, in case of an incremental
                // (cooperative) rebalance.
                let held: Vec<String> = {
                    let mut held = self.held();
                    held.extend(names(partitions));
                    held.iter().cloned().collect()
                };
                self.watch.assigned(held);
                metrics::counter!("herald_consumer_rebalances_total", "group" => self.group.clone(), "kind" => "assign")
                    .increment(1);
            }
            Rebalance::Revoke(partitions) => {
                // An incremental revocation may leave the member some partitions.
                let held: Vec<String> = {
                    let mut held = self.held();
                    for name in names(partitions) {
                        held.remove(&name);
                    }
                    held.iter().cloned().collect()
                };
                if !held.is_empty() {
                    self.watch.assigned(held);
                }
            }
            Rebalance::Error(error) => {
                tracing::warn!(group = %self.group, %error, "rebalance failed");
            }
        }
    }
}

/// `topic/partition` of each element of `list`.
fn names(list: &TopicPartitionList) -> Vec<String> {
    list.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect()
}

fn commit<C: Consumer<GroupContext>>(consumer: &C, when: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(%error, when, "offset commit failed"),
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

/// A consumer that, when dropped anywhere but [`close`] (its task cancelled with the
/// runtime, as at the end of a test), is dropped on a thread of its own. Dropping a
/// consumer leaves its group, which blocks; and a rebalance delivered meanwhile has been
/// seen to hang it for good inside librdkafka (`rd_kafka_assign` waiting on the group's
/// queue with no timeout). Only that thread waits then, not the runtime dropping the task.
struct Owned(Option<GroupConsumer>);

impl Owned {
    fn into_inner(mut self) -> GroupConsumer {
        self.0
            .take()
            .expect("an owned consumer holds its consumer until taken")
    }
}

impl std::ops::Deref for Owned {
    type Target = GroupConsumer;

    fn deref(&self) -> &GroupConsumer {
        self.0
            .as_ref()
            .expect("an owned consumer holds its consumer until taken")
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            let spawned = std::thread::Builder::new()
                .name("kafka-drop".to_owned())
                .spawn(move || drop(consumer));
            if let Err(error) = spawned {
                tracing::warn!(%error, "no thread to drop a consumer on; it is leaked");
            }
        }
    }
}

/// Consumes until `shutdown`, calling `handle` with each batch until it succeeds.
/// The consumer reports its membership to `watchdogs` and is recreated when the group
/// leaves it without an assignment for too long.
pub async fn run<F, Fut>(
    settings: &KafkaSettings,
    spec: ConsumerSpec,
    watchdogs: &Watchdogs,
    shutdown: CancellationToken,
    handle: F,
) -> anyhow::Result<()>
where
    F: Fn(Arc<Vec<IncomingMessage>>) -> Fut + Sync,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let watch = watchdogs.watch(&spec.group, settings.consumer.assignment_timeout);
    loop {
        let consumer = Owned(Some(create(settings, &spec, watch.clone())?));
        watch.created(Instant::now());
        let ended = consume(&consumer, settings, &spec, &watch, &shutdown, &handle).await;
        match ended {
            Ended::Shutdown => {
                close(consumer.into_inner(), &spec.group, None).await;
                break;
            }
            Ended::Stuck => {
                let report = watch.report(Instant::now());
                tracing::warn!(
                    group = %spec.group,
                    unassigned_secs = report.unassigned_for_secs,
                    assignment_lost = report.assignment_lost,
                    recreations = report.recreations + 1,
                    "no assignment from the group; recreating the consumer"
                );
                watch.recreating();
                metrics::counter!("herald_consumer_recreations_total", "group" => spec.group.clone())
                    .increment(1);
                close(consumer.into_inner(), &spec.group, Some(CLOSE_WAIT)).await;
            }
        }
    }
    tracing::info!(group = %spec.group, "consumer stopped");
    Ok(())
}

fn create(
    settings: &KafkaSettings,
    spec: &ConsumerSpec,
    watch: Arc<ConsumerWatch>,
) -> anyhow::Result<GroupConsumer> {
    let consumer: GroupConsumer = crate::kafka::consumer_config(settings)
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
        .set(
            "max.poll.interval.ms",
            settings.consumer.max_poll_interval.as_millis().to_string(),
        )
        .set("fetch.wait.max.ms", spec.fetch_wait_ms.to_string())
        .set("statistics.interval.ms", "5000")
        // A subscribed topic that does not exist (yet, or again after a broker lost its
        // data) is looked for at each metadata refresh: every 5 s rather than librdkafka's
        // 5 minutes, so a recreated topic is consumed at once.
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create_with_context(GroupContext {
            group: spec.group.clone(),
            watch,
            fetches: AtomicI64::new(0),
            brokers_down: AtomicBool::new(false),
            held: Default::default(),
        })
        .context("Failed to create a Kafka consumer")?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .with_context(|| format!("Failed to subscribe to {topics:?}"))?;
    tracing::info!(group = %spec.group, ?topics, "consumer started");
    Ok(consumer)
}

/// Why one consumer stopped consuming.
enum Ended {
    Shutdown,
    /// Without an assignment beyond the watchdog's patience.
    Stuck,
}

async fn consume<F, Fut>(
    consumer: &GroupConsumer,
    settings: &KafkaSettings,
    spec: &ConsumerSpec,
    watch: &ConsumerWatch,
    shutdown: &CancellationToken,
    handle: &F,
) -> Ended
where
    F: Fn(Arc<Vec<IncomingMessage>>) -> Fut + Sync,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    // A handler that takes this long is waiting on something (PostgreSQL down): the
    // partitions are paused and polled, well before librdkafka gives up on the member.
    let keep_alive_after = (settings.consumer.max_poll_interval / 3).min(Duration::from_secs(5));
    // Messages fetched while the partitions were being paused, or gathered by a
    // `next_batch` that was cancelled: the next batch starts with them (their offsets are
    // past the batches being handled).
    let mut carried = Vec::new();
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    let mut rejoined = false;
    // Batches in the handler's hands, oldest first, each resolving to whether it was stored.
    let mut in_flight: FuturesOrdered<Pin<Box<dyn Future<Output = Handled> + Send + '_>>> =
        FuturesOrdered::new();
    loop {
        let now = Instant::now();
        watch.export(now);
        // Looked at only with no batch in flight, as before batches could overlap: a batch
        // being handled finishes (and stores its offsets) first.
        if in_flight.is_empty() && watch.should_recreate(now) {
            return Ended::Stuck;
        }
        let step = if in_flight.len() < spec.in_flight.max(1) {
            tokio::select! {
                () = shutdown.cancelled() => Step::Shutdown,
                Some((batch, stored)) = in_flight.next(), if !in_flight.is_empty() => Step::Handled(batch, stored),
                // Cancellation safe: what it gathered so far stays in `carried`.
                batch = next_batch(consumer, spec.limits, &mut carried, watch) => Step::Fetched(batch),
            }
        } else {
            let mut paused = false;
            let step = tokio::select! {
                biased;
                Some((batch, stored)) = in_flight.next() => Step::Handled(batch, stored),
                never = keep_membership(consumer, watch, keep_alive_after, &mut carried, &mut paused) => match never {},
            };
            if paused {
                watch.waiting_on_handler(false);
                match consumer.assignment() {
                    Ok(assignment) => {
                        if let Err(error) = consumer.resume(&assignment) {
                            tracing::warn!(group = %spec.group, %error, "cannot resume partitions");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(group = %spec.group, %error, "cannot read the assignment")
                    }
                }
                tracing::info!(group = %spec.group, "batch stored; partitions resumed");
            }
            step
        };
        let batch = match step {
            Step::Shutdown => {
                // The batches in flight finish (or give up at their next retry) first; an
                // offset is stored only while every batch before it was stored.
                while let Some((batch, stored)) = in_flight.next().await {
                    if !stored {
                        break;
                    }
                    store_offsets(consumer, &batch);
                }
                return Ended::Shutdown;
            }
            Step::Handled(_, false) => return Ended::Shutdown,
            Step::Handled(batch, true) => {
                store_offsets(consumer, &batch);
                continue;
            }
            Step::Fetched(batch) => batch,
        };
        let brokers_down = consumer.context().brokers_down.load(Ordering::Relaxed);
        if brokers_down && !rejoined {
            match rejoin(consumer, &topics) {
                Ok(()) => tracing::warn!(
                    group = %spec.group,
                    "every broker is down; partitions dropped, the group is joined again from its committed offsets"
                ),
                Err(error) => {
                    tracing::warn!(group = %spec.group, error = format!("{error:#}"), "cannot rejoin the group")
                }
            }
        }
        rejoined = brokers_down;
        let batch = still_held(consumer, batch);
        if batch.is_empty() {
            continue;
        }
        let batch = Arc::new(batch);
        let group = spec.group.as_str();
        in_flight.push_back(Box::pin(async move {
            let stored = retry_until_done(group, shutdown, || handle(batch.clone()))
                .await
                .is_some();
            (batch, stored)
        }));
    }
}

/// A batch the handler is done with, and whether it stored it (false: shutdown began
/// first).
type Handled = (Arc<Vec<IncomingMessage>>, bool);

/// What the consumer loop does next.
enum Step {
    Shutdown,
    /// The oldest batch in flight, and whether it was stored (false: shutdown began first).
    Handled(Arc<Vec<IncomingMessage>>, bool),
    Fetched(Vec<IncomingMessage>),
}

/// Stores the offsets of a batch the handler stored, and commits them.
fn store_offsets(consumer: &GroupConsumer, batch: &[IncomingMessage]) {
    for message in batch {
        if let Err(error) = consumer.store_offset(&message.topic, message.partition, message.offset)
        {
            // The partition was revoked meanwhile: its next owner reads the message
            // again and the handler's idempotency absorbs the repeat.
            tracing::debug!(%error, partition = message.partition, "offset not stored");
        }
    }
    // Committed at once rather than at the next auto-commit: a restart then re-reads
    // less, and "stored" means "committed" within a round trip. The auto-commit stays
    // as the backstop for an asynchronous commit that failed.
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Async) {
        tracing::debug!(%error, "asynchronous offset commit not sent");
    }
}

/// Runs `attempt` until it succeeds (`Some`) or shutdown begins (`None`), with backoff
/// between tries. A failure is never the messages' fault (handlers dead-letter poison
/// themselves): each one counts as a stall of `group` and is logged.
pub async fn retry_until_done<T, F, Fut>(
    group: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::new();
    loop {
        match attempt().await {
            Ok(done) => return Some(done),
            Err(error) => {
                let wait = backoff.next();
                metrics::counter!("herald_consumer_stalls_total", "group" => group.to_owned())
                    .increment(1);
                tracing::warn!(
                    group,
                    error = format!("{error:#}"),
                    retry_in = ?wait,
                    "cannot process a batch; consumer paused"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Keeps the group membership of a consumer whose batch is still in the handler's hands
/// after `after`: pauses every assigned partition, so nothing more is fetched, and keeps
/// polling, which serves rebalances and shows librdkafka the member is alive
/// (`max.poll.interval.ms`). Resuming fetches from the position after the last message
/// handed out, so pausing loses nothing. Never returns: the caller drops it once the
/// batch is stored, then resumes the partitions if `paused` says so.
async fn keep_membership(
    consumer: &GroupConsumer,
    watch: &ConsumerWatch,
    after: Duration,
    carried: &mut Vec<IncomingMessage>,
    paused: &mut bool,
) -> Infallible {
    tokio::time::sleep(after).await;
    *paused = true;
    watch.waiting_on_handler(true);
    tracing::info!(group = %watch.group(), "batch still waiting; partitions paused, membership kept");
    let mut tick = tokio::time::interval(TICK);
    loop {
        // Partitions assigned since the last pass (a rebalance meanwhile) are paused too.
        if let Ok(assignment) = consumer.assignment()
            && let Err(error) = consumer.pause(&assignment)
        {
            tracing::debug!(%error, "cannot pause partitions");
        }
        watch.export(Instant::now());
        tokio::select! {
            _ = tick.tick() => {}
            received = consumer.recv() => match received {
                Ok(message) => carried.push(detach(&message)),
                Err(error) => {
                    tracing::debug!(%error, "Kafka consumer error while paused");
                    tick.tick().await;
                }
            },
        }
    }
}

/// The messages of `batch` whose partitions this member still holds (module docs).
fn still_held(consumer: &GroupConsumer, mut batch: Vec<IncomingMessage>) -> Vec<IncomingMessage> {
    let held = consumer.context().held();
    let fetched = batch.len();
    batch.retain(|m| held.contains(&format!("{}/{}", m.topic, m.partition)));
    if batch.len() < fetched {
        tracing::info!(
            group = %consumer.context().group,
            dropped = fetched - batch.len(),
            "messages of revoked partitions left to their next owner"
        );
    }
    batch
}

/// Drops the assignment and subscribes again (module docs).
fn rejoin(consumer: &GroupConsumer, topics: &[&str]) -> anyhow::Result<()> {
    consumer.unsubscribe();
    consumer
        .subscribe(topics)
        .with_context(|| format!("Failed to subscribe to {topics:?} again"))
}

/// Notes an error of the consumer's stream; every broker down calls for a rejoin.
fn note_error(consumer: &GroupConsumer, error: &KafkaError) {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
        consumer
            .context()
            .brokers_down
            .store(true, Ordering::Relaxed);
    }
    tracing::warn!(%error, "Kafka consumer error");
}

/// Waits up to [`TICK`] for one message, then takes what else arrives within `max_wait`,
/// up to `max_messages`, or until the batch is [`Settled`] and the topic quiet; `carried`
/// messages come first. Empty when nothing came.
async fn next_batch(
    consumer: &GroupConsumer,
    limits: BatchLimits,
    carried: &mut Vec<IncomingMessage>,
    watch: &ConsumerWatch,
) -> Vec<IncomingMessage> {
    // The batch is gathered in `carried` itself, so that a cancelled call loses nothing.
    if carried.is_empty() {
        // `recv` is cancellation safe: a message is taken only when it is returned.
        match tokio::time::timeout(TICK, consumer.recv()).await {
            Err(_) => return Vec::new(),
            Ok(Ok(message)) => carried.push(detach(&message)),
            Ok(Err(error)) => {
                note_error(consumer, &error);
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Vec::new();
            }
        }
    }
    watch.fetched();
    let deadline = tokio::time::Instant::now() + limits.max_wait;
    let mut open = limits.settled.map(|spec| OpenThings {
        spec,
        open: HashSet::new(),
        seen: 0,
    });
    while carried.len() < limits.max_messages {
        let until = match &open {
            Some(open) => deadline.min(tokio::time::Instant::now() + open.spec.quiet),
            None => deadline,
        };
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(message)) => carried.push(detach(&message)),
            Ok(Err(error)) => {
                note_error(consumer, &error);
                break;
            }
            Err(_) if until < deadline => {
                if open.as_mut().is_some_and(|open| open.settled(carried)) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    std::mem::take(carried)
}

/// Closes a consumer off the runtime's threads, waiting at most `limit` (for ever with
/// `None`). Closing blocks: a synchronous commit, then leaving the group, whose revoke
/// callback commits synchronously again. On a loaded broker that takes seconds, and on
/// the runtime's own threads it would stall every task still finishing its work (sends
/// whose rate-limit check then times out, records waiting for a connection).
async fn close(consumer: GroupConsumer, group: &str, limit: Option<Duration>) {
    let closing = tokio::task::spawn_blocking(move || {
        commit(&consumer, "at close");
        drop(consumer);
    });
    let closed = match limit {
        None => closing.await,
        Some(limit) => match tokio::time::timeout(limit, closing).await {
            Ok(closed) => closed,
            Err(_) => {
                tracing::warn!(group, ?limit, "consumer still closing; going on without it");
                return;
            }
        },
    };
    if let Err(error) = closed {
        tracing::warn!(group, %error, "consumer did not close cleanly");
    }
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
        timestamp: message.timestamp().to_millis(),
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
}

/// Moves `group`'s committed offsets on `topics` forward to the first record published at
/// or after `since`, on each partition where they are behind it or absent (past the last
/// record where none is that recent); never backwards. For a group that starts consuming
/// only from some moment on (the webhook fan-out, once a first endpoint exists): without
/// it, the group would read the records since it last read, or the whole topic. A commit
/// from outside the group is refused while the group has members; then they read anyway,
/// and this moves nothing. Tansu 0.6 answers offset 0 for a time later than a partition's
/// last record (Kafka answers its end), so there the partition is read once from its start:
/// a reader that must not see older records checks their timestamps too. Blocking
/// (librdkafka's calls wait for the broker). Returns how many partitions moved.
pub fn fast_forward(
    settings: &KafkaSettings,
    group: &str,
    topics: &[String],
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<usize> {
    use rdkafka::{Offset, TopicPartitionList, consumer::BaseConsumer};
    const WAIT: Duration = Duration::from_secs(10);
    let consumer: BaseConsumer = crate::kafka::consumer_config(settings)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("Failed to create a consumer to move the group's offsets")?;
    let mut at_time = TopicPartitionList::new();
    let mut partitions = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), WAIT)
            .with_context(|| format!("Failed to read the metadata of {topic}"))?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            at_time.add_partition_offset(
                topic,
                partition.id(),
                Offset::Offset(since.timestamp_millis()),
            )?;
            partitions.add_partition(topic, partition.id());
        }
    }
    let found = consumer
        .offsets_for_times(at_time, WAIT)
        .context("Failed to find the offsets of that time")?;
    let committed = consumer
        .committed_offsets(partitions, WAIT)
        .context("Failed to read the group's offsets")?;
    let mut moves = TopicPartitionList::new();
    for element in found.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let target = match element.offset() {
            Offset::Offset(offset) => offset,
            // No record that recent: from the end.
            _ => consumer.fetch_watermarks(topic, partition, WAIT)?.1,
        };
        let behind = match committed
            .find_partition(topic, partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(offset)) => offset < target,
            _ => true,
        };
        if behind {
            moves.add_partition_offset(topic, partition, Offset::Offset(target))?;
        }
    }
    if moves.count() > 0 {
        consumer
            .commit(&moves, CommitMode::Sync)
            .context("Failed to commit the group's new offsets")?;
    }
    Ok(moves.count())
}
