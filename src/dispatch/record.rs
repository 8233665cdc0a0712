//! Group commit of finished sends.
//!
//! Every send ends with one record: the delivery's new state, its attempt and its outbox
//! messages, written in one transaction. Written one by one, each record costs a
//! transaction and a WAL flush of its own, and that, not the sending, bounded the
//! dispatcher (about 1,200 deliveries/s on the benchmark machine). Here a send queues its
//! record and waits; whichever waiting send gets the writer slot takes every record
//! queued so far (up to [`MAX_BATCH`]) and writes them in one transaction of at most four
//! statements. While one batch commits the next one gathers, so batches grow with the
//! load and a lone send is written at once, with no timer.
//!
//! A send that succeeds on its delivery's first attempt, the common case, writes no
//! `delivery_attempts` row: its start and latency go onto the delivery in the UPDATE that
//! records the success anyway (migration 0009). That row was 2 of the 22 row versions of
//! an event with two deliveries (issue 14). Failures and every later attempt keep their
//! row for audit; the view `delivery_attempt_log` shows both sources as one.
//!
//! Each caller still learns its own outcome, and only after its record is durable: the
//! send's concurrency slot stays held until then, so the sends whose outcome can be lost
//! in a crash are still at most the sends in flight. A batch that PostgreSQL refuses for
//! a value in it is written again record by record, so one bad record cannot keep the
//! others from being written; a deadlock is retried; in an outage the whole batch fails at
//! once (its deliveries are claimed again when their lease runs out).

use std::sync::Mutex;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{Semaphore, oneshot};
use uuid::Uuid;

use crate::{
    db::{is_data_error, is_lost_race},
    domain::Channel,
    outbox::{self, DeliveryEvent, OutboxMessage},
};

/// The most records one transaction writes.
pub const MAX_BATCH: usize = 512;

/// Transactions writing records at once.
const WRITERS: usize = 1;

/// A finished send, ready to be written.
#[derive(Debug)]
pub struct Finished {
    /// The delivery's new state (id, status, attempts, error) as it will be published;
    /// its version and time are set from the row when written.
    pub event: DeliveryEvent,
    /// The lease of the claim: the record is written only while it still holds.
    pub lease_until: DateTime<Utc>,
    /// Set when the delivery goes back to PENDING for a retry.
    pub retry_in_ms: Option<i64>,
    pub error_class: Option<String>,
    /// The channel it went out on, when that is a fallback.
    pub sent_via: Option<Channel>,
    pub provider_ref: Option<String>,
    /// The channel the attempt used.
    pub via: Channel,
    pub started_at: DateTime<Utc>,
    pub latency_ms: i32,
    /// The attempt's outcome: SUCCESS, RETRYABLE or PERMANENT.
    pub outcome: &'static str,
    pub dead_letter: Option<OutboxMessage>,
}

impl Finished {
    /// A success on the delivery's first attempt: its timing is kept on the delivery row
    /// instead of an attempt row of its own.
    fn is_first_time_success(&self) -> bool {
        self.event.attempts == 1 && self.outcome == "SUCCESS"
    }
}

/// Whether a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Recorded,
    /// The lease ran out during the send and another worker owns the delivery now.
    LeaseLost,
}

type Reply = oneshot::Sender<Result<Written, String>>;

/// The queue of records waiting to be written, shared by every send of a dispatcher.
pub struct Recorder {
    queue: Mutex<Vec<(Finished, Reply)>>,
    writers: Semaphore,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            queue: Mutex::new(Vec::new()),
            writers: Semaphore::new(WRITERS),
        }
    }
}

