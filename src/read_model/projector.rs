//! Applying delivery events to the read model, and rebuilding it from the topic.

use std::{collections::HashMap, time::Duration};

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
};
use serde::Deserialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    config::KafkaSettings,
    db::is_data_error,
    domain::{DeliveryStatus, ReceiptStatus},
    kafka::{
        consumer::{IncomingMessage, detach},
        parked,
    },
    outbox::DELIVERY_EVENTS_TOPIC,
    receipts::ReceiptState,
};

/// A delivery event as the projector reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryEventIn {
    pub delivery_id: Uuid,
    pub notification_id: Uuid,
    pub event_id: Option<String>,
    pub event_type: String,
    pub user_id: Option<i64>,
    pub channel: String,
    pub status: String,
    pub attempts: i32,
    pub error: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The provider's receipt, on the events that carry one.
    #[serde(default)]
    pub receipt: Option<ReceiptState>,
    /// Why a PENDING delivery waits, and until when.
    #[serde(default)]
    pub hold: Option<crate::outbox::HoldInfo>,
    /// The digest the delivery is in.
    #[serde(default)]
    pub digest_id: Option<Uuid>,
}

/// Which delivery a delivery event is about, and whether the delivery is still open after
/// it (not in a terminal state): the projector's [`crate::kafka::consumer::Settled`]. Reads
/// only those two fields.
pub fn delivery_left_open(message: &IncomingMessage) -> Option<(Uuid, bool)> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Outcome<'a> {
        delivery_id: Uuid,
        status: &'a str,
    }
    let event: Outcome = serde_json::from_slice(&message.payload).ok()?;
    let status: DeliveryStatus = event.status.parse().ok()?;
    Some((event.delivery_id, !status.is_terminal()))
}

/// What applying a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Events that changed a row.
    pub applied: usize,
    /// Events older than (or as old as) the row: replays, late arrivals.
    pub stale: usize,
    /// Records that are not delivery events.
    pub unreadable: usize,
    /// Events PostgreSQL refused, parked in `parked_records`.
    pub parked: usize,
}

/// Maintains notification_log and delivery_stats.
#[derive(Clone)]
pub struct Projector {
    pub db: PgPool,
    /// The time zone whose calendar days delivery_stats counts in.
    pub reporting_tz: Tz,
}

