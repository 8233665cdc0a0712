//! The outbox relay: publishes the outbox's messages to Kafka in row order and marks them
//! published, at least once. A crash between producing and marking re-publishes the batch;
//! readers dedupe (delivery events carry a version, dead letters their `X-Dead-Letter-Id`).
//!
//! A row carries every message one transaction wrote for one topic (migration 0008); its
//! messages are published in their order. A row whose messages are only partly settled
//! records which are (`done`), so the others are tried again without the settled ones.
//!
//! Several relays can run: each batch is locked with `FOR UPDATE SKIP LOCKED`.
//!
//! Only a transient failure (the broker away, busy, electing) holds a message back, and it
//! holds only that message. What Kafka answers is judged per message ([`verdict`]):
//! - a message Kafka will never take (too large, malformed) is **parked**: copied to
//!   `outbox_parked` (named by its row and position) with the error, counted in
//!   `herald_outbox_parked_total{kind}` and logged, so that the messages behind it flow. A dead letter too large for Kafka is first
//!   **truncated** instead (its payload cut to [`TRUNCATED_PAYLOAD_BYTES`], with an
//!   `X-Payload-Truncated: <original size>` header), because the failure it reports matters
//!   more than its bytes: the operator still sees it, and the original event stays where it
//!   came from (`X-Original-Topic`/`-Offset`). A refusal the broker gave a whole batch of
//!   messages may not be any one message's fault: those messages are sent again alone
//!   before being judged.
//! - a missing topic holds that topic's rows back on their own, with a backoff (1 s
//!   doubling to a minute), instead of putting them in front of every batch; a topic of the
//!   catalogue is created again (a broker that lost its data loses its topics too).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{
    config::KafkaSettings,
    kafka::{self, KafkaAdmin, TopicCatalogue},
    outbox::PAYLOAD_TRUNCATED_HEADER,
};

/// Messages one relay transaction publishes (at least one row's worth): large, because a
/// batch costs a fixed number of statements, a commit and one linger of the producer,
/// whatever its size.
const BATCH: i64 = 5000;
/// How often the outbox lag gauge is refreshed.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Published rows are deleted after this long.
const RETENTION_HOURS: i64 = 24;
/// What is left of a dead letter's payload that Kafka refused as too large: enough for an
/// operator to recognise the event, far below any broker's limit.
pub const TRUNCATED_PAYLOAD_BYTES: usize = 64 * 1024;
/// The first and the longest hold of a missing topic's rows.
const FIRST_HOLD: Duration = Duration::from_secs(1);
const LONGEST_HOLD: Duration = Duration::from_secs(60);
/// How long after a batch its rows' ids become the floor of the relay's reads ([`Floor`]).
const FLOOR_LAG: Duration = Duration::from_secs(1);
/// How often the relay reads from the start of the outbox anyway ([`Floor`]).
const FLOOR_SWEEP: Duration = Duration::from_secs(5);

/// Publishes outbox rows.
pub struct Relay {
    db: PgPool,
    settings: KafkaSettings,
    producer: FutureProducer,
    /// Topics Kafka reported missing, with when their rows may be tried again.
    held_topics: HashMap<String, Hold>,
    /// Messages the broker refused together with others, to be sent alone next time.
    suspects: HashSet<MessageId>,
    /// The id from which the relay reads unpublished rows.
    floor: Floor,
}

/// The id from which the relay reads unpublished rows. Every row it marks published leaves
/// an entry at the head of the `outbox_unpublished` index until no snapshot can still see
/// it, and any snapshot held on the database (a long report, a slow statement) keeps them
/// all: read from the head, every batch and every idle poll (each 50 ms) walks them, which
/// took a read from 1.1 to 17 ms on the bench with a 20-second snapshot held elsewhere.
///
/// After each batch the relay knows that every row before the first it left unpublished
/// (or after the last it read) was published, or was not visible yet: ids are taken at
/// insert and rows commit in another order. So that id becomes the floor only
/// [`FLOOR_LAG`] later, when a transaction that took a lower id has committed (or has run
/// long enough to be the exception), and every [`FLOOR_SWEEP`], or while a topic is held
/// back, the relay reads from the start: a row left behind is published late, never lost.
#[derive(Debug)]
struct Floor {
    floor: Option<i64>,
    /// Floors to come, with when they were learnt, oldest first.
    learnt: std::collections::VecDeque<(Instant, i64)>,
    swept: Instant,
}

