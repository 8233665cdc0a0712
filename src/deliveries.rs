//! The `deliveries` table: every statement that changes a delivery, one function per
//! transition of its life (DESIGN §3): [`insert_sql`] (created PENDING or SKIPPED), [`claim`]
//! (PROCESSING under a lease), [`lock_due`] (held by the transaction that sends it and
//! records its outcome, for IN_APP and channels whose sends are quick), [`defer`] (PENDING again, no attempt counted), [`record`] (a
//! send's outcome: SUCCESS, PENDING for a retry, FAILED with its dead letter), [`requeue_failed`]
//! (an operator's retry), [`skip_broadcast`] (a cancelled broadcast), [`record_receipt`] (a
//! provider's receipt) and [`mark_read`] (the inbox). Each state change bumps `version` and writes its delivery event to the outbox in
//! the same transaction (the claim alone writes none: PROCESSING stays internal, the lease is
//! in the row), with its notification's status event when the overall status changed
//! ([`status_events`]), so that rule lives here and nowhere else. Reads for the API stay with their
//! queries.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    db::PgQuery,
    dispatch::record::{Finished, Written},
    domain::{Channel, DeliveryStatus, Domain, Locale},
    intake::NewNotification,
    outbox::{self, DeliveryEvent, HoldInfo, OutboxMessage, ReplayOrigin},
    receipts::ReceiptState,
    status_events,
    timing::Hold,
};

/// The dispatch queue: deliveries PENDING and due, PENDING and held for later (scheduled,
/// quiet hours, a digest's window, a deferral), and PROCESSING.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromRow)]
pub struct QueueDepth {
    pub pending: i64,
    pub held: i64,
    pub processing: i64,
}

/// The PENDING deliveries' due times, one branch per partial index of the dispatcher
/// (`deliveries_due`, `_due_broadcast`, `_due_digest`): `status = 'PENDING'` alone matches
/// none of them and reads the whole table. Each branch reads only its index's columns.
macro_rules! pending_due_times {
    () => {
        "SELECT next_attempt_at FROM deliveries \
             WHERE status = 'PENDING' AND broadcast_id IS NULL AND digest_id IS NULL \
         UNION ALL SELECT next_attempt_at FROM deliveries \
             WHERE status = 'PENDING' AND broadcast_id IS NOT NULL \
         UNION ALL SELECT next_attempt_at FROM deliveries \
             WHERE status = 'PENDING' AND digest_id IS NOT NULL AND broadcast_id IS NULL"
    };
}

/// Counts the dispatch queue through the dispatcher's partial indexes
/// ([`pending_due_times`] and `deliveries_leased`), so the count reads the queue and not
/// the history: counting every delivery by status, as the queue gauge did, read the whole
/// table every 5 s on every instance (41 ms for 60,000 rows on a quiet bench database,
/// 0.13 ms this way), and held back the horizon below which vacuum and index scans may drop
/// dead versions for as long as it ran.
pub async fn queue_depth(db: &PgPool) -> anyhow::Result<QueueDepth> {
    sqlx::query_as(concat!(
        "SELECT count(*) FILTER (WHERE next_attempt_at <= now()) AS pending, \
                count(*) FILTER (WHERE next_attempt_at > now()) AS held, \
                (SELECT count(*) FROM deliveries WHERE status = 'PROCESSING') AS processing \
         FROM (",
        pending_due_times!(),
        ") pending"
    ))
    .fetch_one(db)
    .await
    .context("Failed to count the dispatch queue")
}

/// Counts the PENDING deliveries that are due, up to `cap` (a huge backlog does not make
/// the count itself slow).
pub async fn count_due(conn: &mut PgConnection, cap: i64) -> anyhow::Result<i64> {
    sqlx::query_scalar(concat!(
        "SELECT count(*) FROM (SELECT 1 FROM (",
        pending_due_times!(),
        ") pending WHERE next_attempt_at <= now() LIMIT $1) due"
    ))
    .bind(cap)
    .fetch_one(conn)
    .await
    .context("Failed to count the pending deliveries")
}

/// A claimed delivery with what sending it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub delivery_id: Uuid,
    pub notification_id: Uuid,
    /// Set for a delivery of a broadcast: it takes a bounded share of the channel.
    pub broadcast_id: Option<Uuid>,
    pub channel: Channel,
    pub address: Option<String>,
    pub attempts: i32,
    /// Attempts made before the current retry budget began (an operator's retry).
    pub retry_base: i32,
    /// The claim's lease; `None` for a delivery still PENDING whose row the sending
    /// transaction holds locked ([`lock_due`]).
    pub lease_until: Option<DateTime<Utc>>,
    /// The version and time of the claim (the PROCESSING state), or of the PENDING row.
    pub version: i64,
    pub updated_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub domain: Domain,
    pub event_id: Option<String>,
    pub event_type: String,
    pub user_id: Option<i64>,
    pub locale: Locale,
    pub data: Value,
    pub subject: Option<String>,
    pub body: Option<String>,
    pub recipient: Value,
    pub raw_event: Option<Vec<u8>>,
    pub source_topic: Option<String>,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub occurred_at: Option<DateTime<Utc>>,
    /// Its address is suppressed on its channel ([`crate::suppressions`]): it is SKIPPED,
    /// not sent.
    pub suppressed: bool,
    /// The dead letter an operator's replay re-queued or re-made it from, and its count.
    pub replay_of: Option<Uuid>,
    pub replay_count: Option<i32>,
    /// The digest it is a member of ([`crate::timing::digest`]).
    pub digest_id: Option<Uuid>,
    /// For a digest's claim: its other members claimed with it, oldest first. They go out
    /// in this job's one message and take its outcome.
    #[sqlx(skip)]
    pub members: Vec<Job>,
}

impl Job {
    /// The dead letter an operator's replay made or re-queued this delivery from.
    pub fn replay(&self) -> Option<ReplayOrigin> {
        replay_origin(self.replay_of, self.replay_count)
    }

    /// The delivery event of this delivery in a new state.
    pub fn event(
        &self,
        status: DeliveryStatus,
        attempts: i32,
        error: Option<String>,
        version: i64,
        at: DateTime<Utc>,
    ) -> DeliveryEvent {
        DeliveryEvent {
            delivery_id: self.delivery_id,
            notification_id: self.notification_id,
            event_id: self.event_id.clone(),
            event_type: self.event_type.clone(),
            user_id: self.user_id,
            domain: self.domain,
            channel: self.channel,
            status,
            attempts,
            error,
            version,
            created_at: self.created_at,
            updated_at: at,
            receipt: None,
            replay: self.replay(),
            hold: None,
            digest_id: self.digest_id,
        }
    }
}