impl Projector {
    /// [`Projector::apply`], except that a batch PostgreSQL refuses is applied event by
    /// event and an event refused on its own is parked as read by `group`
    /// ([`crate::kafka::parked`]): one bad record from another producer never stops the read
    /// model. An `Err` is an outage.
    pub async fn apply_or_park(
        &self,
        group: &str,
        messages: &[IncomingMessage],
    ) -> anyhow::Result<Applied> {
        match self.apply(messages).await {
            Err(error) if is_data_error(&error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "a batch of delivery events was refused; applying them one by one"
                );
                let results = parked::replay_alone(&self.db, group, messages, |message| {
                    self.apply(std::slice::from_ref(message))
                })
                .await?;
                let mut total = Applied::default();
                for result in results {
                    match result {
                        Some(one) => {
                            total.applied += one.applied;
                            total.stale += one.stale;
                            total.unreadable += one.unreadable;
                        }
                        None => total.parked += 1,
                    }
                }
                Ok(total)
            }
            other => other,
        }
    }

    /// Applies a batch in one transaction per 2,000 deliveries (`DELIVERIES_PER_TRANSACTION`),
    /// each in a fixed number of statements whatever its size: lock the deliveries, read
    /// their log rows, fold the events in memory (in version order per delivery, exactly as
    /// applying them one by one would), then write every changed row in one upsert and the
    /// statistics once per key. All events of one delivery go to the same transaction, so
    /// a delivery created and finished within the batch is written once.
    pub async fn apply(&self, messages: &[IncomingMessage]) -> anyhow::Result<Applied> {
        let mut outcome = Applied::default();
        let mut events = Vec::with_capacity(messages.len());
        for message in messages {
            match serde_json::from_slice::<DeliveryEventIn>(&message.payload) {
                Ok(event) => events.push(event),
                Err(_) => {
                    tracing::warn!(topic = %message.topic, offset = message.offset, "not a delivery event; skipped");
                    outcome.unreadable += 1;
                }
            }
        }
        events.sort_by_key(|e| (e.delivery_id, e.version));
        let deliveries: Vec<&[DeliveryEventIn]> = events
            .chunk_by(|a, b| a.delivery_id == b.delivery_id)
            .collect();
        for part in deliveries.chunks(DELIVERIES_PER_TRANSACTION) {
            let (applied, stale) = self.apply_deliveries(part).await?;
            outcome.applied += applied;
            outcome.stale += stale;
            metrics::counter!("herald_projector_events_total", "outcome" => "applied")
                .increment(applied as u64);
            metrics::counter!("herald_projector_events_total", "outcome" => "stale")
                .increment(stale as u64);
        }
        Ok(outcome)
    }

    /// Applies the events of `deliveries` (each slice one delivery's, in version order) in
    /// one transaction; returns how many were applied and how many were stale.
    async fn apply_deliveries(
        &self,
        deliveries: &[&[DeliveryEventIn]],
    ) -> anyhow::Result<(usize, usize)> {
        let (mut applied, mut stale) = (0, 0);
        let ids: Vec<Uuid> = deliveries.iter().map(|d| d[0].delivery_id).collect();
        let mut tx = self.db.begin().await.context("Failed to begin")?;
        // Serialises appliers of one delivery even before its row exists, so the version
        // guard and the count-once rule hold; taken in one order (the ids') by every
        // applier, so two of them on overlapping batches cannot deadlock.
        crate::db::lock_ids_in_order(&mut tx, &ids, LOCK_SEED)
            .await
            .context("Failed to lock the deliveries")?;
        let rows: Vec<LogRow> = sqlx::query_as(
            "SELECT delivery_id, version, counted_status, counted_day, receipt_status \
             FROM notification_log WHERE delivery_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .context("Failed to read the log")?;
        let mut current: HashMap<Uuid, LogState> = rows
            .into_iter()
            .map(|row| {
                (
                    row.delivery_id,
                    LogState {
                        version: row.version,
                        counted: row.counted_status,
                        counted_day: row.counted_day,
                        receipt: row.receipt_status,
                    },
                )
            })
            .collect();

        let mut counts = Counts::new();
        let mut changed = Changes::default();
        for delivery in deliveries {
            let state = current.entry(delivery[0].delivery_id).or_insert(LogState {
                version: i64::MIN,
                counted: None,
                counted_day: None,
                receipt: None,
            });
            let mut newest = None;
            let mut receipt = None;
            for e in *delivery {
                if e.version <= state.version {
                    stale += 1;
                    continue;
                }
                applied += 1;
                state.version = e.version;
                newest = Some(e);
                if is_terminal(&e.status) && state.counted.as_deref() != Some(e.status.as_str()) {
                    if let (Some(old), Some(day)) = (&state.counted, state.counted_day) {
                        count(&mut counts, day, &e.channel, old, -1);
                    }
                    let day = e.updated_at.with_timezone(&self.reporting_tz).date_naive();
                    count(&mut counts, day, &e.channel, &e.status, 1);
                    state.counted = Some(e.status.clone());
                    state.counted_day = Some(day);
                }
                if let Some(new) = &e.receipt {
                    // Counted on the day its send was, so that day's delivered rate reads
                    // against that day's sends.
                    let day = state.counted_day.unwrap_or_else(|| {
                        e.updated_at.with_timezone(&self.reporting_tz).date_naive()
                    });
                    if state.receipt != Some(new.status) {
                        if let Some(old) = state.receipt {
                            count_receipt(&mut counts, day, &e.channel, old, -1);
                        }
                        count_receipt(&mut counts, day, &e.channel, new.status, 1);
                        state.receipt = Some(new.status);
                    }
                    receipt = Some(new);
                }
            }
            if let Some(e) = newest {
                changed.push(e, state, receipt);
            }
        }
        changed.write(&mut tx).await?;
        // The hot statistics rows are touched once per transaction, in key order.
        for ((day, channel), tally) in counts {
            add_counts(&mut tx, day, &channel, &tally).await?;
        }
        tx.commit()
            .await
            .context("Failed to commit the projection")?;
        Ok((applied, stale))
    }
}

/// Most deliveries one projector transaction takes. Each holds an advisory lock until the
/// commit, and PostgreSQL's lock table holds `max_locks_per_transaction` (64) times
/// `max_connections` locks for every session together (6,400 by default): a batch of
/// lingering events can name more deliveries than that.
const DELIVERIES_PER_TRANSACTION: usize = 2000;

/// The seed of the advisory lock key of a delivery's log row ([`crate::db::lock_ids_in_order`]):
/// notifications' status transitions lock theirs with another one.
pub(crate) const LOCK_SEED: i64 = 0;

fn is_terminal(status: &str) -> bool {
    matches!(status, "SUCCESS" | "FAILED" | "SKIPPED")
}