impl Floor {
    fn new(now: Instant) -> Self {
        Floor {
            floor: None,
            learnt: std::collections::VecDeque::new(),
            swept: now,
        }
    }

    /// The id to read from at `now`; `None`, from the start (a sweep, or while a topic is
    /// held back: its rows are not read, so no floor may pass them).
    fn current(&mut self, now: Instant, holding: bool) -> Option<i64> {
        if holding || now.duration_since(self.swept) >= FLOOR_SWEEP {
            *self = Floor::new(now);
            return None;
        }
        while let Some(&(at, id)) = self.learnt.front()
            && now.duration_since(at) >= FLOOR_LAG
        {
            self.floor = Some(self.floor.map_or(id, |f| f.max(id)));
            self.learnt.pop_front();
        }
        self.floor
    }

    /// Every row before `id` that the batch that ended at `now` could see is published.
    fn learn(&mut self, now: Instant, id: i64) {
        self.learnt.push_back((now, id));
    }
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    wait: Duration,
}

/// A message of the outbox: its row's id and its 1-based position in the row.
type MessageId = (i64, i32);

/// An outbox row as the relay reads it.
#[derive(sqlx::FromRow)]
struct Stored {
    id: i64,
    kind: String,
    topic: String,
    message_keys: Vec<Option<Vec<u8>>>,
    payloads: Vec<Vec<u8>>,
    headers: sqlx::types::Json<Vec<BTreeMap<String, String>>>,
    done: Vec<i32>,
    created_at: DateTime<Utc>,
}

impl Stored {
    /// The messages not settled yet, in their order.
    fn pending(self) -> impl Iterator<Item = Message> {
        let Stored {
            id,
            kind,
            topic,
            message_keys,
            payloads,
            headers,
            done,
            created_at,
        } = self;
        message_keys
            .into_iter()
            .zip(payloads)
            .zip(headers.0)
            .zip(1..)
            .filter(move |(_, position)| !done.contains(position))
            .map(
                move |(((message_key, payload), headers), position)| Message {
                    id,
                    position,
                    kind: kind.clone(),
                    topic: topic.clone(),
                    message_key,
                    payload,
                    headers,
                    created_at,
                },
            )
    }
}

/// One message of the batch.
struct Message {
    id: i64,
    position: i32,
    kind: String,
    topic: String,
    message_key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
    created_at: DateTime<Utc>,
}

impl Message {
    fn message_id(&self) -> MessageId {
        (self.id, self.position)
    }
}

/// What Kafka's refusal of one message means for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The message is too large: it will never be taken as it is.
    TooLarge,
    /// The message is malformed: it will never be taken.
    Invalid,
    /// Its topic is missing or not writable: the topic's rows are held back together.
    TopicUnavailable,
    /// The producer's queue is full: the rest of the batch waits for the next one.
    QueueFull,
    /// Anything else (the broker away, busy or electing a leader, a timeout): the message
    /// is tried again in the next batch. Unknown codes land here: holding a message back
    /// is safe, parking it is not.
    Transient,
}

/// Judges a produce error code (librdkafka's local codes are negative, the broker's
/// positive).
pub fn verdict(code: RDKafkaErrorCode) -> Verdict {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            Verdict::TooLarge
        }
        C::InvalidMessage | C::InvalidRecord | C::InvalidTimestamp => Verdict::Invalid,
        C::UnknownTopic
        | C::UnknownPartition
        | C::UnknownTopicOrPartition
        | C::InvalidTopic
        | C::TopicAuthorizationFailed => Verdict::TopicUnavailable,
        C::QueueFull => Verdict::QueueFull,
        _ => Verdict::Transient,
    }
}

/// The messages of one batch by what became of them.
#[derive(Default)]
struct Fates {
    published: Vec<MessageId>,
    /// Messages Kafka will never take as they are, with the error.
    refused: Vec<(usize, Verdict, String)>,
    missing_topics: HashSet<String>,
    transient: usize,
    /// Messages not acknowledged within message.timeout.ms.
    timed_out: usize,
}

impl Relay {
    /// An idempotent producer (acks=all, no duplicates from its own retries).
    pub fn new(db: PgPool, settings: &KafkaSettings) -> anyhow::Result<Self> {
        Ok(Relay {
            db,
            settings: settings.clone(),
            producer: producer(settings)?,
            held_topics: HashMap::new(),
            suspects: HashSet::new(),
            floor: Floor::new(Instant::now()),
        })
    }