/// The INSERT that creates notifications' deliveries, PENDING (due at the notification's
/// `scheduledAt`, a hold's end, or now) or SKIPPED with their reason, at version 1, with its
/// parameters numbered from `$first` in the order [`NewRows::bind`] binds them: a part of
/// [`crate::intake::insert_rows`]'s statement, which writes only the deliveries of the
/// notifications in `owners` (the name of its CTE of stored notification ids). Their
/// creation events are the notifications' ([`NewNotification::delivery_events`]).
pub(crate) fn insert_sql(first: usize, owners: &str) -> String {
    let p: [usize; NewRows::PARAMS] = std::array::from_fn(|i| first + i);
    format!(
        "INSERT INTO deliveries (id, notification_id, channel, status, address, skip_reason, \
             next_attempt_at, created_at, updated_at, completed_at, broadcast_id, replay_of, \
             replay_count, hold_reason, digest_id) \
         SELECT id, notification_id, channel, status, address, skip_reason, due, created, \
             created, CASE WHEN status = 'SKIPPED' THEN created END, broadcast_id, replay_of, \
             replay_count, hold_reason, digest_id \
         FROM UNNEST(${}::uuid[], ${}::uuid[], ${}::text[], ${}::text[], ${}::text[], \
             ${}::text[], ${}::timestamptz[], ${}::timestamptz[], ${}::uuid[], ${}::uuid[], \
             ${}::int4[], ${}::text[], ${}::uuid[]) \
         AS t(id, notification_id, channel, status, address, skip_reason, due, created, \
             broadcast_id, replay_of, replay_count, hold_reason, digest_id) \
         WHERE notification_id IN (SELECT id FROM {owners})",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12]
    )
}

/// The deliveries of new notifications as the parameters of [`insert_sql`].
pub(crate) struct NewRows<'a> {
    ids: Vec<Uuid>,
    notifications: Vec<Uuid>,
    channels: Vec<&'static str>,
    statuses: Vec<&'static str>,
    addresses: Vec<Option<&'a str>>,
    reasons: Vec<Option<&'a str>>,
    due: Vec<DateTime<Utc>>,
    created: Vec<DateTime<Utc>>,
    broadcasts: Vec<Option<Uuid>>,
    replay_of: Vec<Option<Uuid>>,
    replay_count: Vec<Option<i32>>,
    holds: Vec<Option<&'static str>>,
    digests: Vec<Option<Uuid>>,
}

impl<'a> NewRows<'a> {
    /// Parameters [`Self::bind`] binds.
    pub(crate) const PARAMS: usize = 13;

    /// Every delivery of `n`, counting the held ones by reason.
    pub(crate) fn new(n: &'a [NewNotification]) -> Self {
        let mut rows = NewRows {
            ids: Vec::new(),
            notifications: Vec::new(),
            channels: Vec::new(),
            statuses: Vec::new(),
            addresses: Vec::new(),
            reasons: Vec::new(),
            due: Vec::new(),
            created: Vec::new(),
            broadcasts: Vec::new(),
            replay_of: Vec::new(),
            replay_count: Vec::new(),
            holds: Vec::new(),
            digests: Vec::new(),
        };
        for x in n {
            for d in &x.deliveries {
                let (due, hold) = d.schedule(x);
                rows.ids.push(d.id);
                rows.notifications.push(x.id);
                rows.channels.push(d.channel.as_str());
                rows.statuses.push(d.status().as_str());
                rows.addresses.push(d.address.as_deref());
                rows.reasons.push(d.skip_reason.as_deref());
                rows.due.push(due);
                rows.holds.push(hold.map(Hold::as_str));
                rows.digests.push(d.digest(x));
                rows.created.push(x.created_at);
                rows.broadcasts.push(x.draft.broadcast_id);
                rows.replay_of
                    .push(x.draft.replay.map(|r| r.dead_letter_id));
                rows.replay_count
                    .push(x.draft.replay.map(|r| r.replay_count));
            }
        }
        rows
    }

    /// Binds the columns, in the order of [`insert_sql`]'s parameters.
    pub(crate) fn bind<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query
            .bind(&self.ids)
            .bind(&self.notifications)
            .bind(&self.channels)
            .bind(&self.statuses)
            .bind(&self.addresses)
            .bind(&self.reasons)
            .bind(&self.due)
            .bind(&self.created)
            .bind(&self.broadcasts)
            .bind(&self.replay_of)
            .bind(&self.replay_count)
            .bind(&self.holds)
            .bind(&self.digests)
    }

    /// Counts the deliveries held for later, by channel and reason, once they are stored.
    pub(crate) fn count_held(&self, stored: &std::collections::HashSet<Uuid>) {
        for ((notification, channel), hold) in self
            .notifications
            .iter()
            .zip(&self.channels)
            .zip(&self.holds)
        {
            if let Some(hold) = hold
                && stored.contains(notification)
            {
                metrics::counter!("herald_deliveries_held_total", "channel" => *channel, "reason" => *hold)
                    .increment(1);
            }
        }
    }
}

/// What a [`Job`] reads, from `deliveries d` joined to `notifications n`.
macro_rules! job_columns {
    () => {
        "d.id AS delivery_id, d.notification_id, d.broadcast_id, d.channel, \
     d.address, d.attempts, d.retry_base, d.lease_until, d.version, d.updated_at, d.created_at, \
     n.domain, n.event_id, n.event_type, n.user_id, n.locale, n.data, n.subject, n.body, \
     n.recipient, n.raw_event, n.source_topic, n.source_partition, n.source_offset, \
     n.occurred_at, \
     EXISTS (SELECT 1 FROM suppressions s WHERE s.channel = d.channel \
         AND s.address = d.address AND s.lifted_at IS NULL) AS suppressed, \
     d.replay_of, d.replay_count, d.digest_id"
    };
}