/// The part of a log row the projector folds a batch onto.
#[derive(sqlx::FromRow)]
struct LogRow {
    delivery_id: Uuid,
    version: i64,
    counted_status: Option<String>,
    counted_day: Option<NaiveDate>,
    receipt_status: Option<ReceiptStatus>,
}

/// What the projector knows of a delivery's log row while folding a batch.
struct LogState {
    /// The newest version applied (`i64::MIN` when there is no row yet).
    version: i64,
    /// The terminal outcome counted in delivery_stats, and on which day.
    counted: Option<String>,
    counted_day: Option<NaiveDate>,
    /// The receipt status counted in delivery_stats (the row's).
    receipt: Option<ReceiptStatus>,
}

/// The log rows a batch changes, as columns for one upsert.
#[derive(Default)]
struct Changes {
    delivery_ids: Vec<Uuid>,
    notification_ids: Vec<Uuid>,
    event_ids: Vec<Option<String>>,
    event_types: Vec<String>,
    user_ids: Vec<Option<i64>>,
    channels: Vec<String>,
    statuses: Vec<String>,
    attempts: Vec<i32>,
    errors: Vec<Option<String>>,
    versions: Vec<i64>,
    created: Vec<DateTime<Utc>>,
    updated: Vec<DateTime<Utc>>,
    completed: Vec<Option<DateTime<Utc>>>,
    counted: Vec<Option<String>>,
    counted_days: Vec<Option<NaiveDate>>,
    receipt_statuses: Vec<Option<ReceiptStatus>>,
    receipt_reasons: Vec<Option<String>>,
    receipt_permanent: Vec<Option<bool>>,
    receipt_at: Vec<Option<DateTime<Utc>>>,
    hold_reasons: Vec<Option<&'static str>>,
    hold_until: Vec<Option<DateTime<Utc>>>,
    digest_ids: Vec<Option<Uuid>>,
}

impl Changes {
    /// Adds a delivery's row as its newest event and the counting leave it, with the newest
    /// receipt of the batch (none keeps the row's).
    fn push(&mut self, e: &DeliveryEventIn, state: &LogState, receipt: Option<&ReceiptState>) {
        self.delivery_ids.push(e.delivery_id);
        self.notification_ids.push(e.notification_id);
        self.event_ids.push(e.event_id.clone());
        self.event_types.push(e.event_type.clone());
        self.user_ids.push(e.user_id);
        self.channels.push(e.channel.clone());
        self.statuses.push(e.status.clone());
        self.attempts.push(e.attempts);
        self.errors.push(e.error.clone());
        self.versions.push(e.version);
        self.created.push(e.created_at);
        self.updated.push(e.updated_at);
        self.completed
            .push(is_terminal(&e.status).then_some(e.updated_at));
        self.counted.push(state.counted.clone());
        self.counted_days.push(state.counted_day);
        self.receipt_statuses.push(receipt.map(|r| r.status));
        self.receipt_reasons
            .push(receipt.and_then(|r| r.reason.clone()));
        self.receipt_permanent.push(receipt.map(|r| r.permanent));
        self.receipt_at.push(receipt.map(|r| r.at));
        // A hold is the state of one PENDING version: any later event clears it.
        self.hold_reasons.push(e.hold.map(|h| h.reason.as_str()));
        self.hold_until.push(e.hold.map(|h| h.until));
        self.digest_ids.push(e.digest_id);
    }