    /// Publishes one batch; returns how many messages were published.
    pub async fn publish_batch(&mut self) -> anyhow::Result<usize> {
        let now = Instant::now();
        let held: Vec<String> = self
            .held_topics
            .iter()
            .filter(|(_, hold)| hold.until > now)
            .map(|(topic, _)| topic.clone())
            .collect();
        let floor = self.floor.current(now, !self.held_topics.is_empty());
        let mut tx = self.db.begin().await.context("Failed to begin")?;
        // A lost mark is redone: should PostgreSQL crash before this commit reaches disk,
        // the messages are published again, which readers dedupe (module docs). So the
        // commit does not wait for the flush (issue 14, lever 8).
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await
            .context("Failed to set up a relay batch")?;
        let stored = read_batch(&mut tx, &held, floor).await?;
        if stored.is_empty() {
            return Ok(0);
        }
        // What each row holds, to tell a row settled whole from one settled in part.
        let unsettled: BTreeMap<i64, (usize, Vec<i32>)> = stored
            .iter()
            .map(|s| (s.id, (s.payloads.len() - s.done.len(), Vec::new())))
            .collect();
        let messages: Vec<Message> = stored.into_iter().flat_map(Stored::pending).collect();
        let fates = self.send(&messages).await;
        let next = record_fates(&mut tx, &messages, &fates, unsettled).await?;
        tx.commit()
            .await
            .context("Failed to commit the relay batch")?;
        self.floor.learn(Instant::now(), next);
        let published = fates.published.len();
        self.after_commit(&messages, fates).await?;
        Ok(published)
    }

    /// Sends a batch's messages and waits for what Kafka answers to each.
    async fn send(&mut self, messages: &[Message]) -> Fates {
        let mut fates = Fates::default();
        // Rows the broker refused in company are sent one at a time, each awaited before
        // the next, so that a refusal now is their own.
        let (alone, together): (Vec<usize>, Vec<usize>) =
            (0..messages.len()).partition(|&i| self.suspects.contains(&messages[i].message_id()));
        for i in alone {
            match self.enqueue(&messages[i]) {
                Ok(delivery) => self.settle(messages, i, delivery, true, &mut fates).await,
                Err(error) => self.judge(messages, i, &error, true, &mut fates),
            }
        }
        // Enqueue everything else first (send_result returns at once), then await the acks
        // in order: the batch costs one round trip, not one per row.
        let mut pending = Vec::with_capacity(together.len());
        for i in together {
            if fates.missing_topics.contains(&messages[i].topic) {
                continue;
            }
            match self.enqueue(&messages[i]) {
                Ok(delivery) => pending.push((i, delivery)),
                Err(error) if verdict_of(&error) == Verdict::QueueFull => {
                    tracing::debug!(%error, "producer queue full; publishing the rest later");
                    break;
                }
                // librdkafka's own checks (a message over message.max.bytes, a topic it
                // knows is missing) answer at once, for this message alone.
                Err(error) => self.judge(messages, i, &error, true, &mut fates),
            }
        }
        for (i, delivery) in pending {
            self.settle(messages, i, delivery, false, &mut fates).await;
        }
        fates
    }