/// Where a channel loop's next [`lock_due`] or [`claim`] looks for due deliveries.
///
/// A delivery sent and recorded leaves its PENDING version's entry at the head of the
/// queue's partial index (ordered by due time) until no snapshot can still see it. Any
/// transaction or statement running on the database (an analyst's report, a slow
/// statement of Herald's own, an `ANALYZE`) keeps those entries alive for as long as it
/// runs, and a scan from the head of the index walks every one of them, fetching its heap
/// row to find it dead: on the bench, one 20-second snapshot held elsewhere took the lock of
/// due IN_APP deliveries from 2 to 36 ms a call and the claim from 0.17 to 3.9 ms, which
/// slowed every send, which held more entries alive (BENCHMARKS.md, "A held snapshot").
/// So a loop remembers how far it has taken the queue, and looks from there.
///
/// - Transactional deliveries are looked for from [`FLOOR_MARGIN`] before the latest due
///   time the loop locked or claimed: every due delivery before that which was visible
///   then was taken (the index is read in due order). One that was not visible yet (its
///   transaction committed later, more than the margin after the due time it wrote) or
///   that another worker held and then let go, is found by the next sweep.
/// - Broadcast deliveries are looked for from the earliest due time of those locked or
///   claimed last, and from the start when none was found ([`lock_due`]).
/// - A sweep ([`Cursor::sweep`], every second) looks from the start of every index and
///   claims expired leases, which a claim between sweeps leaves alone: their index has
///   the same dead entries at its head.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cursor {
    transactional: Option<DateTime<Utc>>,
    broadcast: Option<DateTime<Utc>>,
    sweeping: bool,
}

/// How far before the latest due time taken a loop looks again for transactional
/// deliveries: more than a healthy transaction takes from stamping a due time (a
/// request's or an event's arrival) to its commit, and than the clocks of two instances
/// differ.
pub const FLOOR_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

impl Cursor {
    /// Starts a sweep: the next lock and claim look from the start of every index, and the
    /// claim takes expired leases too, until [`Cursor::swept`].
    pub fn sweep(&mut self) {
        *self = Cursor {
            sweeping: true,
            ..Cursor::default()
        };
    }

    /// Ends the sweep [`Cursor::sweep`] started.
    pub fn swept(&mut self) {
        self.sweeping = false;
    }

    /// Whether this round is a sweep.
    pub fn sweeping(&self) -> bool {
        self.sweeping
    }

    /// The due time from which transactional deliveries are looked for.
    pub fn transactional_floor(&self) -> Option<DateTime<Utc>> {
        self.transactional
    }

    /// Moves the cursor past the PENDING deliveries just taken, each with its due time and
    /// whether it is a broadcast's: the broadcast floor to the earliest of those (or back to
    /// the start when none was found where up to `broadcast_limit` were looked for), the
    /// transactional floor to [`FLOOR_MARGIN`] before the latest of the others, never back
    /// but at a sweep.
    fn took(
        &mut self,
        taken: impl IntoIterator<Item = (DateTime<Utc>, bool)>,
        broadcast_limit: usize,
    ) {
        let (mut earliest_broadcast, mut latest_transactional) = (None, None);
        for (due, broadcast) in taken {
            if broadcast {
                earliest_broadcast =
                    Some(earliest_broadcast.map_or(due, |e: DateTime<Utc>| e.min(due)));
            } else {
                latest_transactional = latest_transactional.max(Some(due));
            }
        }
        if earliest_broadcast.is_some() || broadcast_limit > 0 {
            self.broadcast = earliest_broadcast;
        }
        if let Some(latest) = latest_transactional {
            let floor = latest - FLOOR_MARGIN;
            self.transactional = self.transactional.max(Some(floor));
        }
    }
}

/// Locks up to `limit` due deliveries of `channel` in `tx`, oldest first, and returns them
/// with what sending them needs, in one statement, without claiming them:
/// they stay PENDING, with no lease, while `tx` holds their rows, and the caller sends them
/// and records the outcomes ([`record_in`]) before it commits. That saves the claim's row
/// version and its commit per delivery (issue 14); it is only for sends that take
/// milliseconds (see [`crate::dispatch::worker::Dispatcher::sends_in_claim`]). Should the
/// process die before the commit, the locks go with its connection and the deliveries are
/// due again at once: at least once, as with a lost lease. Due broadcast deliveries fill
/// what the transactional ones leave, up to `broadcast_limit`, as in [`claim`]; jobs come
/// back transactional first. Digests and expired leases are left to [`claim`].
///
/// Both kinds are looked for from where `cursor` says and move it on ([`Cursor`]): a
/// broadcast's sent deliveries, like any others, leave dead entries at the head of the
/// partial index that finds them; scanned from its head, the index cost a lock 12 ms and
/// more as a 100,000-recipient broadcast went on.
pub async fn lock_due(
    tx: &mut PgConnection,
    channel: Channel,
    limit: usize,
    broadcast_limit: usize,
    cursor: &mut Cursor,
) -> anyhow::Result<Vec<Job>> {
    let rows = sqlx::query(concat!(
        "WITH pending AS (SELECT id FROM deliveries WHERE channel = $1 \
                  AND status = 'PENDING' AND broadcast_id IS NULL AND digest_id IS NULL \
                  AND next_attempt_at >= COALESCE($5, '-infinity'::timestamptz) \
                  AND next_attempt_at <= now() \
                  ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
              bulk AS (SELECT id FROM deliveries WHERE channel = $1 \
                  AND status = 'PENDING' AND broadcast_id IS NOT NULL \
                  AND next_attempt_at >= COALESCE($4, '-infinity'::timestamptz) \
                  AND next_attempt_at <= now() ORDER BY next_attempt_at \
                  LIMIT GREATEST(LEAST($3, $2 - (SELECT count(*) FROM pending)), 0) \
                  FOR UPDATE SKIP LOCKED), \
              due AS (SELECT id FROM pending UNION ALL SELECT id FROM bulk) \
         SELECT ",
        job_columns!(),
        ", d.next_attempt_at AS due_at \
         FROM due JOIN deliveries d ON d.id = due.id \
             JOIN notifications n ON n.id = d.notification_id \
         ORDER BY d.broadcast_id IS NOT NULL, d.next_attempt_at, d.id"
    ))
    .bind(channel.as_str())
    .bind(limit as i64)
    .bind(broadcast_limit as i64)
    .bind(cursor.broadcast)
    .bind(cursor.transactional)
    .fetch_all(&mut *tx)
    .await
    .context("Failed to lock due deliveries")?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut taken = Vec::with_capacity(rows.len());
    for row in &rows {
        let job = Job::from_row(row).context("Failed to read a locked delivery")?;
        let due: DateTime<Utc> = row.try_get("due_at").context("Failed to read a due time")?;
        taken.push((due, job.broadcast_id.is_some()));
        jobs.push(job);
    }
    cursor.took(taken, broadcast_limit);
    Ok(jobs)
}