impl Recorder {
    /// Writes `finished` (in a batch with whatever else is waiting) and returns once it is
    /// committed.
    pub async fn record(
        &self,
        db: &PgPool,
        topic_prefix: &str,
        finished: Finished,
    ) -> anyhow::Result<Written> {
        let (reply, mut answer) = oneshot::channel();
        self.lock().push((finished, reply));
        loop {
            tokio::select! {
                biased;
                answer = &mut answer => {
                    return answer
                        .context("the record's writer stopped")?
                        .map_err(anyhow::Error::msg);
                }
                permit = self.writers.acquire() => {
                    let _permit = permit.context("the recorder is closed")?;
                    let batch: Vec<(Finished, Reply)> = {
                        let mut queue = self.lock();
                        let n = queue.len().min(MAX_BATCH);
                        queue.drain(..n).collect()
                    };
                    if batch.is_empty() {
                        // Another writer took ours; its answer comes on `answer`.
                        drop(_permit);
                        return answer
                            .await
                            .context("the record's writer stopped")?
                            .map_err(anyhow::Error::msg);
                    }
                    write_and_answer(db, topic_prefix, batch).await;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Finished, Reply)>> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn write_and_answer(db: &PgPool, topic_prefix: &str, batch: Vec<(Finished, Reply)>) {
    let (records, replies): (Vec<Finished>, Vec<Reply>) = batch.into_iter().unzip();
    metrics::histogram!("herald_dispatch_record_batch_size").record(records.len() as f64);
    match write_retrying(db, topic_prefix, &records).await {
        Ok(written) => {
            for (reply, written) in replies.into_iter().zip(written) {
                let _ = reply.send(Ok(written));
            }
        }
        // A value PostgreSQL refuses sinks the whole batch: write the records one by one
        // so that only its own record fails.
        Err(error) if records.len() > 1 && is_data_error(&error) => {
            tracing::warn!(
                records = records.len(),
                error = format!("{error:#}"),
                "a batch of send records was refused; writing them one by one"
            );
            for (record, reply) in records.iter().zip(replies) {
                let result = write_retrying(db, topic_prefix, std::slice::from_ref(record)).await;
                let _ = reply.send(
                    result
                        .map(|written| written[0])
                        .map_err(|e| format!("{e:#}")),
                );
            }
        }
        // The database is unreachable or failing: every record fails alike, at once. The
        // deliveries stay PROCESSING and are claimed again when their lease runs out.
        Err(error) => {
            let message = format!("{error:#}");
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
}

/// [`write`], run again when it lost a race (a deadlock with another transaction
/// updating the same deliveries, such as marking in-app messages read).
async fn write_retrying(
    db: &PgPool,
    topic_prefix: &str,
    records: &[Finished],
) -> anyhow::Result<Vec<Written>> {
    let mut tries = 0;
    loop {
        tries += 1;
        match write(db, topic_prefix, records).await {
            Err(error) if tries < 3 && is_lost_race(&error) => {
                tracing::debug!(
                    error = format!("{error:#}"),
                    "send records lost a race; again"
                );
            }
            other => return other,
        }
    }
}

/// Writes the records in one transaction: the deliveries' new states (only where the
/// claim's lease still holds, with a first-time success's timing), the other records'
/// attempts and their outbox messages.
async fn write(
    db: &PgPool,
    topic_prefix: &str,
    records: &[Finished],
) -> anyhow::Result<Vec<Written>> {
    let ids: Vec<Uuid> = records.iter().map(|r| r.event.delivery_id).collect();
    let leases: Vec<DateTime<Utc>> = records.iter().map(|r| r.lease_until).collect();
    let statuses: Vec<&str> = records.iter().map(|r| r.event.status.as_str()).collect();
    let attempts: Vec<i32> = records.iter().map(|r| r.event.attempts).collect();
    let retry_ms: Vec<Option<i64>> = records.iter().map(|r| r.retry_in_ms).collect();
    let errors: Vec<Option<&str>> = records.iter().map(|r| r.event.error.as_deref()).collect();
    let classes: Vec<Option<&str>> = records.iter().map(|r| r.error_class.as_deref()).collect();
    let sent_via: Vec<Option<&str>> = records
        .iter()
        .map(|r| r.sent_via.map(Channel::as_str))
        .collect();
    let provider_refs: Vec<Option<&str>> =
        records.iter().map(|r| r.provider_ref.as_deref()).collect();
    let first_started: Vec<Option<DateTime<Utc>>> = records
        .iter()
        .map(|r| r.is_first_time_success().then_some(r.started_at))
        .collect();
    let first_latencies: Vec<Option<i32>> = records
        .iter()
        .map(|r| r.is_first_time_success().then_some(r.latency_ms))
        .collect();

    let mut tx = db.begin().await.context("Failed to begin")?;
    // `n` says which record a row answers: the same delivery can be queued twice when a
    // record waited past its lease and the delivery was claimed again; only the record
    // holding the current lease matches.
    let rows: Vec<(i64, i64, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE deliveries d SET status = t.status, attempts = t.attempt, lease_until = NULL, \
             next_attempt_at = COALESCE(now() + t.retry_ms * interval '1 millisecond', d.next_attempt_at), \
             last_error = t.error, error_class = t.class, sent_via = t.sent_via, \
             provider_ref = CASE WHEN t.status = 'SUCCESS' THEN t.provider_ref ELSE d.provider_ref END, \
             completed_at = CASE WHEN t.status = 'PENDING' THEN d.completed_at ELSE now() END, \
             first_attempt_started_at = COALESCE(t.first_started, d.first_attempt_started_at), \
             first_attempt_latency_ms = COALESCE(t.first_latency, d.first_attempt_latency_ms), \
             updated_at = now(), version = d.version + 1 \
         FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::int[], $5::bigint[], \
                 $6::text[], $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::int[]) \
             WITH ORDINALITY \
             AS t(id, lease_until, status, attempt, retry_ms, error, class, sent_via, provider_ref, \
                 first_started, first_latency, n) \
         WHERE d.id = t.id AND d.status = 'PROCESSING' AND d.lease_until = t.lease_until \
         RETURNING t.n, d.version, d.updated_at",
    )
    .bind(&ids)
    .bind(&leases)
    .bind(&statuses)
    .bind(&attempts)
    .bind(&retry_ms)
    .bind(&errors)
    .bind(&classes)
    .bind(&sent_via)
    .bind(&provider_refs)
    .bind(&first_started)
    .bind(&first_latencies)
    .fetch_all(&mut *tx)
    .await
    .context("Failed to record sends")?;

    let mut written = vec![Written::LeaseLost; records.len()];
    let mut messages = Vec::with_capacity(rows.len() * 2);
    let mut attempts = Vec::with_capacity(rows.len());
    for (n, version, at) in rows {
        let i = usize::try_from(n - 1).context("a record's ordinal")?;
        written[i] = Written::Recorded;
        let record = &records[i];
        let mut event = record.event.clone();
        event.version = version;
        event.updated_at = at;
        messages.push(event.to_outbox(topic_prefix));
        messages.extend(record.dead_letter.clone());
        if !record.is_first_time_success() {
            attempts.push(record);
        }
    }
    insert_attempts(&mut tx, &attempts).await?;
    outbox::insert(&mut tx, &messages).await?;
    tx.commit().await.context("Failed to commit send records")?;
    Ok(written)
}

/// Writes an attempt row for each record (those the deliveries' UPDATE did not take the
/// timing of).
async fn insert_attempts(tx: &mut sqlx::PgConnection, records: &[&Finished]) -> anyhow::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = records.iter().map(|r| r.event.delivery_id).collect();
    let attempts: Vec<i32> = records.iter().map(|r| r.event.attempts).collect();
    let channels: Vec<&str> = records.iter().map(|r| r.via.as_str()).collect();
    let started: Vec<DateTime<Utc>> = records.iter().map(|r| r.started_at).collect();
    let latencies: Vec<i32> = records.iter().map(|r| r.latency_ms).collect();
    let outcomes: Vec<&str> = records.iter().map(|r| r.outcome).collect();
    let errors: Vec<Option<&str>> = records.iter().map(|r| r.event.error.as_deref()).collect();
    sqlx::query(
        "INSERT INTO delivery_attempts (delivery_id, attempt, channel, started_at, latency_ms, outcome, error) \
         SELECT * FROM UNNEST($1::uuid[], $2::int[], $3::text[], $4::timestamptz[], $5::int[], \
             $6::text[], $7::text[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&channels)
    .bind(&started)
    .bind(&latencies)
    .bind(&outcomes)
    .bind(&errors)
    .execute(&mut *tx)
    .await
    .context("Failed to record attempts")?;
    Ok(())
}