    /// What follows a committed batch: counters and logs, the suspects and held topics it
    /// cleared or added, and a new producer when this one can no longer publish.
    async fn after_commit(&mut self, messages: &[Message], fates: Fates) -> anyhow::Result<()> {
        metrics::counter!("herald_outbox_published_total").increment(fates.published.len() as u64);
        for (i, verdict, error) in &fates.refused {
            self.suspects.remove(&messages[*i].message_id());
            report_set_aside(&messages[*i], *verdict, error);
        }
        for id in &fates.published {
            self.suspects.remove(id);
        }
        let published: HashSet<MessageId> = fates.published.iter().copied().collect();
        let published_topics: HashSet<&str> = messages
            .iter()
            .filter(|r| published.contains(&r.message_id()))
            .map(|r| r.topic.as_str())
            .collect();
        self.held_topics
            .retain(|topic, _| !published_topics.contains(topic.as_str()));
        self.hold(fates.missing_topics).await;
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            // An idempotent producer can fail for good. Only a new producer publishes again.
            tracing::error!(%code, reason, "the Kafka producer failed; making a new one");
            self.producer = producer(&self.settings)?;
        } else if fates.published.is_empty() && fates.timed_out > 0 {
            // Nothing acknowledged for message.timeout.ms: the broker is away, or it came
            // back without the state of this idempotent producer (a broker that lost its
            // data: measured on Tansu, every later message timed out, with no fatal error).
            // A new producer costs a connection, and starts with an id the broker knows.
            tracing::warn!(
                timed_out = fates.timed_out,
                "no acknowledgement from Kafka; making a new producer"
            );
            self.producer = producer(&self.settings)?;
        }
        Ok(())
    }

    fn enqueue(&self, message: &Message) -> Result<DeliveryFuture, KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
        for (name, value) in message.headers.iter() {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&message.topic)
            .payload(&message.payload)
            .headers(headers);
        if let Some(key) = &message.message_key {
            record = record.key(key);
        }
        self.producer
            .send_result(record)
            .map_err(|(error, _)| error)
    }

    /// Waits for one row's acknowledgement and judges a failure.
    async fn settle(
        &mut self,
        messages: &[Message],
        i: usize,
        delivery: DeliveryFuture,
        alone: bool,
        fates: &mut Fates,
    ) {
        match delivery.await {
            Ok(Ok(_)) => fates.published.push(messages[i].message_id()),
            Ok(Err((error, _))) => self.judge(messages, i, &error, alone, fates),
            // The producer was dropped: the row stays for the next batch.
            Err(_) => fates.transient += 1,
        }
    }

    fn judge(
        &mut self,
        messages: &[Message],
        i: usize,
        error: &KafkaError,
        alone: bool,
        fates: &mut Fates,
    ) {
        let message = &messages[i];
        metrics::counter!("herald_outbox_publish_errors_total").increment(1);
        match verdict_of(error) {
            verdict @ (Verdict::TooLarge | Verdict::Invalid) if alone => {
                fates.refused.push((i, verdict, error.to_string()));
            }
            Verdict::TooLarge | Verdict::Invalid => {
                tracing::warn!(id = message.id, position = message.position, %error, "the broker refused a batch; its messages go alone next time");
                self.suspects.insert(message.message_id());
            }
            Verdict::TopicUnavailable => {
                fates.missing_topics.insert(message.topic.clone());
            }
            Verdict::QueueFull | Verdict::Transient => {
                fates.transient += 1;
                if error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) {
                    fates.timed_out += 1;
                }
                tracing::warn!(id = message.id, position = message.position, topic = %message.topic, %error, "cannot publish an outbox message; will retry");
            }
        }
    }

    /// Holds back the rows of topics Kafka reported missing, longer each time, and creates
    /// the catalogue's topics again when one of them is missing.
    async fn hold(&mut self, topics: HashSet<String>) {
        if topics.is_empty() {
            return;
        }
        let catalogue = TopicCatalogue::load(&self.settings.topics_file).ok();
        let mut recreate = false;
        for topic in topics {
            let hold = self.held_topics.entry(topic.clone()).or_insert(Hold {
                until: Instant::now(),
                wait: FIRST_HOLD / 2,
            });
            hold.wait = (hold.wait * 2).min(LONGEST_HOLD);
            hold.until = Instant::now() + hold.wait;
            tracing::warn!(%topic, retry_in = ?hold.wait, "topic missing; its outbox rows wait");
            recreate |= catalogue.as_ref().is_some_and(|c| {
                c.topics
                    .iter()
                    .any(|t| format!("{}{}", self.settings.topic_prefix, t.name) == topic)
            });
        }
        if let (true, Some(catalogue)) = (recreate, catalogue) {
            let created = match KafkaAdmin::new(&self.settings) {
                Ok(admin) => admin.create_topics(&catalogue).await.map(drop),
                Err(error) => Err(error),
            };
            match created {
                Ok(()) => tracing::warn!("catalogue topics were missing; created them again"),
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot create the missing catalogue topics"
                ),
            }
        }
    }

    /// Relays until `shutdown`: at once while there is a backlog, otherwise every 50 ms.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut last_prune = std::time::Instant::now();
        let mut last_lag = std::time::Instant::now() - LAG_EVERY;
        while !shutdown.is_cancelled() {
            let wait = match self.publish_batch().await {
                Ok(n) if n as i64 >= BATCH => Duration::ZERO,
                Ok(_) => Duration::from_millis(50),
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "outbox relay failed; retrying"
                    );
                    Duration::from_secs(1)
                }
            };
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = std::time::Instant::now();
                self.export_lag().await;
            }
            if last_prune.elapsed() > Duration::from_secs(600) {
                last_prune = std::time::Instant::now();
                self.prune().await;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }

    async fn export_lag(&self) {
        // The oldest unpublished row by id, found through the partial index from the relay's
        // floor; min(created_at) would read the whole backlog on every call.
        let oldest: Result<Option<DateTime<Utc>>, _> = sqlx::query_scalar(
            "SELECT created_at FROM outbox WHERE published_at IS NULL \
             AND id >= COALESCE($1, 0) ORDER BY id LIMIT 1",
        )
        .bind(self.floor.floor)
        .fetch_optional(&self.db)
        .await;
        if let Ok(oldest) = oldest {
            let lag = oldest.map_or(0.0, |at| {
                (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
            });
            metrics::gauge!("herald_outbox_lag_seconds").set(lag);
        }
    }

    async fn prune(&self) {
        let pruned =
            sqlx::query("DELETE FROM outbox WHERE published_at < now() - $1 * interval '1 hour'")
                .bind(RETENTION_HOURS)
                .execute(&self.db)
                .await;
        if let Err(error) = pruned {
            tracing::warn!(%error, "cannot prune the outbox");
        }
    }
}