/// Puts locked deliveries whose record could not be written under a lease, as a claim
/// would: they were sent, so they must not be due again at once; when the lease runs out
/// they are claimed again, and a delivery that keeps coming back that way is dead-lettered
/// ([`crate::dispatch::worker::Dispatcher::admit`]).
pub async fn lease_locked(
    tx: &mut PgConnection,
    ids: &[Uuid],
    lease: Duration,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE deliveries SET status = 'PROCESSING', \
             lease_until = now() + $2 * interval '1 millisecond', \
             updated_at = now(), version = version + 1 \
         WHERE id = ANY($1) AND status = 'PENDING'",
    )
    .bind(ids)
    .bind(lease.as_millis() as i64)
    .execute(&mut *tx)
    .await
    .context("Failed to lease deliveries")?;
    Ok(())
}

/// Marks `ids`, which a transaction holds locked, as about to be sent, in a row committed on
/// its own (migration 0023): should that transaction die after the sends, the mark is how
/// their attempts are still counted ([`count_abandoned_marks`]). The transaction deletes it
/// with its record ([`unmark_sends`]). Like a claim, the mark is redone if lost, so its
/// commit does not wait for the flush (issue 14, lever 8; [`claim`] explains the setting).
pub async fn mark_sends(db: &PgPool, ids: &[Uuid]) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)) \
         INSERT INTO send_marks (deliveries) SELECT $1 FROM cfg RETURNING id",
    )
    .bind(ids)
    .fetch_one(db)
    .await
    .context("Failed to mark deliveries as being sent")
}

/// Deletes the mark [`mark_sends`] wrote, in the transaction that records the sends.
pub async fn unmark_sends(conn: &mut PgConnection, mark: i64) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM send_marks WHERE id = $1")
        .bind(mark)
        .execute(&mut *conn)
        .await
        .context("Failed to delete a send mark")?;
    Ok(())
}

