//! Waking the dispatchers when deliveries become due, without a `NOTIFY` inside the
//! transactions that create them (issue 14, lever 7).
//!
//! A `NOTIFY` in a transaction makes its commit take a cluster-wide lock and queue behind
//! every other notifying commit until they are flushed: the ingest batches, the HTTP intake
//! and the fan-out all paid that, in their commit latency. Now whoever commits new due
//! deliveries calls [`Wakeup::wake`] after the commit, naming their channels: those
//! channels' dispatch loops of this instance wake at once, in process, and one
//! `NOTIFY herald_deliveries` goes out on its own for the other instances, at most one per
//! [`DEBOUNCE`] however many commits asked for it (a wake that comes while one is pending
//! joins it, its channels added). A lost NOTIFY costs at most the loops' sweep interval,
//! as before.
//!
//! Only the channels named wake: a loop woken with nothing to claim still runs a claim, a
//! digest check and a look for the next due time, and with every loop woken by every
//! commit those empty rounds were about two of every five statements Herald sent at a
//! steady 1,000 events/s (BENCHMARKS.md). For the same reason an instance ignores its own
//! NOTIFYs, which its loops already had in process.
//!
//! The payload is `<instance id> <CHANNEL>,<CHANNEL>...`. A payload that does not parse (an
//! older instance's empty one, or an operator's `NOTIFY herald_deliveries`) wakes every loop.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::domain::Channel;

/// The shortest gap between two NOTIFYs of one instance.
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// The notification channel the dispatchers LISTEN on.
pub const NOTIFY_CHANNEL: &str = "herald_deliveries";

/// Wakes the dispatch loops of this instance and, through PostgreSQL, of the others.
#[derive(Clone)]
pub struct Wakeup {
    /// Tells this instance's NOTIFYs from the others'.
    instance: Uuid,
    local: Arc<HashMap<Channel, Arc<Notify>>>,
    /// The channels the pending NOTIFY will name.
    pending: Arc<Mutex<BTreeSet<Channel>>>,
    remote: mpsc::Sender<()>,
    /// When a dispatch loop of this instance last found more due deliveries than it had
    /// room for ([`Wakeup::sends_behind`]).
    behind_since: Arc<Mutex<Option<Instant>>>,
}

impl Wakeup {
    /// A wakeup that notifies through `db`. Its NOTIFY task ends with the last clone.
    pub fn new(db: PgPool) -> Self {
        let (remote, mut asked) = mpsc::channel(1);
        let instance = Uuid::new_v4();
        let pending: Arc<Mutex<BTreeSet<Channel>>> = Arc::default();
        let taken = pending.clone();
        tokio::spawn(async move {
            while asked.recv().await.is_some() {
                let channels = std::mem::take(&mut *lock(&taken));
                let sent = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(NOTIFY_CHANNEL)
                    .bind(payload(instance, &channels))
                    .execute(&db)
                    .await;
                if let Err(error) = sent {
                    tracing::debug!(%error, "cannot NOTIFY the other instances; they sweep");
                }
                tokio::time::sleep(DEBOUNCE).await;
            }
        });
        Wakeup {
            instance,
            local: Arc::new(
                Channel::ALL
                    .into_iter()
                    .map(|channel| (channel, Arc::new(Notify::new())))
                    .collect(),
            ),
            pending,
            remote,
            behind_since: Arc::default(),
        }
    }

    /// Says that a dispatch loop of this instance claimed as many due deliveries as it had
    /// room for: more are waiting, and its sends are behind.
    pub fn sends_behind(&self) {
        *lock(&self.behind_since) = Some(Instant::now());
    }

    /// Whether a dispatch loop of this instance was behind within the last `window`. Never,
    /// on an instance that does not dispatch.
    pub fn sends_behind_within(&self, window: Duration) -> bool {
        lock(&self.behind_since).is_some_and(|at| at.elapsed() <= window)
    }

    /// Says that deliveries of `channels` became due: call it after the commit that made
    /// them.
    pub fn wake(&self, channels: impl IntoIterator<Item = Channel>) {
        let channels: BTreeSet<Channel> = channels.into_iter().collect();
        if channels.is_empty() {
            return;
        }
        self.wake_here(channels.iter().copied());
        lock(&self.pending).extend(channels);
        // Full: a NOTIFY is already pending, and this wake joins it.
        let _ = self.remote.try_send(());
    }

    /// Says that deliveries of any channel may have become due.
    pub fn wake_all(&self) {
        self.wake(Channel::ALL);
    }

    /// What `channel`'s dispatch loop of this instance waits on.
    pub fn local(&self, channel: Channel) -> Arc<Notify> {
        self.local[&channel].clone()
    }

    /// Wakes the loops a NOTIFY names; one of this instance's own wakes nothing.
    pub fn received(&self, payload: &str) {
        match parse(payload) {
            Some((instance, _)) if instance == self.instance => {}
            Some((_, channels)) => self.wake_here(channels),
            None => self.wake_here(Channel::ALL),
        }
    }

    /// Wakes this instance's loops of `channels`.
    fn wake_here(&self, channels: impl IntoIterator<Item = Channel>) {
        for channel in channels {
            self.local[&channel].notify_waiters();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn payload(instance: Uuid, channels: &BTreeSet<Channel>) -> String {
    let names: Vec<&str> = channels.iter().map(|c| c.as_str()).collect();
    format!("{instance} {}", names.join(","))
}

/// The instance and channels of a payload; `None` when it does not name them.
fn parse(payload: &str) -> Option<(Uuid, Vec<Channel>)> {
    let (instance, channels) = payload.split_once(' ')?;
    let channels = channels
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<Channel>, _>>()
        .ok()?;
    Some((instance.parse().ok()?, channels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_names_its_instance_and_channels_and_parses_back() {
        let instance = Uuid::new_v4();
        let channels = BTreeSet::from([Channel::InApp, Channel::Email]);
        let text = payload(instance, &channels);
        assert_eq!(text, format!("{instance} EMAIL,IN_APP"));
        assert_eq!(
            parse(&text),
            Some((instance, vec![Channel::Email, Channel::InApp]))
        );
    }

    #[test]
    fn a_payload_that_names_nothing_known_does_not_parse() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("not-a-uuid EMAIL"), None);
        assert_eq!(parse(&format!("{} FAX", Uuid::new_v4())), None);
    }
}
