//! Group commit for the HTTP intake (issue 14): concurrent `POST /api/v1/notifications`
//! requests share one transaction.
//!
//! Each request used to take a transaction of its own: BEGIN, three INSERTs and a COMMIT
//! that waits for its WAL flush, so at 500 requests/s PostgreSQL ran 2,500 statements and
//! 500 flushes a second for the intake alone, on the same two cores as everything else. A
//! request now hands its prepared notification to one of a few writers and waits for the
//! answer. A writer takes what is queued (at most [`MAX_BATCH`]), stores it with the
//! statements [`super::insert`] uses for a Kafka batch, commits once and answers each
//! request. It never waits for a batch to fill: an idle instance writes each request at
//! once, and a busy one writes what arrived while the previous commit was flushing, so
//! batches grow with the load and the number of commits does not.
//!
//! A request is answered only after the commit that stored it, as before. A batch
//! PostgreSQL refuses is written again one request per transaction, so a bad one fails
//! alone. A request with an Idempotency-Key does not come here: its key is stored in its
//! own transaction, which rolls back when another request with the key committed first.

use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{NewNotification, has_sends, insert};
use crate::dispatch::wakeup::Wakeup;

/// Requests one transaction stores at most.
pub const MAX_BATCH: usize = 128;

/// Writers per instance: transactions of the intake open at once.
const WRITERS: usize = 4;

/// Requests queued for the writers before a request waits for room.
const QUEUE: usize = 4096;

/// A request waiting to be stored.
struct Job {
    notification: NewNotification,
    answer: oneshot::Sender<anyhow::Result<NewNotification>>,
}

/// Hands notifications to the intake's writers (cheap to clone).
#[derive(Clone)]
pub struct IntakeWriter {
    queue: mpsc::Sender<Job>,
}

impl IntakeWriter {
    /// Starts the writers on `db`; they stop once every handle is dropped and the queue is
    /// empty.
    pub fn start(db: PgPool, topic_prefix: String, wakeup: Wakeup) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..WRITERS {
            let writer = Writer {
                db: db.clone(),
                topic_prefix: topic_prefix.clone(),
                wakeup: wakeup.clone(),
                jobs: jobs.clone(),
            };
            tokio::spawn(writer.run());
        }
        IntakeWriter { queue }
    }

    /// Stores a notification, its deliveries and their events; returns it as stored (a
    /// digest it joined sets its deliveries' due time) once its transaction committed.
    pub async fn store(&self, notification: NewNotification) -> anyhow::Result<NewNotification> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Job {
                notification,
                answer,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the intake's writers have stopped"))?;
        answered
            .await
            .context("an intake writer stopped before answering")?
    }
}

/// One writer: takes what is queued, stores it in one transaction, answers.
struct Writer {
    db: PgPool,
    topic_prefix: String,
    wakeup: Wakeup,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
}

impl Writer {
    async fn run(self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            {
                let mut jobs = self.jobs.lock().await;
                if jobs.recv_many(&mut batch, MAX_BATCH).await == 0 {
                    return;
                }
            }
            self.write(std::mem::take(&mut batch)).await;
        }
    }

    /// Stores a batch and answers each of its requests. A batch whose statements
    /// PostgreSQL refuses is written again one request at a time, so that only a bad one
    /// fails. A batch that could not begin or commit fails whole: no request in it is to
    /// blame, and after a failed COMMIT nobody knows whether the batch was stored, so
    /// writing it again could store it twice.
    async fn write(&self, batch: Vec<Job>) {
        // A request abandoned while it waited (its client went away, or the API's request
        // timeout answered 503) is not stored: nobody was told it was accepted.
        let (mut notifications, answers): (Vec<NewNotification>, Vec<_>) = batch
            .into_iter()
            .filter(|job| !job.answer.is_closed())
            .map(|job| (job.notification, job.answer))
            .unzip();
        if notifications.is_empty() {
            return;
        }
        match self.commit(&mut notifications).await {
            Ok(()) => {
                for (notification, answer) in notifications.into_iter().zip(answers) {
                    let _ = answer.send(Ok(notification));
                }
            }
            Err(Failed {
                error,
                refused: true,
            }) if notifications.len() > 1 => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    requests = notifications.len(),
                    "PostgreSQL refused an intake batch; writing its requests one at a time"
                );
                for (notification, answer) in notifications.into_iter().zip(answers) {
                    let mut one = [notification];
                    let result = self.commit(&mut one).await.map_err(|failed| failed.error);
                    let [notification] = one;
                    let _ = answer.send(result.map(|()| notification));
                }
            }
            Err(Failed { error, .. }) => {
                let message = format!("{error:#}");
                for answer in answers {
                    let _ = answer.send(Err(anyhow::anyhow!("{message}")));
                }
            }
        }
    }

    /// One transaction for `notifications`; wakes the dispatchers when it stored a send.
    async fn commit(&self, notifications: &mut [NewNotification]) -> Result<(), Failed> {
        let mut tx = self
            .db
            .begin()
            .await
            .context("Failed to begin a transaction")
            .map_err(Failed::not_refused)?;
        let stored = insert(&mut tx, notifications, &self.topic_prefix)
            .await
            .map_err(|error| Failed {
                error,
                refused: true,
            })?;
        tx.commit()
            .await
            .context("Failed to commit the notification")
            .map_err(Failed::not_refused)?;
        if has_sends(&stored) {
            self.wakeup.wake();
        }
        Ok(())
    }
}

/// Why a batch was not stored.
struct Failed {
    error: anyhow::Error,
    /// PostgreSQL refused a statement of the batch (one request may be to blame), as
    /// opposed to a transaction that could not begin or commit.
    refused: bool,
}

impl Failed {
    fn not_refused(error: anyhow::Error) -> Self {
        Failed {
            error,
            refused: false,
        }
    }
}