/// Counts an attempt on every delivery that a mark older than `grace` names, once no
/// transaction holds any of them, and deletes the mark; returns how many marks it counted.
///
/// A mark is visible only once its transaction holds all of its deliveries, and goes with
/// that transaction's commit; so a mark whose deliveries no transaction holds is one whose
/// transaction died after (or while) sending. A live one's mark is left alone, and so is a
/// mark whose deliveries a later sender holds, locked or claimed (PROCESSING): its record
/// writes the attempts it read before, so the mark is counted once that record is written.
/// The attempt is added whatever the delivery's state now, since a send it may have made is
/// a send the receiver got. Deliveries gone since (retention) count nothing.
pub async fn count_abandoned_marks(db: &PgPool, grace: Duration) -> anyhow::Result<usize> {
    let mut tx = db.begin().await.context("Failed to begin")?;
    let marks: Vec<(i64, Vec<Uuid>)> = sqlx::query_as(
        "SELECT id, deliveries FROM send_marks \
         WHERE marked_at < now() - $1 * interval '1 millisecond' \
         ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED",
    )
    .bind(grace.as_millis() as i64)
    .fetch_all(&mut *tx)
    .await
    .context("Failed to read send marks")?;
    let mut counted = 0;
    for (mark, ids) in marks {
        let (free, existing): (i64, i64) = sqlx::query_as(
            "WITH free AS (SELECT id FROM deliveries WHERE id = ANY($1) \
                 AND status <> 'PROCESSING' FOR UPDATE SKIP LOCKED) \
             SELECT (SELECT count(*) FROM free), \
                 (SELECT count(*) FROM deliveries WHERE id = ANY($1))",
        )
        .bind(&ids)
        .fetch_one(&mut *tx)
        .await
        .context("Failed to lock marked deliveries")?;
        if free < existing {
            continue;
        }
        sqlx::query(
            "UPDATE deliveries SET attempts = attempts + 1, version = version + 1, \
                 updated_at = now() \
             WHERE id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .context("Failed to count marked attempts")?;
        unmark_sends(&mut tx, mark).await?;
        counted += 1;
    }
    tx.commit()
        .await
        .context("Failed to commit counted marks")?;
    Ok(counted)
}

/// Claims up to `limit` due deliveries of `channel` (PENDING and due, or PROCESSING with
/// an expired lease) and marks them PROCESSING under a fresh lease of `lease`.
///
/// Transactional deliveries come first; broadcast deliveries (reclaims included) fill
/// what they leave, up to `broadcast_limit`. Jobs come back transactional first. With
/// `digests` (the routing gathers some event type into digests), and at every sweep of
/// `cursor` whatever the routing says, up to `limit` due digests are claimed too, each as
/// one job whose `members` are the others ([`claim_digests`]): members held under a
/// routing file that digested their type still go out, within a second, after it stopped
/// doing so. With `locking`, the channel's due PENDING deliveries other than digests are
/// left to [`lock_due`].
pub async fn claim(
    db: &PgPool,
    channel: Channel,
    (limit, broadcast_limit): (usize, usize),
    lease: Duration,
    (locking, digests): (bool, bool),
    cursor: &mut Cursor,
) -> anyhow::Result<Vec<Job>> {
    // One statement, so one round trip and no BEGIN or COMMIT of its own: it claims and
    // returns what the sends need (issue 14, lever 6). Its transaction was six round trips
    // (BEGIN, the setting below, the claim, the digests' claim, the claimed rows' read,
    // COMMIT) for a claim of about 30 deliveries in a backlog.
    //
    // A claim is redone if lost: should PostgreSQL crash before its commit reaches disk,
    // the delivery is simply PENDING again and claimed again (at least once), and the
    // record of a send flushes the WAL up to it anyway. So its commit does not wait for
    // the flush (issue 14, lever 8): `set_config(..., true)` holds for the statement's own
    // transaction, commit included (`cfg`, read by the UPDATE so that it runs first).
    // `due` carries the due time of each PENDING delivery claimed, and whether it is a
    // broadcast's, for the cursor.
    let rows = sqlx::query(concat!(
        "WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), \
              pending AS (SELECT id, next_attempt_at FROM deliveries WHERE channel = $1 \
                  AND status = 'PENDING' AND broadcast_id IS NULL AND digest_id IS NULL \
                  AND next_attempt_at >= COALESCE($6, '-infinity'::timestamptz) \
                  AND next_attempt_at <= now() AND NOT $5 \
                  ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
              bulk AS (SELECT id, next_attempt_at FROM deliveries WHERE channel = $1 \
                  AND status = 'PENDING' AND broadcast_id IS NOT NULL \
                  AND next_attempt_at >= COALESCE($8, '-infinity'::timestamptz) \
                  AND next_attempt_at <= now() AND NOT $5 ORDER BY next_attempt_at \
                  LIMIT GREATEST(LEAST($4, $2 - (SELECT count(*) FROM pending)), 0) \
                  FOR UPDATE SKIP LOCKED), \
              expired AS (SELECT id FROM deliveries WHERE channel = $1 AND $7 \
                  AND status = 'PROCESSING' AND lease_until < now() \
                  AND broadcast_id IS NULL AND digest_id IS NULL \
                  LIMIT $2 FOR UPDATE SKIP LOCKED), \
              bulk_expired AS (SELECT id FROM deliveries WHERE channel = $1 AND $7 \
                  AND status = 'PROCESSING' AND lease_until < now() \
                  AND broadcast_id IS NOT NULL \
                  LIMIT GREATEST(LEAST($4, $2 - (SELECT count(*) FROM pending)) \
                      - (SELECT count(*) FROM bulk), 0) \
                  FOR UPDATE SKIP LOCKED), \
              due AS (SELECT id, next_attempt_at AS due, false AS bulk FROM pending \
                  UNION ALL SELECT id, next_attempt_at, true FROM bulk \
                  UNION ALL SELECT id, NULL, false FROM expired \
                  UNION ALL SELECT id, NULL, true FROM bulk_expired), \
              claimed AS (UPDATE deliveries d SET status = 'PROCESSING', \
                  lease_until = now() + $3 * interval '1 millisecond', \
                  attempts = d.attempts + CASE WHEN d.status = 'PROCESSING' THEN 1 ELSE 0 END, \
                  updated_at = now(), version = d.version + 1 \
                  FROM due, cfg WHERE d.id = due.id \
                  RETURNING d.*, due.due AS due_at, due.bulk AS bulk) \
         SELECT ",
        job_columns!(),
        ", d.due_at, d.bulk FROM claimed d JOIN notifications n ON n.id = d.notification_id \
         ORDER BY d.broadcast_id IS NOT NULL, d.next_attempt_at, d.id"
    ))
    .bind(channel.as_str())
    .bind(limit as i64)
    .bind(lease.as_millis() as i64)
    .bind(broadcast_limit as i64)
    .bind(locking)
    .bind(cursor.transactional)
    .bind(cursor.sweeping)
    .bind(cursor.broadcast)
    .fetch_all(db)
    .await
    .context("Failed to claim deliveries")?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut taken = Vec::with_capacity(rows.len());
    for row in &rows {
        // The claim is committed: a row that cannot be read must not take the others'
        // sends with it. It waits for its lease, as if its worker had died.
        let read = Job::from_row(row).and_then(|job| {
            let due: Option<DateTime<Utc>> = row.try_get("due_at")?;
            let bulk: bool = row.try_get("bulk")?;
            Ok((job, due, bulk))
        });
        match read {
            Ok((job, due, bulk)) => {
                if let Some(due) = due {
                    taken.push((due, bulk));
                }
                jobs.push(job);
            }
            Err(error) => tracing::error!(
                delivery = ?row.try_get::<Uuid, _>("delivery_id").ok(),
                error = %error,
                "cannot read a claimed delivery; it waits for its lease"
            ),
        }
    }
    // With `locking` no broadcast delivery was looked for: its floor stays.
    cursor.took(taken, if locking { 0 } else { broadcast_limit });
    // Digests only where the routing gathers some, and at every sweep (a digest left from
    // before the routing changed waits a second at most).
    if digests || cursor.sweeping {
        match claim_digests(db, channel, limit, lease).await {
            Ok(more) => jobs.extend(more),
            // The deliveries claimed above are this loop's now: they go out, and the
            // digests are looked for again at the next round.
            Err(error) => tracing::warn!(
                %channel,
                error = format!("{error:#}"),
                "cannot claim due digests; looking again at the next round"
            ),
        }
    }
    // No delivery event for PROCESSING (DESIGN §1 lets it stay internal; the lease is
    // in the row): it cost an outbox row written, marked and pruned, and a read-model
    // update, per delivery, for a state that lasts milliseconds (issue 14).
    Ok(gather_digests(jobs))
}

/// Claims every open member on `channel` of up to `limit` due digests (one due member
/// makes the digest due: its members go out in one message even if a member's own due
/// time came out later), in a transaction of its own, and closes those digests: no event
/// joins them any more. The digest row is
/// locked first and the members read after, by a statement of their own, so that every
/// event that joined before the lock is among them and every later one opens the next
/// digest ([`crate::timing::digest`]). A digest another claim holds is left for the next
/// round.
async fn claim_digests(
    db: &PgPool,
    channel: Channel,
    limit: usize,
    lease: Duration,
) -> anyhow::Result<Vec<Job>> {
    let mut tx = db
        .begin()
        .await
        .context("Failed to begin a digests' claim")?;
    // Redone if lost, as the claim above.
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await
        .context("Failed to set up a digests' claim")?;
    let digests: Vec<Uuid> = sqlx::query_scalar(
        "WITH due AS (SELECT DISTINCT digest_id AS id FROM deliveries WHERE channel = $1 \
                  AND digest_id IS NOT NULL \
                  AND ((status = 'PENDING' AND next_attempt_at <= now()) \
                      OR (status = 'PROCESSING' AND lease_until < now())) \
                  LIMIT $2), \
              locked AS (SELECT g.id FROM digests g JOIN due ON due.id = g.id \
                  FOR UPDATE OF g SKIP LOCKED) \
         UPDATE digests g SET closed_at = COALESCE(g.closed_at, now()) \
         FROM locked WHERE g.id = locked.id RETURNING g.id",
    )
    .bind(channel.as_str())
    .bind(limit as i64)
    .fetch_all(&mut *tx)
    .await
    .context("Failed to close due digests")?;
    if digests.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE deliveries d SET status = 'PROCESSING', \
             lease_until = now() + $3 * interval '1 millisecond', \
             attempts = d.attempts + CASE WHEN d.status = 'PROCESSING' THEN 1 ELSE 0 END, \
             updated_at = now(), version = d.version + 1 \
         FROM (SELECT id FROM deliveries WHERE digest_id = ANY($2) AND channel = $1 \
                 AND (status = 'PENDING' OR (status = 'PROCESSING' AND lease_until < now())) \
                 FOR UPDATE SKIP LOCKED) m \
         WHERE d.id = m.id RETURNING d.id",
    )
    .bind(channel.as_str())
    .bind(&digests)
    .bind(lease.as_millis() as i64)
    .fetch_all(&mut *tx)
    .await
    .context("Failed to claim digest members")?;
    let jobs: Vec<Job> = sqlx::query_as(concat!(
        "SELECT ",
        job_columns!(),
        " FROM deliveries d JOIN notifications n ON n.id = d.notification_id \
         WHERE d.id = ANY($1) ORDER BY d.next_attempt_at, d.id"
    ))
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await
    .context("Failed to load claimed digest members")?;
    tx.commit()
        .await
        .context("Failed to commit a digests' claim")?;
    Ok(jobs)
}

