//! Group commit for the HTTP intake (issue 14): concurrent `POST /api/v1/notifications`
//! requests share one transaction (one WAL flush), most often a single statement.
//!
//! Each request used to take a transaction of its own: BEGIN, three INSERTs and a COMMIT
//! that waits for its WAL flush, so at 500 requests/s PostgreSQL ran 2,500 statements and
//! 500 flushes a second for the intake alone, on the same two cores as everything else. A
//! request now hands its prepared notification to one of a few writers and waits for the
//! answer. A writer takes what is queued (at most [`MAX_BATCH`]), stores it with the
//! statement [`super::insert`] uses for a Kafka batch, commits once and answers each
//! request. It never waits for a batch to fill: an idle instance writes each request at
//! once, and a busy one writes what arrived while the previous commit was flushing, so
//! batches grow with the load and the number of commits does not. A batch that joins no
//! digest is that one statement alone, committed by itself: no BEGIN and no COMMIT to
//! wait for.
//!
//! A request is answered only after the commit that stored it, as before. A batch
//! PostgreSQL refuses is written again one request at a time, so a bad one fails alone.
//!
//! A request with an Idempotency-Key claims the key, with its answer, in the statement that
//! stores its notification ([`KeyClaim`], [`claim_sql`]), so that a key exists exactly when
//! its notification does. When another request with the same key was stored first (in
//! another writer's statement, or on another instance), nothing of this one is stored and
//! it is answered [`Stored::KeyTaken`]: the caller replays the other's answer. The rest of
//! its batch is stored all the same, in the same statement; a copy of a key already in the
//! batch waits for the first copy's fate. Keys are inserted in one order in every
//! statement (and pruned in the same order), so two statements cannot deadlock on them.
//! A batch that joins a digest is a transaction of two statements (the join, then the
//! store), and the digests its taken requests joined are not theirs to keep: it is rolled
//! back and written again without them, which only concurrent copies of one request cause.

use std::{collections::HashSet, sync::Arc, time::Duration};

use anyhow::Context;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};

use uuid::Uuid;

use super::{NewNotification, due_channels, insert_claiming, joins_digest};
use crate::db::PgQuery;
use crate::dispatch::wakeup::Wakeup;

/// Requests one batch stores at most.
pub const MAX_BATCH: usize = 128;

/// Writers per instance: transactions of the intake open at once.
const WRITERS: usize = 4;

/// Requests queued for the writers before a request waits for room.
const QUEUE: usize = 4096;

/// An Idempotency-Key to store with a request's notification.
pub struct KeyClaim {
    /// The name of the credential the key is scoped to.
    pub credential: String,
    /// The Idempotency-Key header's value.
    pub key: String,
    /// The digest of the request body, compared when the key comes again.
    pub request_hash: String,
    /// The 202 body kept with the key, built from the notification as stored.
    pub answer: fn(&NewNotification) -> anyhow::Result<Value>,
}

/// What became of a request handed to [`IntakeWriter::store`].
#[derive(Debug)]
pub enum Stored {
    /// Committed: the notification as stored (a digest it joined sets its deliveries'
    /// due time).
    New(Box<NewNotification>),
    /// Nothing was stored: another request with the same Idempotency-Key was stored
    /// first, and its answer is the one to give.
    KeyTaken,
}

/// A request waiting to be stored.
struct Job {
    notification: NewNotification,
    key: Option<KeyClaim>,
    answer: oneshot::Sender<anyhow::Result<Stored>>,
}

/// Hands notifications to the intake's writers (cheap to clone).
#[derive(Clone)]
pub struct IntakeWriter {
    queue: mpsc::Sender<Job>,
}

impl IntakeWriter {
    /// Starts the writers on `db`; they stop once every handle is dropped and the queue is
    /// empty. A stored Idempotency-Key older than `key_ttl` is replaced by a new request
    /// with the same key.
    pub fn start(db: PgPool, topic_prefix: String, wakeup: Wakeup, key_ttl: Duration) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..WRITERS {
            let writer = Writer {
                db: db.clone(),
                topic_prefix: topic_prefix.clone(),
                wakeup: wakeup.clone(),
                key_ttl,
                jobs: jobs.clone(),
            };
            tokio::spawn(writer.run());
        }
        IntakeWriter { queue }
    }

    /// Stores a notification, its deliveries and their events, and `key` with its answer
    /// when given; answers once the batch that stored it committed.
    pub async fn store(
        &self,
        notification: NewNotification,
        key: Option<KeyClaim>,
    ) -> anyhow::Result<Stored> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Job {
                notification,
                key,
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
    key_ttl: Duration,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
}