fn producer(settings: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    kafka::client_config(settings)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        // How long a message for a topic the cluster does not know waits for the topic to
        // appear before it fails (librdkafka's default is 30 s). The batch's commit waits
        // for it, so the default held every row behind a missing topic for 30 s; Herald
        // creates its topics before it produces, and a row that fails is simply held back
        // and tried again (module docs).
        .set("topic.metadata.propagation.max.ms", "1000")
        .create()
        .context("Failed to create the Kafka producer")
}

fn verdict_of(error: &KafkaError) -> Verdict {
    error
        .rdkafka_error_code()
        .map_or(Verdict::Transient, verdict)
}

/// Locks the next unpublished rows in id order, from `floor`, until they hold [`BATCH`]
/// messages, leaving out the `held` topics' rows.
async fn read_batch(
    tx: &mut PgConnection,
    held: &[String],
    floor: Option<i64>,
) -> anyhow::Result<Vec<Stored>> {
    // Counted from the generated `messages` column so that the arrays are read only for
    // the rows taken. The ids are gathered into an array first (an InitPlan, run once): as
    // a join, a planner whose statistics still saw an empty outbox ran the window once per
    // unpublished row, and a backlog of 1,570 rows took one statement 25 s (quadratic, so
    // the relay fell further behind the longer it lasted).
    sqlx::query_as(
        "SELECT o.id, o.kind, o.topic, o.message_keys, o.payloads, o.headers, o.done, \
             o.created_at \
         FROM outbox o \
         WHERE o.id = ANY(ARRAY( \
             SELECT id FROM ( \
                 SELECT id, sum(messages - cardinality(done)) OVER (ORDER BY id) \
                     - (messages - cardinality(done)) AS before \
                 FROM (SELECT id, messages, done FROM outbox \
                       WHERE published_at IS NULL AND topic <> ALL($2) \
                           AND id >= COALESCE($3, 0) \
                       ORDER BY id LIMIT $1) c) w \
             WHERE before < $1)) \
           AND o.published_at IS NULL \
         ORDER BY o.id FOR UPDATE OF o SKIP LOCKED",
    )
    .bind(BATCH)
    .bind(held)
    .bind(floor)
    .fetch_all(tx)
    .await
    .context("Failed to read the outbox")
}

/// Records a batch's fates in its transaction: refused messages set aside, and each row's
/// settled positions marked (`unsettled` holds each row's count of unsettled messages).
/// Returns the first row left unpublished, else the one after the last read: the floor
/// the relay learns from this batch.
async fn record_fates(
    tx: &mut PgConnection,
    messages: &[Message],
    fates: &Fates,
    mut unsettled: BTreeMap<i64, (usize, Vec<i32>)>,
) -> anyhow::Result<i64> {
    for (i, verdict, error) in &fates.refused {
        if set_aside(&mut *tx, &messages[*i], *verdict, error).await? {
            let (id, position) = messages[*i].message_id();
            if let Some((_, settled)) = unsettled.get_mut(&id) {
                settled.push(position);
            }
        }
    }
    for (id, position) in &fates.published {
        if let Some((_, settled)) = unsettled.get_mut(id) {
            settled.push(*position);
        }
    }
    let next = unsettled
        .iter()
        .find(|(_, (count, settled))| settled.len() < *count)
        .map_or_else(
            || unsettled.keys().last().map_or(0, |id| id + 1),
            |(id, _)| *id,
        );
    mark(tx, unsettled).await?;
    Ok(next)
}