/// Makes each digest's claimed members one job: the oldest, carrying the others.
fn gather_digests(jobs: Vec<Job>) -> Vec<Job> {
    let mut out: Vec<Job> = Vec::with_capacity(jobs.len());
    let mut leads: std::collections::HashMap<Uuid, usize> = std::collections::HashMap::new();
    for job in jobs {
        let Some(digest) = job.digest_id else {
            out.push(job);
            continue;
        };
        match leads.get(&digest) {
            Some(&i) => out[i].members.push(job),
            None => {
                leads.insert(digest, out.len());
                out.push(job);
            }
        }
    }
    for &i in leads.values() {
        let lead = &mut out[i];
        // The oldest member leads: its delivery id is the message's.
        let mut all = std::mem::take(&mut lead.members);
        all.push(lead.clone());
        all.sort_by_key(|j| (j.created_at, j.delivery_id));
        let mut all = all.into_iter();
        let mut first = all.next().expect("a digest job has itself");
        first.members = all.collect();
        *lead = first;
    }
    out
}

/// Puts a claimed delivery back to PENDING, due in `wait`, without counting an attempt, with
/// its delivery event; false when the claim's lease no longer holds.
pub async fn defer(
    db: &PgPool,
    job: &Job,
    wait: Duration,
    hold: Hold,
    topic_prefix: &str,
) -> anyhow::Result<bool> {
    let mut tx = db.begin().await.context("Failed to begin")?;
    let mut messages = Vec::new();
    // A digest's members wait together.
    for job in std::iter::once(job).chain(&job.members) {
        let row: Option<(i64, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "UPDATE deliveries SET status = 'PENDING', lease_until = NULL, \
                 next_attempt_at = now() + $3 * interval '1 millisecond', hold_reason = $4, \
                 updated_at = now(), version = version + 1 \
             WHERE id = $1 AND status = 'PROCESSING' AND lease_until = $2 \
             RETURNING version, updated_at, next_attempt_at",
        )
        .bind(job.delivery_id)
        .bind(job.lease_until)
        .bind(wait.as_millis().max(1) as i64)
        .bind(hold.as_str())
        .fetch_optional(&mut *tx)
        .await
        .context("Failed to defer a delivery")?;
        let Some((version, at, until)) = row else {
            return Ok(false);
        };
        let mut event = job.event(DeliveryStatus::Pending, job.attempts, None, version, at);
        event.hold = Some(HoldInfo {
            reason: hold,
            until,
        });
        messages.push(event.to_outbox(topic_prefix));
    }
    outbox::insert(&mut tx, &messages).await?;
    tx.commit().await.context("Failed to commit a deferral")?;
    Ok(true)
}

/// Records finished sends in one transaction: the deliveries' new states (only where the
/// claim's lease still holds, with a first-time success's timing), the other records'
/// attempts and their outbox messages.
///
/// With `together`, the records stand or fall as one: if any lease no longer holds,
/// nothing is written and every record is [`Written::LeaseLost`] (a digest's members,
/// one message: another worker that took some of them over sends them all again).
pub async fn record(
    db: &PgPool,
    topic_prefix: &str,
    records: &[Finished],
    together: bool,
) -> anyhow::Result<Vec<Written>> {
    // Without its lease a record would match any PENDING row: that is for the transaction
    // holding the row locked alone.
    anyhow::ensure!(
        records.iter().all(|r| r.lease_until.is_some()),
        "a send record without its claim's lease outside the transaction that locked it"
    );
    let mut tx = db.begin().await.context("Failed to begin")?;
    let written = record_in(&mut tx, topic_prefix, records).await?;
    if together && written.contains(&Written::LeaseLost) {
        // Dropping the transaction rolls the partial record back.
        return Ok(vec![Written::LeaseLost; records.len()]);
    }
    tx.commit().await.context("Failed to commit send records")?;
    Ok(written)
}