    /// One upsert for every changed row (in delivery id order, as they were pushed).
    ///
    /// A new in-app row takes its read mark from the delivery: a user may mark a message
    /// read (it reached them through the live stream) while its events still linger in the
    /// projector, and that mark finds no log row to update.
    async fn write(&self, tx: &mut PgConnection) -> anyhow::Result<()> {
        if self.delivery_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO notification_log (delivery_id, notification_id, event_id, event_type, \
                 user_id, channel, status, attempts, last_error, version, created_at, updated_at, \
                 completed_at, counted_status, counted_day, receipt_status, receipt_reason, \
                 receipt_permanent, receipt_at, hold_reason, hold_until, digest_id, read_at) \
             SELECT u.*, CASE WHEN u.channel = 'IN_APP' THEN \
                     (SELECT d.read_at FROM deliveries d WHERE d.id = u.delivery_id) END \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int8[], \
                 $6::text[], $7::text[], $8::int4[], $9::text[], $10::int8[], \
                 $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], $14::text[], \
                 $15::date[], $16::text[], $17::text[], $18::bool[], $19::timestamptz[], \
                 $20::text[], $21::timestamptz[], $22::uuid[]) \
                 AS u(delivery_id, notification_id, event_id, event_type, user_id, \
                 channel, status, attempts, last_error, version, created_at, updated_at, \
                 completed_at, counted_status, counted_day, receipt_status, receipt_reason, \
                 receipt_permanent, receipt_at, hold_reason, hold_until, digest_id) \
             ON CONFLICT (delivery_id) DO UPDATE SET status = EXCLUDED.status, \
                 attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error, \
                 version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, \
                 completed_at = CASE WHEN notification_log.status = EXCLUDED.status \
                     THEN COALESCE(notification_log.completed_at, EXCLUDED.completed_at) \
                     ELSE EXCLUDED.completed_at END, \
                 counted_status = EXCLUDED.counted_status, counted_day = EXCLUDED.counted_day, \
                 receipt_status = COALESCE(EXCLUDED.receipt_status, notification_log.receipt_status), \
                 receipt_reason = CASE WHEN EXCLUDED.receipt_status IS NULL \
                     THEN notification_log.receipt_reason ELSE EXCLUDED.receipt_reason END, \
                 receipt_permanent = COALESCE(EXCLUDED.receipt_permanent, notification_log.receipt_permanent), \
                 receipt_at = COALESCE(EXCLUDED.receipt_at, notification_log.receipt_at), \
                 hold_reason = EXCLUDED.hold_reason, hold_until = EXCLUDED.hold_until, \
                 digest_id = COALESCE(EXCLUDED.digest_id, notification_log.digest_id) \
             WHERE notification_log.version < EXCLUDED.version",
        )
        .bind(&self.delivery_ids)
        .bind(&self.notification_ids)
        .bind(&self.event_ids)
        .bind(&self.event_types)
        .bind(&self.user_ids)
        .bind(&self.channels)
        .bind(&self.statuses)
        .bind(&self.attempts)
        .bind(&self.errors)
        .bind(&self.versions)
        .bind(&self.created)
        .bind(&self.updated)
        .bind(&self.completed)
        .bind(&self.counted)
        .bind(&self.counted_days)
        .bind(&self.receipt_statuses)
        .bind(&self.receipt_reasons)
        .bind(&self.receipt_permanent)
        .bind(&self.receipt_at)
        .bind(&self.hold_reasons)
        .bind(&self.hold_until)
        .bind(&self.digest_ids)
        .execute(&mut *tx)
        .await
        .context("Failed to write the log")?;
        Ok(())
    }
}

/// Changes to one delivery_stats row gathered over a batch.
#[derive(Debug, Default)]
struct Tally {
    success: i64,
    failed: i64,
    skipped: i64,
    /// Sends a provider reported DELIVERED.
    delivered: i64,
    /// Sends a provider reported UNDELIVERED or BOUNCED.
    undelivered: i64,
}

/// Changes to delivery_stats gathered over a batch, per (day, channel).
type Counts = std::collections::BTreeMap<(NaiveDate, String), Tally>;

fn count(counts: &mut Counts, day: NaiveDate, channel: &str, status: &str, delta: i64) {
    let entry = counts.entry((day, channel.to_owned())).or_default();
    match status {
        "SUCCESS" => entry.success += delta,
        "FAILED" => entry.failed += delta,
        _ => entry.skipped += delta,
    }
}

fn count_receipt(
    counts: &mut Counts,
    day: NaiveDate,
    channel: &str,
    status: ReceiptStatus,
    delta: i64,
) {
    let entry = counts.entry((day, channel.to_owned())).or_default();
    match status {
        ReceiptStatus::Delivered => entry.delivered += delta,
        ReceiptStatus::Undelivered | ReceiptStatus::Bounced => entry.undelivered += delta,
    }
}

async fn add_counts(
    tx: &mut PgConnection,
    day: NaiveDate,
    channel: &str,
    tally: &Tally,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO delivery_stats (day, channel, success, failed, skipped, delivered, undelivered) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (day, channel) DO UPDATE SET success = delivery_stats.success + EXCLUDED.success, \
             failed = delivery_stats.failed + EXCLUDED.failed, \
             skipped = delivery_stats.skipped + EXCLUDED.skipped, \
             delivered = delivery_stats.delivered + EXCLUDED.delivered, \
             undelivered = delivery_stats.undelivered + EXCLUDED.undelivered",
    )
    .bind(day)
    .bind(channel)
    .bind(tally.success)
    .bind(tally.failed)
    .bind(tally.skipped)
    .bind(tally.delivered)
    .bind(tally.undelivered)
    .execute(&mut *tx)
    .await
    .context("Failed to count")?;
    Ok(())
}

/// The name parked records of a rebuild go under (a rebuild reads without a group of its
/// own that operators would know).
const REBUILD_GROUP: &str = "read-model-rebuild";

