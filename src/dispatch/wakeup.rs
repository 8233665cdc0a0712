//! Waking the dispatchers when deliveries become due, without a `NOTIFY` inside the
//! transactions that create them (issue 14, lever 7).
//!
//! A `NOTIFY` in a transaction makes its commit take a cluster-wide lock and queue behind
//! every other notifying commit until they are flushed: the ingest batches, the HTTP intake
//! and the fan-out all paid that, in their commit latency. Now whoever commits new due
//! deliveries calls [`Wakeup::wake`] after the commit: the dispatch loops of this instance
//! wake at once, in process, and one `NOTIFY herald_deliveries` goes out on its own for the
//! other instances, at most one per [`DEBOUNCE`] however many commits asked for it (a wake
//! that comes while one is pending joins it). A lost NOTIFY costs at most the loops' sweep
//! interval, as before.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};

/// The shortest gap between two NOTIFYs of one instance.
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// Wakes the dispatch loops of this instance and, through PostgreSQL, of the others.
#[derive(Clone)]
pub struct Wakeup {
    local: Arc<Notify>,
    remote: mpsc::Sender<()>,
}

impl Wakeup {
    /// A wakeup that notifies through `db`. Its NOTIFY task ends with the last clone.
    pub fn new(db: PgPool) -> Self {
        let (remote, mut asked) = mpsc::channel(1);
        tokio::spawn(async move {
            while asked.recv().await.is_some() {
                let sent = sqlx::query("SELECT pg_notify('herald_deliveries', '')")
                    .execute(&db)
                    .await;
                if let Err(error) = sent {
                    tracing::debug!(%error, "cannot NOTIFY the other instances; they sweep");
                }
                tokio::time::sleep(DEBOUNCE).await;
            }
        });
        Wakeup {
            local: Arc::new(Notify::new()),
            remote,
        }
    }

    /// Says that deliveries became due: call it after the commit that made them.
    pub fn wake(&self) {
        self.local.notify_waiters();
        // Full: a NOTIFY is already pending, and this wake joins it.
        let _ = self.remote.try_send(());
    }

    /// What this instance's dispatch loops wait on (also woken by other instances' NOTIFY).
    pub fn local(&self) -> Arc<Notify> {
        self.local.clone()
    }
}