/// [`record`] in the caller's transaction, which commits it. A record without a lease
/// (`lease_until` is `None`) is of a delivery the transaction holds locked, still PENDING
/// ([`lock_due`]).
pub async fn record_in(
    tx: &mut PgConnection,
    topic_prefix: &str,
    records: &[Finished],
) -> anyhow::Result<Vec<Written>> {
    let ids: Vec<Uuid> = records.iter().map(|r| r.event.delivery_id).collect();
    let leases: Vec<Option<DateTime<Utc>>> = records.iter().map(|r| r.lease_until).collect();
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

    // The times are the statement's, not the transaction's (`now()`): a transaction that
    // locked its deliveries before sending them began before the sends did.
    // `n` says which record a row answers: the same delivery can be queued twice when a
    // record waited past its lease and the delivery was claimed again; only the record
    // holding the current lease matches.
    let rows: Vec<(i64, i64, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE deliveries d SET status = t.status, attempts = t.attempt, lease_until = NULL, \
             next_attempt_at = COALESCE(statement_timestamp() + t.retry_ms * interval '1 millisecond', d.next_attempt_at), \
             last_error = CASE WHEN t.status = 'SKIPPED' THEN d.last_error ELSE t.error END, \
             skip_reason = CASE WHEN t.status = 'SKIPPED' THEN t.error ELSE d.skip_reason END, \
             error_class = t.class, sent_via = t.sent_via, \
             provider_ref = CASE WHEN t.status = 'SUCCESS' THEN t.provider_ref ELSE d.provider_ref END, \
             completed_at = CASE WHEN t.status = 'PENDING' THEN d.completed_at ELSE statement_timestamp() END, \
             hold_reason = NULL, \
             first_attempt_started_at = COALESCE(t.first_started, d.first_attempt_started_at), \
             first_attempt_latency_ms = COALESCE(t.first_latency, d.first_attempt_latency_ms), \
             updated_at = statement_timestamp(), version = d.version + 1 \
         FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::int[], $5::bigint[], \
                 $6::text[], $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::int[]) \
             WITH ORDINALITY \
             AS t(id, lease_until, status, attempt, retry_ms, error, class, sent_via, provider_ref, \
                 first_started, first_latency, n) \
         WHERE d.id = t.id AND CASE WHEN t.lease_until IS NULL THEN d.status = 'PENDING' \
             ELSE d.status = 'PROCESSING' AND d.lease_until = t.lease_until END \
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
    let mut changed = Vec::with_capacity(rows.len());
    let mut polls = Vec::new();
    for (n, version, at) in rows {
        let i = usize::try_from(n - 1).context("a record's ordinal")?;
        written[i] = Written::Recorded;
        let record = &records[i];
        let mut event = record.event.clone();
        event.version = version;
        event.updated_at = at;
        messages.push(event.to_outbox(topic_prefix));
        messages.extend(record.dead_letter.clone());
        if record.has_attempt_row() {
            attempts.push(record);
        }
        if let (Some(poll), Some(reference)) = (record.poll, &record.provider_ref) {
            polls.push((
                record.event.delivery_id,
                record.via,
                reference.as_str(),
                poll,
            ));
        }
        // A retry leaves the delivery PENDING as published, so its notification's status
        // cannot change: no need to take the notification's lock for it.
        if record.event.status != DeliveryStatus::Pending {
            changed.push(status_events::Changed {
                event: &record.event,
                before: DeliveryStatus::Pending,
            });
        }
    }
    messages.extend(status_events::changes(&mut *tx, &changed, topic_prefix).await?);
    insert_attempts(&mut *tx, &attempts).await?;
    insert_polls(&mut *tx, &polls).await?;
    outbox::insert(&mut *tx, &messages).await?;
    Ok(written)
}