/// The requests of one transaction, in parallel vectors (the statements take a slice of
/// notifications).
#[derive(Default)]
struct Batch {
    notifications: Vec<NewNotification>,
    keys: Vec<Option<KeyClaim>>,
    answers: Vec<oneshot::Sender<anyhow::Result<Stored>>>,
}

impl Batch {
    fn push(&mut self, job: Job) {
        self.notifications.push(job.notification);
        self.keys.push(job.key);
        self.answers.push(job.answer);
    }

    fn len(&self) -> usize {
        self.notifications.len()
    }

    fn is_empty(&self) -> bool {
        self.notifications.is_empty()
    }

    /// Takes out the requests whose caller stopped waiting (its client went away, or the
    /// API's request timeout answered 503): nobody was told they were accepted, so they are
    /// not stored.
    fn drop_abandoned(&mut self) {
        for i in (0..self.len()).rev() {
            if self.answers[i].is_closed() {
                self.notifications.remove(i);
                self.keys.remove(i);
                self.answers.remove(i);
            }
        }
    }

    /// Takes out the requests at `indices` (ascending) and answers them `KeyTaken`.
    fn answer_taken(&mut self, indices: &[usize]) {
        for &i in indices.iter().rev() {
            self.notifications.remove(i);
            self.keys.remove(i);
            let _ = self.answers.remove(i).send(Ok(Stored::KeyTaken));
        }
    }

    /// Answers every request: stored, or failed with `error`.
    fn answer_all(self, error: Option<&str>) {
        for (notification, answer) in self.notifications.into_iter().zip(self.answers) {
            let _ = answer.send(match error {
                None => Ok(Stored::New(Box::new(notification))),
                Some(error) => Err(anyhow::anyhow!("{error}")),
            });
        }
    }
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
    async fn write(&self, jobs: Vec<Job>) {
        let mut batch = Batch::default();
        // A second request with a key already in the batch waits for the first's fate.
        let mut repeated = Vec::new();
        let mut keys = HashSet::new();
        // A request abandoned while it waited (its client went away, or the API's request
        // timeout answered 503) is not stored: nobody was told it was accepted.
        for job in jobs.into_iter().filter(|job| !job.answer.is_closed()) {
            match &job.key {
                Some(k) if !keys.insert((k.credential.clone(), k.key.clone())) => {
                    repeated.push(job.answer)
                }
                _ => batch.push(job),
            }
        }
        if !batch.is_empty() {
            self.write_batch(batch).await;
        }
        for answer in repeated {
            let _ = answer.send(Ok(Stored::KeyTaken));
        }
    }