/// Marks the rows whose messages are all settled published, and records the settled
/// positions of the others (rare: a held topic, a transient failure, a full queue).
async fn mark(
    tx: &mut PgConnection,
    unsettled: BTreeMap<i64, (usize, Vec<i32>)>,
) -> anyhow::Result<()> {
    let mut whole = Vec::new();
    for (id, (left, settled)) in unsettled {
        if settled.len() == left {
            whole.push(id);
        } else if !settled.is_empty() {
            sqlx::query("UPDATE outbox SET done = done || $2 WHERE id = $1")
                .bind(id)
                .bind(&settled)
                .execute(&mut *tx)
                .await
                .context("Failed to mark outbox messages published")?;
        }
    }
    if !whole.is_empty() {
        sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
            .bind(&whole)
            .execute(&mut *tx)
            .await
            .context("Failed to mark outbox rows published")?;
    }
    Ok(())
}

/// Truncates a dead letter refused as too large (once), to be published at the next batch,
/// or parks the message; true when the message is settled (parked).
async fn set_aside(
    tx: &mut PgConnection,
    message: &Message,
    verdict: Verdict,
    error: &str,
) -> anyhow::Result<bool> {
    if let Some(cut) = truncation(message, verdict) {
        sqlx::query(
            "UPDATE outbox SET payloads[$2] = $3, \
                 headers = jsonb_set(headers, ARRAY[($2 - 1)::text, $4::text], to_jsonb($5::text)) \
             WHERE id = $1",
        )
        .bind(message.id)
        .bind(message.position)
        .bind(&message.payload[..cut])
        .bind(PAYLOAD_TRUNCATED_HEADER)
        .bind(message.payload.len().to_string())
        .execute(&mut *tx)
        .await
        .context("Failed to truncate a dead letter")?;
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO outbox_parked (id, position, kind, topic, message_key, payload, headers, \
             created_at, error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
    )
    .bind(message.id)
    .bind(message.position)
    .bind(&message.kind)
    .bind(&message.topic)
    .bind(&message.message_key)
    .bind(&message.payload)
    .bind(sqlx::types::Json(&message.headers))
    .bind(message.created_at)
    .bind(error.replace('\0', ""))
    .execute(&mut *tx)
    .await
    .context("Failed to park an outbox message")?;
    Ok(true)
}

/// Where to cut a dead letter's payload, if it is one that is cut rather than parked: too
/// large, not cut before, and with more than the budget to cut. The cut keeps UTF-8 whole.
fn truncation(message: &Message, verdict: Verdict) -> Option<usize> {
    if message.kind != "dead_letter"
        || verdict != Verdict::TooLarge
        || message.headers.contains_key(PAYLOAD_TRUNCATED_HEADER)
        || message.payload.len() <= TRUNCATED_PAYLOAD_BYTES
    {
        return None;
    }
    let head = &message.payload[..TRUNCATED_PAYLOAD_BYTES];
    Some(match std::str::from_utf8(head) {
        Ok(_) => head.len(),
        Err(error) if error.error_len().is_none() => error.valid_up_to(),
        Err(_) => head.len(),
    })
}

fn report_set_aside(message: &Message, verdict: Verdict, error: &str) {
    if truncation(message, verdict).is_some() {
        metrics::counter!("herald_outbox_truncated_total").increment(1);
        tracing::warn!(
            id = message.id,
            position = message.position,
            topic = %message.topic,
            size = message.payload.len(),
            error,
            "dead letter too large for Kafka; its payload is truncated"
        );
    } else {
        metrics::counter!("herald_outbox_parked_total", "kind" => message.kind.clone())
            .increment(1);
        tracing::error!(
            id = message.id,
            position = message.position,
            topic = %message.topic,
            kind = %message.kind,
            size = message.payload.len(),
            error,
            "Kafka will never take this outbox message; parked in outbox_parked"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_takes_a_batch_s_ids_only_a_second_later_and_is_dropped_at_sweeps_and_holds() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut floor = Floor::new(start);
        assert_eq!(floor.current(at(0), false), None);
        floor.learn(at(10), 100);
        floor.learn(at(600), 250);
        // A transaction that took an id below 100 may still commit for a second.
        assert_eq!(floor.current(at(900), false), None);
        assert_eq!(floor.current(at(1010), false), Some(100));
        assert_eq!(floor.current(at(1600), false), Some(250));
        // It never moves back.
        floor.learn(at(1700), 200);
        assert_eq!(floor.current(at(2800), false), Some(250));
        // A held topic's rows are not read, so no floor may pass them.
        assert_eq!(floor.current(at(2900), true), None);
        floor.learn(at(3000), 400);
        assert_eq!(floor.current(at(4100), false), Some(400));
        // Every few seconds the relay reads from the start, for rows left behind.
        assert_eq!(floor.current(at(2900) + FLOOR_SWEEP, false), None);
        assert_eq!(floor.learnt.len(), 0);
    }

    #[test]
    fn only_size_and_format_errors_are_taken_as_the_message_s_own_fault() {
        use RDKafkaErrorCode as C;
        let cases = [
            (C::MessageSizeTooLarge, Verdict::TooLarge),
            (C::InvalidMessageSize, Verdict::TooLarge),
            (C::MessageBatchTooLarge, Verdict::TooLarge),
            (C::InvalidMessage, Verdict::Invalid),
            (C::InvalidRecord, Verdict::Invalid),
            (C::InvalidTimestamp, Verdict::Invalid),
            (C::UnknownTopic, Verdict::TopicUnavailable),
            (C::UnknownTopicOrPartition, Verdict::TopicUnavailable),
            (C::UnknownPartition, Verdict::TopicUnavailable),
            (C::TopicAuthorizationFailed, Verdict::TopicUnavailable),
            (C::QueueFull, Verdict::QueueFull),
            (C::MessageTimedOut, Verdict::Transient),
            (C::AllBrokersDown, Verdict::Transient),
            (C::RequestTimedOut, Verdict::Transient),
            (C::NotLeaderForPartition, Verdict::Transient),
            (C::LeaderNotAvailable, Verdict::Transient),
            (C::NotEnoughReplicas, Verdict::Transient),
            (C::NetworkException, Verdict::Transient),
            (C::Fatal, Verdict::Transient),
            (C::Unknown, Verdict::Transient),
        ];
        for (code, expected) in cases {
            assert_eq!(verdict(code), expected, "{code:?}");
        }
    }

    fn dead_letter(payload: Vec<u8>) -> Message {
        Message {
            id: 1,
            position: 1,
            kind: "dead_letter".to_owned(),
            topic: "notification.dlq.order".to_owned(),
            message_key: None,
            payload,
            headers: BTreeMap::new(),
            created_at: Utc::now(),
        }
    }

    #[test]
    fn a_dead_letter_too_large_is_cut_once_on_a_character_boundary_and_anything_else_is_parked() {
        let mut text = "x".repeat(TRUNCATED_PAYLOAD_BYTES - 1).into_bytes();
        text.extend("한".repeat(1000).as_bytes());
        let message = dead_letter(text);
        let cut = truncation(&message, Verdict::TooLarge).expect("a large dead letter is cut");
        assert_eq!(
            cut,
            TRUNCATED_PAYLOAD_BYTES - 1,
            "the cut keeps UTF-8 whole"
        );
        assert!(std::str::from_utf8(&message.payload[..cut]).is_ok());

        assert_eq!(
            truncation(&message, Verdict::Invalid),
            None,
            "invalid: parked"
        );
        let mut cut_before = dead_letter(vec![b'x'; 2 * TRUNCATED_PAYLOAD_BYTES]);
        cut_before
            .headers
            .insert(PAYLOAD_TRUNCATED_HEADER.to_owned(), "9".to_owned());
        assert_eq!(truncation(&cut_before, Verdict::TooLarge), None);
        let mut event = dead_letter(vec![b'x'; 2 * TRUNCATED_PAYLOAD_BYTES]);
        event.kind = "delivery_event".to_owned();
        assert_eq!(truncation(&event, Verdict::TooLarge), None);
        let small = dead_letter(vec![b'x'; 10]);
        assert_eq!(truncation(&small, Verdict::TooLarge), None);
    }
}
