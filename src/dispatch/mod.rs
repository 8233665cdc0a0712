//! The dispatcher: one loop per enabled channel claims due deliveries and sends them, at
//! most `concurrency` at a time, so a slow or hanging channel never holds up another.
//!
//! A channel's loop wakes within milliseconds of new work on its channel: in process when
//! this instance's intakes commit it, through PostgreSQL `LISTEN herald_deliveries` when
//! another instance's do ([`wakeup`]), and otherwise when the next scheduled or retried
//! delivery falls due (checked at least every second), which also catches deliveries whose
//! worker died and whose lease ran out.

pub mod circuit_breaker;
pub mod rate_limit;
pub mod record;
pub mod send_speed;
pub mod wakeup;
pub mod worker;

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use sqlx::postgres::PgListener;
use tokio::{
    sync::{Notify, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{deliveries, domain::Channel};
pub use worker::{Dispatcher, Job, Outcome};

/// The longest a loop sleeps without looking for due deliveries.
const SWEEP: Duration = Duration::from_secs(1);

/// The most transactions one channel loop keeps open while sending inside them
/// ([`Dispatcher::send_locked`]): a bound on the connections they hold.
const SENDING_TRANSACTIONS: usize = 4;

/// The longest a busy loop waits for more free slots before claiming (see `gather`).
const GATHER: Duration = Duration::from_millis(5);

/// Runs the channel loops until `shutdown`, then waits for the sends in flight.
pub async fn run(dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    tasks.spawn(listen(dispatcher.clone(), shutdown.clone()));
    tasks.spawn(sample_queue(dispatcher.clone(), shutdown.clone()));
    tasks.spawn(count_marks(dispatcher.clone(), shutdown.clone()));
    let mut channels: Vec<Channel> = dispatcher.senders.keys().copied().collect();
    channels.sort();
    for channel in channels {
        tasks.spawn(channel_loop(
            dispatcher.clone(),
            channel,
            dispatcher.wakeup.local(channel),
            shutdown.clone(),
        ));
    }
    tasks.close();
    tasks.wait().await;
}

async fn channel_loop(
    dispatcher: Arc<Dispatcher>,
    channel: Channel,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let concurrency = dispatcher.settings.concurrency_of(channel);
    let slots = Arc::new(Semaphore::new(concurrency));
    // Broadcast deliveries hold one of these besides their slot: however large a
    // broadcast's backlog, the rest of the slots stay free for transactional notifications.
    let broadcast_slots = Arc::new(Semaphore::new(dispatcher.broadcast_concurrency(channel)));
    let in_flight = TaskTracker::new();
    // Under load, slots free up a few at a time as the sends' records commit. Claiming
    // each handful on its own costs a transaction per handful; waiting a moment for half
    // of them makes claims (and the records after them) several times larger.
    let gather = (concurrency.min(dispatcher.settings.claim_batch) / 2).max(1);
    // Where the next lock or claim looks for due deliveries, and when the last sweep was
    // (`deliveries::Cursor`).
    let mut cursor = deliveries::Cursor::default();
    let mut last_sweep = Instant::now();
    // Transactions sending inside themselves (IN_APP) at once: each holds a connection
    // for its sends' length, which a hanging Redis stretches to the send timeout.
    let transactions = Arc::new(Semaphore::new(SENDING_TRANSACTIONS));
    // Told when one of them ends.
    let sent = Arc::new(Notify::new());
    while !shutdown.is_cancelled() {
        let mut free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                permit = slots.acquire() => drop(permit),
                () = shutdown.cancelled() => break,
            }
            continue;
        }
        if free < gather && free < concurrency {
            tokio::select! {
                permits = slots.acquire_many(gather as u32) => drop(permits),
                () = tokio::time::sleep(GATHER) => {}
                () = shutdown.cancelled() => break,
            }
            free = slots.available_permits();
        }
        // Registered before claiming, so a NOTIFY that lands during the claim still wakes us.
        let notified = wake.notified();
        let Room {
            all: room,
            broadcasts: mut broadcast_room,
            broadcast_window,
        } = match room_for(
            &dispatcher,
            channel,
            free,
            broadcast_slots.available_permits(),
        )
        .await
        {
            Ok(room) => room,
            Err(wait) => {
                tokio::select! {
                    () = tokio::time::sleep(wait.clamp(Duration::from_millis(5), SWEEP)) => {}
                    () = shutdown.cancelled() => break,
                }
                continue;
            }
        };
        // Once a second, a sweep looks from the start of the queue's indexes and takes
        // expired leases (`deliveries::Cursor`).
        if last_sweep.elapsed() >= SWEEP {
            cursor.sweep();
            last_sweep = Instant::now();
        }
        // A channel that sends inside the transaction that finds its due deliveries
        // ([`Dispatcher::send_locked`]) sends its transactional and broadcast ones that
        // way; the claim below takes the rest (digests, expired leases), and has the whole
        // room at a sweep, so that neither waits long behind a backlog.
        let mut locked = 0;
        let mut locking = dispatcher.sends_in_claim(channel);
        if locking && !cursor.sweeping() {
            let Some(open) = (tokio::select! {
                permit = transactions.clone().acquire_owned() => permit.ok(),
                () = shutdown.cancelled() => None,
            }) else {
                break;
            };
            match dispatcher
                .lock_due(channel, (room, broadcast_room), &mut cursor)
                .await
            {
                Ok(Some((tx, jobs))) => {
                    locked = jobs.len();
                    let bulk = jobs.iter().filter(|j| j.broadcast_id.is_some()).count();
                    // At most `broadcast_room` were locked, which this loop alone takes
                    // from the broadcast slots: both acquisitions are immediate.
                    let (Ok(permits), Ok(broadcast_permits)) = (
                        slots.clone().acquire_many_owned(locked as u32).await,
                        broadcast_slots
                            .clone()
                            .acquire_many_owned(bulk as u32)
                            .await,
                    ) else {
                        break;
                    };
                    broadcast_room -= bulk;
                    if locked == room {
                        dispatcher.wakeup.sends_behind();
                    }
                    let (dispatcher, sent) = (dispatcher.clone(), sent.clone());
                    in_flight.spawn(async move {
                        if let Err(error) = dispatcher.send_locked(tx, jobs).await {
                            tracing::error!(%channel, error = format!("{error:#}"), "cannot record in-transaction sends");
                        }
                        drop((permits, broadcast_permits, open));
                        sent.notify_one();
                    });
                    if locked == room {
                        continue;
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%channel, error = format!("{error:#}"), "cannot lock due deliveries; claiming them");
                    locking = false;
                }
            }
        }
        let room = room - locked;
        let broadcast_room = broadcast_room.min(room);
        // A lock that took fewer than it had room for took everything due: the loop waits
        // for the next wake rather than looking again at once. Its claim would look only
        // for digests (expired leases wait for the sweep), so they wait for the sweep too,
        // a second at most: at a steady load, an empty lock and an empty claim after each
        // lock were a third of the dispatcher's transactions.
        let claimed = if locked > 0 {
            Ok(Vec::new())
        } else {
            dispatcher
                .claim(channel, (room, broadcast_room), locking, &mut cursor)
                .await
        };
        let swept = cursor.sweeping();
        cursor.swept();
        match claimed {
            Ok(jobs) if !jobs.is_empty() => {
                if jobs.len() >= room {
                    dispatcher.wakeup.sends_behind();
                }
                spawn_sends(&dispatcher, jobs, &slots, &broadcast_slots, &in_flight).await;
            }
            // More may be due: look again at once.
            Ok(_) if swept => {}
            Ok(_) => {
                // Due broadcast deliveries that could not be claimed wait for a broadcast
                // slot (or, past the rate-limit reserve, for the next sweep), not for their
                // due time, which has passed.
                let broadcast_full = broadcast_slots.available_permits() == 0;
                // Deliveries this loop's transactions are sending are still PENDING and
                // due: while any is open, wait for it to end rather than poll for them.
                // One that ends recorded its deliveries (or leased them), so it makes
                // nothing due: once the last has ended, the next due delivery says when to
                // look again. Looking at each end instead made about 3,300 empty rounds
                // (a lock and a claim that found nothing) per 100,000 events end to end.
                tokio::pin!(notified);
                let mut sending = transactions.available_permits() < SENDING_TRANSACTIONS;
                let sweep_at = tokio::time::Instant::now() + SWEEP;
                loop {
                    let wait = if sending {
                        sweep_at.saturating_duration_since(tokio::time::Instant::now())
                    } else {
                        // Broadcast slots counted now, not at the top of the loop: sends
                        // that ended meanwhile freed theirs, and their due deliveries must
                        // not wait for the sweep.
                        let broadcasts =
                            broadcast_window && broadcast_slots.available_permits() > 0;
                        next_due(&dispatcher, channel, broadcasts, &cursor).await
                    };
                    tokio::select! {
                        () = &mut notified => break,
                        () = tokio::time::sleep(wait) => break,
                        () = sent.notified(), if sending => {
                            sending = transactions.available_permits() < SENDING_TRANSACTIONS;
                        }
                        permit = broadcast_slots.acquire(), if broadcast_full => {
                            drop(permit);
                            break;
                        }
                        () = shutdown.cancelled() => break,
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%channel, error = format!("{error:#}"), "cannot claim deliveries; retrying");
                tokio::select! {
                    () = tokio::time::sleep(SWEEP) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    in_flight.close();
    in_flight.wait().await;
    tracing::debug!(%channel, "dispatch loop stopped");
}

/// What one round of a channel loop may take.
struct Room {
    /// Deliveries of any kind.
    all: usize,
    /// Broadcast deliveries among them.
    broadcasts: usize,
    /// Whether the rate limit's window leaves broadcasts any room (it keeps a reserve for
    /// transactional sends).
    broadcast_window: bool,
}

/// How much a round with `free` slots (`broadcast_free` of them for broadcasts) may take,
/// or how long to wait before looking again. It claims only what can go out now: an open
/// breaker without a fallback, or a full rate-limit window, would otherwise claim and defer
/// the backlog over and over.
async fn room_for(
    dispatcher: &Dispatcher,
    channel: Channel,
    free: usize,
    broadcast_free: usize,
) -> Result<Room, Duration> {
    let mut room = Room {
        all: free.min(dispatcher.settings.claim_batch),
        broadcasts: broadcast_free,
        broadcast_window: true,
    };
    if let Some(wait) = dispatcher.breakers[&channel].refusing_for()
        && !dispatcher.has_fallback(channel)
    {
        return Err(wait);
    }
    if let Some(limit) = dispatcher.settings.rate_limits.get(&channel).copied()
        && let Some((open, wait)) = dispatcher.limiter.room(channel, limit).await
    {
        if open == 0 {
            return Err(wait);
        }
        room.all = room.all.min(open as usize);
        // Broadcasts leave the transactional reserve of each window untouched.
        let reserve = (f64::from(limit.limit) * (1.0 - dispatcher.broadcast_share)).ceil();
        let window_room = open.saturating_sub(reserve as u32) as usize;
        room.broadcast_window = window_room > 0;
        room.broadcasts = room.broadcasts.min(window_room);
    }
    Ok(room)
}

/// Admits each claimed delivery and spawns its send, holding a slot (and a broadcast slot
/// for a broadcast's) until it is recorded. Stops early only when the slots are closed.
async fn spawn_sends(
    dispatcher: &Arc<Dispatcher>,
    jobs: Vec<Job>,
    slots: &Arc<Semaphore>,
    broadcast_slots: &Arc<Semaphore>,
    in_flight: &TaskTracker,
) {
    for job in jobs {
        let admitted = match dispatcher.admit(&job).await {
            Ok(Ok(admitted)) => admitted,
            Ok(Err(_deferred)) => continue,
            Err(error) => {
                tracing::error!(delivery = %job.delivery_id, error = format!("{error:#}"), "cannot admit a delivery");
                continue;
            }
        };
        let broadcast_permit = match job.broadcast_id {
            Some(_) => match broadcast_slots.clone().acquire_owned().await {
                Ok(permit) => Some(permit),
                Err(_) => return,
            },
            None => None,
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let dispatcher = dispatcher.clone();
        in_flight.spawn(async move {
            // Boxed: the send's future is large, and spawning moves it otherwise (memmove
            // was 7 % of Herald's CPU in a profile).
            if let Err(error) = Box::pin(dispatcher.send(&job, admitted)).await {
                // The send is recorded by the lease: it will be claimed again.
                tracing::error!(delivery = %job.delivery_id, error = format!("{error:#}"), "cannot record a delivery");
            }
            drop((permit, broadcast_permit));
        });
    }
}

/// How long until the channel's next scheduled or retried delivery (broadcast ones too
/// when `broadcasts`), at least 5 ms and at most [`SWEEP`]. One that is already due but
/// was not claimed is locked by another worker's claim, which is over within milliseconds.
/// Transactional deliveries are looked for from the cursor's floor, past the dead index
/// entries before it.
async fn next_due(
    dispatcher: &Dispatcher,
    channel: Channel,
    broadcasts: bool,
    cursor: &deliveries::Cursor,
) -> Duration {
    // Three minima, one per partial index (transactional, broadcast and digest deliveries).
    let next: Option<chrono::DateTime<Utc>> = sqlx::query_scalar(
        "SELECT LEAST((SELECT min(next_attempt_at) FROM deliveries WHERE channel = $1 \
                 AND status = 'PENDING' AND broadcast_id IS NULL AND digest_id IS NULL \
                 AND next_attempt_at >= COALESCE($3, '-infinity'::timestamptz)), \
             (SELECT min(next_attempt_at) FROM deliveries WHERE channel = $1 AND $2 \
                 AND status = 'PENDING' AND broadcast_id IS NOT NULL), \
             (SELECT min(next_attempt_at) FROM deliveries WHERE channel = $1 \
                 AND status = 'PENDING' AND digest_id IS NOT NULL))",
    )
    .bind(channel.as_str())
    .bind(broadcasts)
    .bind(cursor.transactional_floor())
    .fetch_one(&dispatcher.db)
    .await
    .unwrap_or(None);
    next.map_or(SWEEP, |at| {
        (at - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(SWEEP)
    })
    .max(Duration::from_millis(5))
}

/// Wakes the loops each `NOTIFY herald_deliveries` names (another instance's wakes);
/// reconnects when the connection drops (the loops' periodic sweep covers the gap).
async fn listen(dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&dispatcher.db).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for new deliveries; polling meanwhile");
                tokio::select! {
                    () = tokio::time::sleep(SWEEP * 5) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        if let Err(error) = listener.listen(wakeup::NOTIFY_CHANNEL).await {
            tracing::warn!(%error, "LISTEN failed");
            continue;
        }
        tracing::debug!("listening for new deliveries");
        loop {
            tokio::select! {
                received = listener.recv() => match received {
                    Ok(notification) => {
                        tracing::trace!(payload = notification.payload(), "new deliveries announced");
                        dispatcher.wakeup.received(notification.payload());
                    }
                    Err(error) => {
                        tracing::warn!(%error, "lost the LISTEN connection");
                        break;
                    }
                },
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// How old a send mark must be before [`count_marks`] looks at it. A live transaction's
/// mark is safe at any age (the transaction holds every delivery it names); the grace only
/// spares the sweep the marks of transactions still sending, which live milliseconds. It
/// is short so that the marks a killed process left are counted at the next one's start.
const MARK_GRACE: Duration = Duration::from_millis(500);

/// Counts, every second, the attempts of sends whose transaction died after marking them
/// ([`deliveries::count_abandoned_marks`]).
async fn count_marks(dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    loop {
        match deliveries::count_abandoned_marks(&dispatcher.db, MARK_GRACE).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                marks = n,
                "counted the attempts of sends whose transaction died after them"
            ),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot count abandoned send marks; trying again"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(SWEEP) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Exports the dispatch queue every few seconds ([`deliveries::queue_depth`]): PENDING
/// counts the deliveries that are due (the backlog an alert watches); HELD, the PENDING ones
/// due later, which are no backlog; PROCESSING, those being sent. Terminal deliveries are
/// history, not queue: `herald_deliveries_total` counts the outcomes.
async fn sample_queue(dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    loop {
        match deliveries::queue_depth(&dispatcher.db).await {
            Ok(depth) => {
                for (status, n) in [
                    ("PENDING", depth.pending),
                    ("HELD", depth.held),
                    ("PROCESSING", depth.processing),
                ] {
                    metrics::gauge!("herald_delivery_queue_depth", "status" => status)
                        .set(n as f64);
                }
            }
            Err(error) => tracing::debug!(error = format!("{error:#}"), "cannot count the queue"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
