//! What PostgreSQL wrote for a phase: row versions (inserts, updates and deletes over every
//! table of the phase's database, from `pg_stat_user_tables`) and WAL bytes (from
//! `pg_current_wal_lsn()`, cluster-wide: the bench stack serves nothing else). Divided by
//! the phase's events they do not depend on the machine's speed, so they are the figures
//! to compare across runs (issue 14). Beside them, the transactions committed in the
//! phase's database and the WAL flushes the cluster made: each durable commit waits for a
//! flush (several share one when they meet), and both cost CPU that row counts do not show.

use std::{collections::BTreeMap, time::Duration};

use sqlx::PgPool;

/// One reading of the counters.
#[derive(Debug, Clone, Default)]
pub struct Writes {
    /// Row versions per table.
    tables: BTreeMap<String, i64>,
    /// Updates that were HOT (no index entry written), over every table.
    hot: i64,
    /// Updates, over every table.
    updates: i64,
    /// The WAL position, in bytes.
    wal: i64,
    /// Transactions committed or rolled back in this database.
    transactions: i64,
    /// WAL flushes to disk (`pg_stat_wal.wal_sync`), cluster-wide.
    wal_syncs: i64,
}

impl Writes {
    /// Reads the counters once.
    pub async fn read(pool: &PgPool) -> anyhow::Result<Self> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, (n_tup_ins + n_tup_upd + n_tup_del)::bigint, \
                 n_tup_upd::bigint, n_tup_hot_upd::bigint \
             FROM pg_stat_user_tables",
        )
        .fetch_all(pool)
        .await?;
        let (wal, transactions, wal_syncs): (i64, i64, i64) = sqlx::query_as(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, \
                 (xact_commit + xact_rollback)::bigint, \
                 (SELECT wal_sync FROM pg_stat_wal)::bigint \
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        Ok(Writes {
            transactions,
            wal_syncs,
            updates: rows.iter().map(|r| r.2).sum(),
            hot: rows.iter().map(|r| r.3).sum(),
            tables: rows.into_iter().map(|r| (r.0, r.1)).collect(),
            wal,
        })
    }

    /// Reads the counters once they have settled. Backends report their table counters at
    /// most once a second (and an idle one within about ten), so a phase's last writes
    /// show only after a while: read until two readings a second apart agree (at most 20 s).
    pub async fn settled(pool: &PgPool) -> anyhow::Result<Self> {
        let mut last = Writes::read(pool).await?;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = Writes::read(pool).await?;
            if now.tables == last.tables {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    fn rows(&self) -> i64 {
        self.tables.values().sum()
    }

    /// What was written between `before` and `self`, per event.
    pub fn per_event_since(&self, before: &Writes, events: usize) -> PerEvent {
        let events = events.max(1) as f64;
        let mut tables: Vec<(String, f64)> = self
            .tables
            .iter()
            .map(|(name, n)| {
                let delta = n - before.tables.get(name).copied().unwrap_or(0);
                (name.clone(), delta as f64 / events)
            })
            .filter(|(_, n)| *n >= 0.005)
            .collect();
        tables.sort_by(|a, b| b.1.total_cmp(&a.1));
        let updates = self.updates - before.updates;
        PerEvent {
            rows: (self.rows() - before.rows()) as f64 / events,
            wal_bytes: (self.wal - before.wal) as f64 / events,
            transactions: (self.transactions - before.transactions) as f64 / events,
            wal_syncs: (self.wal_syncs - before.wal_syncs) as f64 / events,
            hot_share: if updates > 0 {
                (self.hot - before.hot) as f64 / updates as f64
            } else {
                0.0
            },
            tables,
        }
    }
}

/// A phase's writes per event.
#[derive(Debug, Clone)]
pub struct PerEvent {
    pub rows: f64,
    pub wal_bytes: f64,
    /// Transactions in the database (the bench's own few readings included).
    pub transactions: f64,
    /// WAL flushes, cluster-wide.
    pub wal_syncs: f64,
    /// Share of updates that were HOT.
    pub hot_share: f64,
    /// Row versions per event by table, largest first.
    pub tables: Vec<(String, f64)>,
}

impl PerEvent {
    /// One line for the report.
    pub fn line(&self, phase: &str) -> String {
        let tables: Vec<String> = self
            .tables
            .iter()
            .map(|(name, n)| format!("{name} {n:.2}"))
            .collect();
        format!(
            "writes, {phase}: {:.1} row versions and {:.1} KB of WAL per event ({}; {:.0} % of updates HOT); {:.3} transactions and {:.3} WAL flushes per event",
            self.rows,
            self.wal_bytes / 1000.0,
            tables.join(", "),
            self.hot_share * 100.0,
            self.transactions,
            self.wal_syncs
        )
    }

    /// The figures for the JSON report.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "row_versions_per_event": (self.rows * 100.0).round() / 100.0,
            "wal_bytes_per_event": self.wal_bytes.round(),
            "hot_update_share": (self.hot_share * 1000.0).round() / 1000.0,
            "transactions_per_event": (self.transactions * 1000.0).round() / 1000.0,
            "wal_syncs_per_event": (self.wal_syncs * 1000.0).round() / 1000.0,
            "by_table": self.tables.iter().map(|(n, v)| (n.clone(), (v * 100.0).round() / 100.0)).collect::<BTreeMap<_, _>>(),
        })
    }
}
