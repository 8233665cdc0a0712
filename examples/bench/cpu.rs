//! CPU time per event, by process: Herald, PostgreSQL and the broker, read from /proc.
//!
//! Throughput on these shared 2-core machines moves with the hour; the CPU a phase's
//! events cost each process moves much less, so it is the figure to compare a change by
//! (with row versions and WAL). PostgreSQL's is the postmaster's children: the backends
//! alive at the reading plus those that exited before it (reaped, so in the postmaster's
//! `cutime`/`cstime`). Linux only; elsewhere the figure reads zero.

use std::{collections::BTreeMap, fs};

/// Clock ticks per second of /proc's time fields (`getconf CLK_TCK`; 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// The processes whose CPU is counted.
#[derive(Debug, Clone, Copy)]
pub struct Pids {
    pub herald: u32,
    /// The bench stack's postmaster.
    pub postgres: Option<u32>,
    /// The broker (Tansu) of the bench stack.
    pub broker: Option<u32>,
}

impl Pids {
    /// Herald's child `herald`, the postmaster of the bench database (the parent of one of
    /// its backends) and the Tansu process listening on `brokers`.
    pub async fn find(herald: u32, pool: &sqlx::PgPool, brokers: &str) -> anyhow::Result<Self> {
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await?;
        let postgres = stat(backend as u32).map(|s| s.ppid);
        let broker = processes().into_iter().find_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains("tansu") && cmdline.contains(brokers)).then_some(pid)
        });
        Ok(Pids {
            herald,
            postgres,
            broker,
        })
    }
}

/// CPU seconds spent so far, by process.
#[derive(Debug, Clone, Default)]
pub struct Cpu {
    seconds: BTreeMap<&'static str, f64>,
}

impl Cpu {
    pub fn read(pids: &Pids) -> Self {
        let mut seconds = BTreeMap::new();
        seconds.insert("Herald", own(pids.herald));
        if let Some(postmaster) = pids.postgres {
            let children: f64 = processes()
                .into_iter()
                .filter(|pid| stat(*pid).is_some_and(|s| s.ppid == postmaster))
                .map(own)
                .sum();
            let reaped = stat(postmaster).map_or(0.0, |s| s.children);
            seconds.insert("PostgreSQL", own(postmaster) + reaped + children);
        }
        if let Some(broker) = pids.broker {
            seconds.insert("broker", own(broker));
        }
        Cpu { seconds }
    }

    /// Milliseconds of CPU per event of each process between `before` and `self`.
    pub fn per_event_since(&self, before: &Cpu, events: usize) -> PerEvent {
        let events = events.max(1) as f64;
        PerEvent(
            self.seconds
                .iter()
                .map(|(name, s)| {
                    let delta = s - before.seconds.get(name).copied().unwrap_or(0.0);
                    (*name, delta * 1000.0 / events)
                })
                .collect(),
        )
    }
}

/// CPU milliseconds per event, by process.
#[derive(Debug, Clone)]
pub struct PerEvent(Vec<(&'static str, f64)>);

impl PerEvent {
    pub fn line(&self, phase: &str) -> String {
        let total: f64 = self.0.iter().map(|(_, ms)| ms).sum();
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(name, ms)| format!("{name} {ms:.3}"))
            .collect();
        format!(
            "cpu, {phase}: {total:.3} ms of CPU per event ({})",
            parts.join(", ")
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!(
            self.0
                .iter()
                .map(|(name, ms)| (name.to_string(), (ms * 1000.0).round() / 1000.0))
                .collect::<BTreeMap<_, _>>()
        )
    }
}

struct Stat {
    ppid: u32,
    /// utime + stime, seconds.
    own: f64,
    /// cutime + cstime (reaped children), seconds.
    children: f64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields from the state (field 3 of stat(5)): ppid is 4, utime..cstime are 14..17.
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        own: (field(14)? + field(15)?) / TICKS_PER_S,
        children: (field(16)? + field(17)?) / TICKS_PER_S,
    })
}

fn own(pid: u32) -> f64 {
    stat(pid).map_or(0.0, |s| s.own)
}

fn processes() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