    /// [`Self::write`] for a batch without repeated keys.
    async fn write_batch(&self, mut batch: Batch) {
        match self.commit_until_stored(&mut batch).await {
            Ok(()) => batch.answer_all(None),
            Err(Failed {
                error,
                refused: true,
            }) if batch.len() > 1 => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    requests = batch.len(),
                    "PostgreSQL refused an intake batch; writing its requests one at a time"
                );
                let Batch {
                    notifications,
                    keys,
                    answers,
                } = batch;
                for ((notification, key), answer) in
                    notifications.into_iter().zip(keys).zip(answers)
                {
                    let mut one = Batch::default();
                    one.push(Job {
                        notification,
                        key,
                        answer,
                    });
                    match self.commit_until_stored(&mut one).await {
                        Ok(()) => one.answer_all(None),
                        Err(failed) => one.answer_all(Some(&format!("{:#}", failed.error))),
                    }
                }
            }
            Err(Failed { error, .. }) => {
                batch.answer_all(Some(&format!("{error:#}")));
            }
        }
    }

    /// Commits the batch, taking out (and answering) the requests whose key another request
    /// holds. Ends with the batch stored, or empty.
    async fn commit_until_stored(&self, batch: &mut Batch) -> Result<(), Failed> {
        loop {
            // Checked again before every pass: a pass rolled back for a taken key may have
            // waited on that key for as long as its holder took to commit.
            batch.drop_abandoned();
            if batch.is_empty() {
                return Ok(());
            }
            let pass = self.commit(batch).await?;
            batch.answer_taken(&pass.taken);
            if pass.committed {
                return Ok(());
            }
            tracing::debug!(
                requests = pass.taken.len(),
                "another request stored these requests' Idempotency-Keys first; writing the batch without them"
            );
        }
    }

    /// One pass over the batch; wakes the dispatchers when it stored a send. A batch that
    /// joins no digest is [`insert_claiming`]'s one statement, atomic on its own, so it goes
    /// without BEGIN and COMMIT: under load each round trip to PostgreSQL waits for a core,
    /// and these were two of the three a request paid for (BENCHMARKS.md, "One statement
    /// per intake batch").
    async fn commit(&self, batch: &mut Batch) -> Result<Pass, Failed> {
        if !joins_digest(&batch.notifications) {
            let mut conn = self
                .db
                .acquire()
                .await
                .context("Failed to reach PostgreSQL")
                .map_err(Failed::not_refused)?;
            let stored = self.store(&mut conn, batch).await.map_err(|error| {
                // PostgreSQL's own error means the statement stored nothing. Any other
                // failure, a connection lost during it, leaves that unknown, as after a
                // failed COMMIT.
                if crate::db::is_refusal(&error) {
                    Failed::refused(error)
                } else {
                    Failed::not_refused(error)
                }
            })?;
            self.wakeup.wake(stored.due);
            return Ok(Pass {
                taken: stored.taken,
                committed: true,
            });
        }
        let mut tx = self
            .db
            .begin()
            .await
            .context("Failed to begin a transaction")
            .map_err(Failed::not_refused)?;
        let stored = self.store(&mut tx, batch).await.map_err(Failed::refused)?;
        if !stored.taken.is_empty() {
            tx.rollback()
                .await
                .context("Failed to roll back")
                .map_err(Failed::not_refused)?;
            return Ok(Pass {
                taken: stored.taken,
                committed: false,
            });
        }
        tx.commit()
            .await
            .context("Failed to commit the notification")
            .map_err(Failed::not_refused)?;
        self.wakeup.wake(stored.due);
        Ok(Pass {
            taken: Vec::new(),
            committed: true,
        })
    }

    /// Stores the batch with its keys on `conn` ([`insert_claiming`]).
    async fn store(
        &self,
        conn: &mut PgConnection,
        batch: &mut Batch,
    ) -> anyhow::Result<StoredBatch> {
        let stored = insert_claiming(
            conn,
            &mut batch.notifications,
            &batch.keys,
            self.key_ttl,
            &self.topic_prefix,
        )
        .await?;
        let due = due_channels(&stored);
        let stored: HashSet<Uuid> = stored.iter().map(|n| n.id).collect();
        let taken = (0..batch.len())
            .filter(|&i| !stored.contains(&batch.notifications[i].id))
            .collect();
        Ok(StoredBatch { due, taken })
    }
}

/// What one pass over a batch did.
struct Pass {
    /// The requests (indices, ascending) whose Idempotency-Key another request holds: not
    /// stored.
    taken: Vec<usize>,
    /// False when the pass was rolled back: the rest of the batch is to be written again.
    committed: bool,
}

/// What storing a batch's statement did, before its commit.
struct StoredBatch {
    /// The channels given a delivery to send.
    due: std::collections::BTreeSet<crate::domain::Channel>,
    /// The requests (indices, ascending) left out because another request holds their key.
    taken: Vec<usize>,
}