/// Starts polling the gateway for the receipts of these sends ([`crate::receipts::poll`]):
/// (delivery, the channel it went out on, the message id, (first wait, deadline)).
async fn insert_polls(
    tx: &mut PgConnection,
    polls: &[(Uuid, Channel, &str, (Duration, Duration))],
) -> anyhow::Result<()> {
    if polls.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = polls.iter().map(|p| p.0).collect();
    let channels: Vec<&str> = polls.iter().map(|p| p.1.as_str()).collect();
    let refs: Vec<&str> = polls.iter().map(|p| p.2).collect();
    let first: Vec<i64> = polls.iter().map(|p| p.3.0.as_millis() as i64).collect();
    let deadline: Vec<i64> = polls.iter().map(|p| p.3.1.as_millis() as i64).collect();
    sqlx::query(
        "INSERT INTO receipt_polls (delivery_id, channel, provider_ref, next_poll_at, give_up_at) \
         SELECT id, channel, reference, now() + first * interval '1 millisecond', \
             now() + deadline * interval '1 millisecond' \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::int8[]) \
             AS t(id, channel, reference, first, deadline) \
         ON CONFLICT (delivery_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&channels)
    .bind(&refs)
    .bind(&first)
    .bind(&deadline)
    .execute(&mut *tx)
    .await
    .context("Failed to start receipt polls")?;
    Ok(())
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

/// Records a provider's receipt on a SUCCESS delivery (its status stays SUCCESS), unless a
/// receipt with a later provider time is recorded already, with a delivery event that
/// carries it. Returns the channel the message went out on (a fallback's, or its own) and
/// its address, or `None` when the receipt was not recorded.
pub async fn record_receipt(
    conn: &mut PgConnection,
    id: Uuid,
    state: &ReceiptState,
    topic_prefix: &str,
) -> anyhow::Result<Option<(Channel, Option<String>)>> {
    #[derive(sqlx::FromRow)]
    struct Receipted {
        #[sqlx(flatten)]
        changed: Changed,
        sent_on: Channel,
        address: Option<String>,
    }
    let row: Option<Receipted> = sqlx::query_as(
        "UPDATE deliveries d SET receipt_status = $2, receipt_reason = $3, receipt_permanent = $4, \
             receipt_at = $5, updated_at = now(), version = d.version + 1 \
         FROM notifications n \
         WHERE d.id = $1 AND n.id = d.notification_id AND d.status = 'SUCCESS' \
           AND (d.receipt_at IS NULL OR d.receipt_at < $5) \
         RETURNING d.id AS delivery_id, d.notification_id, d.channel, d.attempts, d.version, \
             d.created_at, d.updated_at, n.event_id, n.event_type, n.user_id, n.domain, \
             d.replay_of, d.replay_count, COALESCE(d.sent_via, d.channel) AS sent_on, d.address",
    )
    .bind(id)
    .bind(state.status)
    .bind(&state.reason)
    .bind(state.permanent)
    .bind(state.at)
    .fetch_optional(&mut *conn)
    .await
    .context("Failed to record a receipt")?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut event = row.changed.event(DeliveryStatus::Success, None);
    event.receipt = Some(state.clone());
    outbox::insert(conn, &[event.to_outbox(topic_prefix)]).await?;
    Ok(Some((row.sent_on, row.address)))
}

/// A delivery as a transition left it, with what its delivery event needs from the
/// notification.
#[derive(sqlx::FromRow)]
struct Changed {
    delivery_id: Uuid,
    notification_id: Uuid,
    channel: Channel,
    attempts: i32,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    event_id: Option<String>,
    event_type: String,
    user_id: Option<i64>,
    domain: Domain,
    replay_of: Option<Uuid>,
    replay_count: Option<i32>,
}

/// A delivery's replay origin from its two columns.
fn replay_origin(of: Option<Uuid>, count: Option<i32>) -> Option<ReplayOrigin> {
    Some(ReplayOrigin {
        dead_letter_id: of?,
        replay_count: count.unwrap_or(1),
    })
}

impl Changed {
    /// Its delivery event, in the state the transition gave it.
    fn event(self, status: DeliveryStatus, error: Option<String>) -> DeliveryEvent {
        DeliveryEvent {
            delivery_id: self.delivery_id,
            notification_id: self.notification_id,
            event_id: self.event_id,
            event_type: self.event_type,
            user_id: self.user_id,
            domain: self.domain,
            channel: self.channel,
            status,
            attempts: self.attempts,
            error,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            receipt: None,
            replay: replay_origin(self.replay_of, self.replay_count),
            hold: None,
            digest_id: None,
        }
    }
}

/// Puts a FAILED delivery back to PENDING, due now, with a fresh retry budget (an
/// operator's retry of its dead letter), with its delivery event; false when the delivery
/// is not FAILED (or gone).
pub async fn requeue_failed(
    conn: &mut PgConnection,
    id: Uuid,
    origin: ReplayOrigin,
    topic_prefix: &str,
) -> anyhow::Result<bool> {
    let row: Option<Changed> = sqlx::query_as(
        "UPDATE deliveries d SET status = 'PENDING', next_attempt_at = now(), \
             retry_base = d.attempts, lease_until = NULL, completed_at = NULL, \
             updated_at = now(), version = d.version + 1, replay_of = $2, replay_count = $3 \
         FROM notifications n \
         WHERE d.id = $1 AND d.status = 'FAILED' AND n.id = d.notification_id \
         RETURNING d.id AS delivery_id, d.notification_id, d.channel, d.attempts, d.version, \
             d.created_at, d.updated_at, n.event_id, n.event_type, n.user_id, n.domain, \
             d.replay_of, d.replay_count",
    )
    .bind(id)
    .bind(origin.dead_letter_id)
    .bind(origin.replay_count)
    .fetch_optional(&mut *conn)
    .await
    .context("Failed to re-queue the delivery")?;
    let Some(row) = row else {
        return Ok(false);
    };
    let event = row.event(DeliveryStatus::Pending, None);
    let reopened = status_events::Changed {
        event: &event,
        before: DeliveryStatus::Failed,
    };
    let mut messages = vec![event.to_outbox(topic_prefix)];
    messages.extend(status_events::changes(conn, &[reopened], topic_prefix).await?);
    outbox::insert(conn, &messages).await?;
    Ok(true)
}

/// SKIPs the PENDING deliveries of a cancelled broadcast with `reason`, with a delivery
/// event each; returns how many.
pub async fn skip_broadcast(
    conn: &mut PgConnection,
    id: Uuid,
    reason: &str,
    topic_prefix: &str,
) -> anyhow::Result<usize> {
    let rows: Vec<Changed> = sqlx::query_as(
        "WITH skipped AS (UPDATE deliveries SET status = 'SKIPPED', skip_reason = $2, \
                 lease_until = NULL, version = version + 1, updated_at = now(), \
                 completed_at = now() \
             WHERE broadcast_id = $1 AND status = 'PENDING' \
             RETURNING id AS delivery_id, notification_id, channel, attempts, version, \
                 created_at, updated_at, replay_of, replay_count) \
         SELECT s.*, n.event_id, n.event_type, n.user_id, n.domain FROM skipped s \
         JOIN notifications n ON n.id = s.notification_id",
    )
    .bind(id)
    .bind(reason)
    .fetch_all(&mut *conn)
    .await
    .context("Failed to skip a cancelled broadcast's deliveries")?;
    let skipped = rows.len();
    let events: Vec<DeliveryEvent> = rows
        .into_iter()
        .map(|row| row.event(DeliveryStatus::Skipped, Some(reason.to_owned())))
        .collect();
    let changed: Vec<status_events::Changed> = events
        .iter()
        .map(|event| status_events::Changed {
            event,
            before: DeliveryStatus::Pending,
        })
        .collect();
    let mut messages: Vec<OutboxMessage> =
        events.iter().map(|e| e.to_outbox(topic_prefix)).collect();
    messages.extend(status_events::changes(conn, &changed, topic_prefix).await?);
    outbox::insert(conn, &messages).await?;
    Ok(skipped)
}

/// Marks in-app messages read (one, or all when `delivery` is `None`) in both the
/// deliveries (the source of truth, which survives a rebuild) and the read model.
/// Returns how many were marked.
pub async fn mark_read(db: &PgPool, user_id: i64, delivery: Option<Uuid>) -> anyhow::Result<u64> {
    let mut tx = db.begin().await?;
    let marked = sqlx::query(
        "UPDATE deliveries d SET read_at = now() FROM notifications n \
         WHERE n.id = d.notification_id AND n.user_id = $1 AND d.channel = 'IN_APP' \
           AND d.read_at IS NULL AND ($2::uuid IS NULL OR d.id = $2)",
    )
    .bind(user_id)
    .bind(delivery)
    .execute(&mut *tx)
    .await
    .context("Failed to mark messages read")?
    .rows_affected();
    sqlx::query(
        "UPDATE notification_log SET read_at = now() \
         WHERE user_id = $1 AND channel = 'IN_APP' AND read_at IS NULL \
           AND ($2::uuid IS NULL OR delivery_id = $2)",
    )
    .bind(user_id)
    .bind(delivery)
    .execute(&mut *tx)
    .await
    .context("Failed to mark messages read")?;
    tx.commit().await?;
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_floor_trails_the_latest_due_time_taken_and_goes_back_only_at_a_sweep() {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let mut cursor = Cursor::default();
        assert_eq!(cursor.transactional_floor(), None);
        // Nothing taken: nothing learnt.
        cursor.took([], 0);
        assert_eq!(cursor.transactional_floor(), None);
        cursor.took([(t(7), false), (t(10), false)], 0);
        assert_eq!(cursor.transactional_floor(), Some(t(10) - FLOOR_MARGIN));
        // Taking older deliveries (found after a sweep, or due early) never moves it back.
        cursor.took([(t(5), false)], 0);
        assert_eq!(cursor.transactional_floor(), Some(t(10) - FLOOR_MARGIN));
        cursor.took([(t(20), false)], 0);
        assert_eq!(cursor.transactional_floor(), Some(t(20) - FLOOR_MARGIN));

        // Broadcasts: the earliest taken, and the start again when none was found; they
        // leave the transactional floor alone.
        cursor.took([(t(4), true), (t(3), true)], 10);
        assert_eq!(cursor.broadcast, Some(t(3)));
        assert_eq!(cursor.transactional_floor(), Some(t(20) - FLOOR_MARGIN));
        cursor.took([], 0);
        assert_eq!(cursor.broadcast, Some(t(3)), "not looked for: kept");
        cursor.took([], 10);
        assert_eq!(cursor.broadcast, None);

        cursor.took([(t(3), true)], 10);
        cursor.sweep();
        assert!(cursor.sweeping());
        assert_eq!((cursor.transactional, cursor.broadcast), (None, None));
        cursor.swept();
        assert!(!cursor.sweeping());
    }
}
