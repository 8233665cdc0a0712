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

use crate::{
    db::{is_data_error, is_lost_race},
    domain::Channel,
    outbox::{DeliveryEvent, OutboxMessage},
};

/// The outcome of a record that skips its delivery (a suppressed address) without an attempt.
pub const SKIPPED: &str = "SKIPPED";

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
    /// The lease of the claim: the record is written only while it still holds. `None`
    /// when the recording transaction holds the delivery's row locked, still PENDING
    /// ([`crate::deliveries::lock_due`]).
    pub lease_until: Option<DateTime<Utc>>,
    /// Set when the delivery goes back to PENDING for a retry.
    pub retry_in_ms: Option<i64>,
    pub error_class: Option<String>,
    /// The channel it went out on, when that is a fallback.
    pub sent_via: Option<Channel>,
    pub provider_ref: Option<String>,
    /// Poll the gateway for this send's receipt: first after this wait, until this deadline.
    pub poll: Option<(std::time::Duration, std::time::Duration)>,
    /// The channel the attempt used.
    pub via: Channel,
    pub started_at: DateTime<Utc>,
    pub latency_ms: i32,
    /// The attempt's outcome: SUCCESS, RETRYABLE or PERMANENT; [`SKIPPED`] when nothing
    /// was attempted.
    pub outcome: &'static str,
    pub dead_letter: Option<OutboxMessage>,
}

impl Finished {
    /// A success on the delivery's first attempt: its timing is kept on the delivery row
    /// instead of an attempt row of its own.
    pub fn is_first_time_success(&self) -> bool {
        self.event.attempts == 1 && self.outcome == "SUCCESS"
    }

    /// Whether the record writes a `delivery_attempts` row: every attempt but a first-time
    /// success, and not a skip (nothing was attempted).
    pub fn has_attempt_row(&self) -> bool {
        !self.is_first_time_success() && self.outcome != SKIPPED
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

    /// Writes `records` in one transaction of their own, outside the batches, all or none
    /// (none when any lease no longer holds): records that must stand or fall together (a
    /// digest's members).
    pub async fn record_together(
        &self,
        db: &PgPool,
        topic_prefix: &str,
        records: &[Finished],
    ) -> anyhow::Result<Vec<Written>> {
        write_retrying(db, topic_prefix, records, true).await
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
    match write_retrying(db, topic_prefix, &records, false).await {
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
                let result =
                    write_retrying(db, topic_prefix, std::slice::from_ref(record), false).await;
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
    together: bool,
) -> anyhow::Result<Vec<Written>> {
    let mut tries = 0;
    loop {
        tries += 1;
        match crate::deliveries::record(db, topic_prefix, records, together).await {
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