/// The CTEs that claim a batch's Idempotency-Keys in [`super::insert_rows`]'s statement,
/// with their parameters numbered from `$first` in the order [`Claims::bind`] binds them:
/// `claimed`, the keys stored (new, or in place of an expired one), then `taken`, the ids
/// of the notifications whose key another request holds, which the statement leaves out.
/// A key another transaction holds uncommitted makes the statement wait for it; keys are
/// inserted in (credential, key) order, bytewise, the order pruning locks them in, so two
/// statements waiting on each other's keys cannot deadlock.
pub(crate) fn claim_sql(first: usize) -> String {
    let [ids, credentials, keys, hashes, answers, ttl] = std::array::from_fn(|i| first + i);
    format!(
        "claimed AS ( \
             INSERT INTO idempotency_keys (credential, idempotency_key, request_hash, \
                 response_status, response_body) \
             SELECT c, k, h, 202, b::jsonb FROM UNNEST(${credentials}::text[], ${keys}::text[], \
                 ${hashes}::text[], ${answers}::text[]) WITH ORDINALITY AS t(c, k, h, b, n) \
             ORDER BY n \
             ON CONFLICT (credential, idempotency_key) DO UPDATE SET \
                 request_hash = EXCLUDED.request_hash, \
                 response_status = EXCLUDED.response_status, \
                 response_body = EXCLUDED.response_body, created_at = now() \
             WHERE idempotency_keys.created_at <= now() - ${ttl}::interval \
             RETURNING credential, idempotency_key), \
         taken AS ( \
             SELECT t.id FROM UNNEST(${ids}::uuid[], ${credentials}::text[], ${keys}::text[]) \
                 AS t(id, c, k) \
             WHERE (t.c, t.k) NOT IN (SELECT credential, idempotency_key FROM claimed))"
    )
}

/// A batch's Idempotency-Keys as the parameters of [`claim_sql`], in (credential, key)
/// order, each with its notification's id and the answer it replays.
pub(crate) struct Claims<'a> {
    ids: Vec<Uuid>,
    credentials: Vec<&'a str>,
    keys: Vec<&'a str>,
    hashes: Vec<&'a str>,
    answers: Vec<String>,
    ttl: Duration,
}

impl<'a> Claims<'a> {
    /// The claims of `keys` (`keys[i]` is `notifications[i]`'s, if it has one), expiring
    /// after `ttl`; `None` when no notification has a key. A (credential, key) appears at
    /// most once: `ON CONFLICT` cannot touch one row twice in a statement, so the writer
    /// keeps a second copy out of the batch until the first's fate is known.
    pub(crate) fn new(
        notifications: &[NewNotification],
        keys: &'a [Option<KeyClaim>],
        ttl: Duration,
    ) -> anyhow::Result<Option<Self>> {
        let mut claimed: Vec<(&NewNotification, &KeyClaim)> = notifications
            .iter()
            .zip(keys)
            .filter_map(|(n, k)| Some((n, k.as_ref()?)))
            .collect();
        if claimed.is_empty() {
            return Ok(None);
        }
        claimed.sort_by(|(_, a), (_, b)| (&a.credential, &a.key).cmp(&(&b.credential, &b.key)));
        debug_assert!(
            claimed
                .windows(2)
                .all(|w| (&w[0].1.credential, &w[0].1.key) != (&w[1].1.credential, &w[1].1.key)),
            "a key claimed twice in one statement"
        );
        let mut claims = Claims {
            ids: Vec::with_capacity(claimed.len()),
            credentials: Vec::with_capacity(claimed.len()),
            keys: Vec::with_capacity(claimed.len()),
            hashes: Vec::with_capacity(claimed.len()),
            answers: Vec::with_capacity(claimed.len()),
            ttl,
        };
        for (notification, claim) in claimed {
            claims.ids.push(notification.id);
            claims.credentials.push(&claim.credential);
            claims.keys.push(&claim.key);
            claims.hashes.push(&claim.request_hash);
            claims
                .answers
                .push((claim.answer)(notification)?.to_string());
        }
        Ok(Some(claims))
    }

    /// Binds the claims, in the order of [`claim_sql`]'s parameters.
    pub(crate) fn bind<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query
            .bind(&self.ids)
            .bind(&self.credentials)
            .bind(&self.keys)
            .bind(&self.hashes)
            .bind(&self.answers)
            .bind(self.ttl)
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
    fn refused(error: anyhow::Error) -> Self {
        Failed {
            error,
            refused: true,
        }
    }

    fn not_refused(error: anyhow::Error) -> Self {
        Failed {
            error,
            refused: false,
        }
    }
}