/// What a rebuild did.
#[derive(Debug, Clone, Default)]
pub struct Rebuilt {
    pub events: usize,
    pub deliveries: i64,
}

/// Empties both tables and replays notification.delivery.events from the beginning up to
/// the end it has now (the projector group, if running, applies what comes after; the
/// version guard makes the overlap harmless). In-app read state, which is not an event,
/// is restored from the deliveries.
pub async fn rebuild(projector: &Projector, kafka: &KafkaSettings) -> anyhow::Result<Rebuilt> {
    let topic = format!("{}{DELIVERY_EVENTS_TOPIC}", kafka.topic_prefix);
    let consumer: StreamConsumer = crate::kafka::consumer_config(kafka)
        .set("group.id", format!("herald-rebuild-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .context("Failed to create the rebuild consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .context("Failed to read topic metadata")?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .context("no such topic")?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(10))
            .context("Failed to read watermarks")?;
        if high > low {
            ends.push((partition, high));
        }
        assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;

    let mut tx = projector.db.begin().await?;
    sqlx::query("TRUNCATE notification_log, delivery_stats")
        .execute(&mut *tx)
        .await
        .context("Failed to empty the read model")?;
    tx.commit().await?;

    let mut rebuilt = Rebuilt::default();
    let mut done: Vec<bool> = ends.iter().map(|_| false).collect();
    let mut batch = Vec::new();
    loop {
        // Past the watermarks read when the rebuild began, keep going until the topic has
        // been quiet for a moment: a watermark can trail the last record of a batch.
        let caught_up = done.iter().all(|d| *d);
        let wait = if caught_up {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(30)
        };
        let message = match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(message) => detach(&message?),
            Err(_) if caught_up => break,
            Err(_) => anyhow::bail!("the topic stopped delivering before its end"),
        };
        if let Some(i) = ends.iter().position(|(p, _)| *p == message.partition)
            && message.offset + 1 >= ends[i].1
        {
            done[i] = true;
        }
        batch.push(message);
        if batch.len() >= 500 {
            rebuilt.events += batch.len();
            projector.apply_or_park(REBUILD_GROUP, &batch).await?;
            batch.clear();
        }
    }
    rebuilt.events += batch.len();
    projector.apply_or_park(REBUILD_GROUP, &batch).await?;
    sqlx::query(
        "UPDATE notification_log l SET read_at = d.read_at FROM deliveries d \
         WHERE d.id = l.delivery_id AND d.read_at IS NOT NULL",
    )
    .execute(&projector.db)
    .await
    .context("Failed to restore read state")?;
    rebuilt.deliveries = sqlx::query_scalar("SELECT count(*) FROM notification_log")
        .fetch_one(&projector.db)
        .await?;
    Ok(rebuilt)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::delivery_left_open;
    use crate::{
        domain::{Channel, DeliveryStatus, Domain},
        kafka::consumer::IncomingMessage,
        outbox::DeliveryEvent,
    };

    fn message(payload: Vec<u8>) -> IncomingMessage {
        IncomingMessage {
            topic: "notification.delivery.events".to_owned(),
            partition: 0,
            offset: 0,
            key: None,
            payload,
            headers: Vec::new(),
            timestamp: None,
        }
    }

    fn event(status: DeliveryStatus) -> DeliveryEvent {
        DeliveryEvent {
            delivery_id: Uuid::new_v4(),
            notification_id: Uuid::new_v4(),
            event_id: Some("e-1".to_owned()),
            event_type: "PAYMENT_COMPLETED".to_owned(),
            user_id: Some(7),
            domain: Domain::Payment,
            channel: Channel::Slack,
            status,
            attempts: 1,
            error: Some("a \"quoted\" reason".to_owned()),
            version: 2,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            receipt: None,
            replay: None,
            hold: None,
            digest_id: None,
        }
    }

    #[test]
    fn a_delivery_event_as_published_tells_its_delivery_and_whether_it_is_still_open() {
        for (status, open) in [
            (DeliveryStatus::Pending, true),
            (DeliveryStatus::Success, false),
            (DeliveryStatus::Failed, false),
            (DeliveryStatus::Skipped, false),
        ] {
            let event = event(status);
            let published = event.to_outbox("");
            assert_eq!(
                delivery_left_open(&message(published.payload)),
                Some((event.delivery_id, open)),
                "{status}"
            );
        }
        assert_eq!(delivery_left_open(&message(b"not json".to_vec())), None);
        assert_eq!(
            delivery_left_open(&message(
                br#"{"deliveryId":"x","status":"SUCCESS"}"#.to_vec()
            )),
            None
        );
    }
}
