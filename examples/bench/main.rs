//! `make bench`: every figure of issues 6 and 14 in one run on the local stack, with the release
//! `herald serve` binary in a child process (so its memory and CPU are its own).
//!
//! 1. Ingest alone: N PAYMENT_COMPLETED events (IN_APP + SLACK) wait on the topic; Herald
//!    with only the ingest role; events/s from the first stored notification until every
//!    notification exists and every offset is committed. Ceilings on the same data: a
//!    bare rdkafka consumer reading the topic, and a bare batched INSERT of the same rows.
//! 2. Everything else against one Herald with every role: end to end (a backlog of
//!    events until every delivery is terminal and notification_log has caught up), then
//!    occurredAt-to-SUCCESS latency at an open-loop offered rate, then HTTP intake latency
//!    at an open-loop request rate, then email deliveries/s into MailDev, then its peak RSS.
//!
//! ```sh
//! eval "$(scripts/stack.sh env bench | sed 's/^/export /')"
//! cargo build --release --bin herald --example bench
//! target/release/examples/bench --events 20000 --out /tmp/bench.json
//! ```

mod ceilings;
mod cpu;
mod load;
mod process;
mod run;
mod sink;
mod writes;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use clap::Parser;
use rdkafka::{
    TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    producer::FutureProducer,
};
use serde_json::{Value, json};
use sqlx::PgPool;

use herald::{config::Settings, routing::RoutingTable};

use self::{
    cpu::{Cpu, Pids},
    process::Herald,
    run::Run,
    sink::Sink,
    writes::Writes,
};

/// Where the HTTP intake phases send their requests, and what they read their costs from.
struct IntakeTarget<'a> {
    base: &'a str,
    credential: &'a str,
    pool: &'a PgPool,
    pids: &'a Pids,
}

/// What one HTTP intake phase measured.
struct IntakePhase {
    p50: f64,
    p99: f64,
    /// The failed requests ("3 failed (503: 2, connect: 1)").
    failed: String,
    /// CPU per request, read once every request stored has been sent and projected: an
    /// intake request's cost is also the dispatch, relay and projector work it brings.
    cpu: cpu::PerEvent,
}

/// One HTTP intake phase at `rate` requests/s for `duration` (with an Idempotency-Key per
/// request when `keyed`).
async fn intake_phase(
    target: &IntakeTarget<'_>,
    tag: &str,
    rate: u32,
    duration: Duration,
    keyed: bool,
) -> anyhow::Result<IntakePhase> {
    let before = Cpu::read(target.pids);
    let mut intake =
        load::intake(target.base, target.credential, tag, rate, duration, keyed).await?;
    let failures: usize = intake.failure_kinds.values().sum();
    let sent = intake.latencies_ms.len() + failures;
    let mut failed = format!("{failures} failed");
    if !intake.failure_kinds.is_empty() {
        let kinds: Vec<String> = intake
            .failure_kinds
            .iter()
            .map(|(kind, n)| format!("{kind}: {n}"))
            .collect();
        failed.push_str(&format!(" ({})", kinds.join(", ")));
    }
    wait_caught_up(target.pool, Stored::Already, Duration::from_secs(600)).await?;
    Ok(IntakePhase {
        p50: load::quantile(&mut intake.latencies_ms, 0.5),
        p99: load::quantile(&mut intake.latencies_ms, 0.99),
        failed,
        cpu: Cpu::read(target.pids).per_event_since(&before, sent),
    })
}

/// The cost of checking an API key as the API does on every request: the digest and the
/// cache lookup (the cache is warmed by the first check), in microseconds per check.
async fn key_check_cost(pool: &sqlx::PgPool, key: &str) -> anyhow::Result<f64> {
    let auth = herald::auth::Authenticator::new(pool.clone(), None, None);
    anyhow::ensure!(
        auth.authenticate(key).await?.is_ok(),
        "the bench key is valid"
    );
    const CHECKS: u32 = 100_000;
    let started = std::time::Instant::now();
    for _ in 0..CHECKS {
        std::hint::black_box(auth.authenticate(key).await?.is_ok());
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(CHECKS))
}

/// Herald's benchmark (issues 6 and 14).
#[derive(Debug, Parser)]
struct Args {
    /// Events of the ingest phase (and of its ceilings).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events of the end-to-end phase.
    #[arg(long, default_value_t = 100_000)]
    e2e_events: usize,
    /// Offered events/s of the latency phase.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of the latency phase and of the HTTP intake phase.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Offered requests/s of the HTTP intake phase.
    #[arg(long, default_value_t = 500)]
    intake_rate: u32,
    /// Email deliveries of the email phase.
    #[arg(long, default_value_t = 2000)]
    emails: usize,
    /// Where the figures go as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Hold a snapshot open on the phase's database through the end-to-end and steady
    /// phases, as a long report or a forgotten transaction on the primary would: what
    /// Herald's queue reads cost while nothing they leave behind can be cleaned up.
    #[arg(long)]
    hold_snapshot: bool,
}

/// The figures of one run, printed as they come and written as JSON at the end.
#[derive(Default)]
struct Report {
    figures: BTreeMap<&'static str, Value>,
}

impl Report {
    /// Records a figure; `line` (if not empty) is its summary line.
    fn figure(&mut self, key: &'static str, value: impl Into<Value>, line: String) {
        if !line.is_empty() {
            println!("{line}");
        }
        self.figures.insert(key, value.into());
    }

    /// Records what PostgreSQL wrote per event for a phase of `events` since `before`, read
    /// once the counters have settled.
    async fn writes(
        &mut self,
        key: &'static str,
        pool: &PgPool,
        before: &Writes,
        events: usize,
        phase: &str,
        target: Option<&str>,
    ) -> anyhow::Result<()> {
        let per_event = Writes::settled(pool).await?.per_event_since(before, events);
        let mut line = per_event.line(phase);
        if let Some(target) = target {
            line.push_str(&format!(" (target {target})"));
        }
        self.figure(key, per_event.json(), line);
        Ok(())
    }

    /// Records the CPU each process spent per event in a phase.
    fn cpu(&mut self, key: &'static str, per_event: cpu::PerEvent, phase: &str) {
        self.figure(key, per_event.json(), per_event.line(phase));
    }
}

/// Partitions of the upstream topics the generator fills (kafka/topics.toml).
const PARTITIONS: i32 = 6;
/// Sends in flight per channel for the two fast receivers.
const FAST_CONCURRENCY: &str = "128";
const ALL_ROLES: &str = "api,ingest,dispatch,relay,projector,dlq";

/// Issue 14's targets on this machine (the first of each pair of steps it names) and issue
/// 6's memory target, printed after each figure and written to the JSON.
const TARGETS: &[(&str, &str)] = &[
    ("ingest_events_per_s", ">= 20000"),
    ("end_to_end_events_per_s", ">= 5000 (then 10000)"),
    (
        "end_to_end_writes",
        "<= 10 row versions and <= 6 KB of WAL per event",
    ),
    (
        "latency_p99_ms",
        "<= 150 (then 100) at 1000 events/s for 30 s",
    ),
    ("intake_p99_ms", "<= 20 at 500 requests/s"),
    ("peak_rss_mib", "<= 200"),
];

/// The target of the figure `key` in [`TARGETS`].
fn target(key: &str) -> &'static str {
    TARGETS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, t)| *t)
        .expect("every figure with a target is in TARGETS")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    herald::telemetry::init_tracing(herald::telemetry::LogFormat::Text);
    let base = Settings::load()?;
    let routing = RoutingTable::load(ROUTING_FILE.as_ref())?;
    let sink = Sink::start().await?;
    // Both receivers answer at once (Redis, the local sink), so each channel may have more
    // sends in flight than the default 32, which suits providers that throttle. Variables
    // already set in the environment win, to measure other values.
    let concurrency = |var: &str| std::env::var(var).unwrap_or_else(|_| FAST_CONCURRENCY.into());
    let env = vec![
        ("HERALD_ROUTING_FILE", ROUTING_FILE.to_owned()),
        ("HERALD_SLACK_WEBHOOK_URL", sink.url.clone()),
        (
            "HERALD_DISPATCH_CONCURRENCY_SLACK",
            concurrency("HERALD_DISPATCH_CONCURRENCY_SLACK"),
        ),
        (
            "HERALD_DISPATCH_CONCURRENCY_IN_APP",
            concurrency("HERALD_DISPATCH_CONCURRENCY_IN_APP"),
        ),
    ];
    let logs = PathBuf::from("bench/results");
    std::fs::create_dir_all(&logs)?;
    let producer = load::producer(&base.kafka, 5)?;
    let mut bench = Bench {
        args,
        base,
        env,
        logs,
        producer,
        report: Report::default(),
    };

    let rss_ingest = bench.ingest_alone(&routing).await?;
    let mut every = bench.end_to_end().await?;
    bench.steady(&mut every).await?;
    bench.intake(&every).await?;
    bench.email(&every).await?;
    let rss = every.herald.stop().await?;
    bench.peak_rss(rss, rss_ingest);
    bench.report.figure(
        "slack_sink_requests",
        sink.received(),
        format!("slack sink received {} requests", sink.received()),
    );
    bench.write_json()
}

/// The routing the bench's events take: PAYMENT_COMPLETED to IN_APP and SLACK.
const ROUTING_FILE: &str = "bench/routing.toml";

/// What every phase works with.
struct Bench {
    args: Args,
    base: Settings,
    /// Environment for `herald serve`: the routing, the Slack sink, the concurrency.
    env: Vec<(&'static str, String)>,
    logs: PathBuf,
    /// The upstream's producer for backlogs (5 ms linger).
    producer: FutureProducer,
    report: Report,
}

/// Phase 2's Herald with every role, and what the phases after it share.
struct EveryRole {
    run: Run,
    herald: Herald,
    pool: PgPool,
    pids: Pids,
    /// The upstream topic the phases publish to.
    topic: String,
    /// The payment group's committed offsets on it.
    offsets: Offsets,
    /// The snapshot `--hold-snapshot` holds through the end-to-end and steady phases.
    held: Option<HeldSnapshot>,
    /// Notifications left after the retention purge: later phases count on top of them.
    kept: usize,
}

type HeldSnapshot = (sqlx::Transaction<'static, sqlx::Postgres>, Instant);

impl Bench {
    /// Phase 1: ingest alone, and the ceilings on the same events; returns Herald's peak
    /// RSS over it.
    async fn ingest_alone(&mut self, routing: &RoutingTable) -> anyhow::Result<u64> {
        let n = self.args.events;
        let a = Run::new(&self.base, "ingest").await?;
        let topic = a.topic("fluxpay.payment.events");
        let took = load::backlog(&self.producer, &topic, &a.tag, "PAYMENT_COMPLETED", n).await?;
        println!("published {n} events in {:.1} s", took.as_secs_f64());
        let bare_kafka = ceilings::bare_consumer(&a.settings.kafka, &topic, PARTITIONS, n).await?;
        self.report.figure(
            "ceiling_kafka_consumer_msgs_per_s",
            bare_kafka.round(),
            format!("ceiling, bare rdkafka consumer: {bare_kafka:.0} messages/s"),
        );
        let pool = a.migrated_pool().await?;
        let before = Writes::read(&pool).await?;
        let herald = Herald::start(
            &a,
            "ingest",
            &self.env,
            &self.logs.join("herald-ingest.log"),
        )
        .await?;
        let pids = Pids::find(herald.pid(), &pool, &self.base.kafka.brokers).await?;
        let cpu = Cpu::read(&pids);
        let group = format!("{}notif-payment", a.settings.kafka.topic_prefix);
        let offsets = Offsets::new(&a, &group, &topic)?;
        // The group's committed offsets say when the phase is done. (Counting the growing
        // table every 25 ms instead, as this loop once did, kept a fifth of a core of
        // PostgreSQL busy with the bench's own reads while it measured Herald.)
        let done = offsets
            .wait_stored(&pool, n, n, Duration::from_secs(1800))
            .await?;
        let first = first_created(&pool).await?;
        let ingest = n as f64 / seconds(done - first);
        let cpu = Cpu::read(&pids).per_event_since(&cpu, n);
        let rss = herald.stop().await?;
        self.report
            .writes("ingest_writes", &pool, &before, n, "ingest", None)
            .await?;
        self.report.cpu("ingest_cpu_ms_per_event", cpu, "ingest");
        self.report.figure(
            "ingest_events_per_s",
            ingest.round(),
            format!(
                "ingest: {ingest:.0} events/s ({n} events, {:.2} s from the first stored notification until all stored and committed; target {})",
                seconds(done - first),
                target("ingest_events_per_s")
            ),
        );
        self.bare_insert(routing, ingest, bare_kafka).await?;
        Ok(rss)
    }

    /// The bare batched INSERT ceiling of phase 1, and ingest's ratios to both ceilings.
    async fn bare_insert(
        &mut self,
        routing: &RoutingTable,
        ingest: f64,
        bare_kafka: f64,
    ) -> anyhow::Result<()> {
        let batch = self.base.ingest.batch_max_messages;
        let bare = Run::new(&self.base, "bare").await?;
        let pool = bare.migrated_pool().await?;
        let (bare_events, bare_rows) =
            ceilings::bare_insert(&pool, routing, &bare.tag, self.args.events, batch).await?;
        let report = &mut self.report;
        report.figure(
            "ceiling_bare_insert_rows_per_s",
            bare_rows.round(),
            format!(
                "ceiling, bare batched INSERT: {bare_rows:.0} rows/s = {bare_events:.0} events/s (a notification and 2 deliveries each, {batch} per transaction)"
            ),
        );
        report.figure(
            "ceiling_bare_insert_events_per_s",
            bare_events.round(),
            String::new(),
        );
        report.figure(
            "ratio_ingest_to_bare_consumer",
            ratio(ingest, bare_kafka),
            format!(
                "ratio ingest / bare consumer: {:.3}; ingest / bare INSERT: {:.3}",
                ingest / bare_kafka,
                ingest / bare_events
            ),
        );
        report.figure(
            "ratio_ingest_to_bare_insert",
            ratio(ingest, bare_events),
            String::new(),
        );
        Ok(())
    }

    /// Phase 2 begins: one Herald with every role works off a backlog until every delivery
    /// is terminal and projected; then what the retention purge of that history costs.
    async fn end_to_end(&mut self) -> anyhow::Result<EveryRole> {
        let b = Run::new(&self.base, "e2e").await?;
        let topic = b.topic("fluxpay.payment.events");
        let e = self.args.e2e_events;
        let tag = format!("{}-e2e", b.tag);
        load::backlog(&self.producer, &topic, &tag, "PAYMENT_COMPLETED", e).await?;
        let pool = b.migrated_pool().await?;
        let held = if self.args.hold_snapshot {
            Some(hold_snapshot(&pool).await?)
        } else {
            None
        };
        let before = Writes::read(&pool).await?;
        let herald =
            Herald::start(&b, ALL_ROLES, &self.env, &self.logs.join("herald-all.log")).await?;
        let pids = Pids::find(herald.pid(), &pool, &self.base.kafka.brokers).await?;
        let cpu = Cpu::read(&pids);
        let group = format!("{}notif-payment", b.settings.kafka.topic_prefix);
        let offsets = Offsets::new(&b, &group, &topic)?;
        let consumed = Stored::Consumed {
            offsets: &offsets,
            published: e,
            notifications: e,
        };
        let CaughtUp {
            ingested,
            dispatched,
            done,
        } = wait_caught_up(&pool, consumed, Duration::from_secs(1800)).await?;
        let cpu = Cpu::read(&pids).per_event_since(&cpu, e);
        let first = first_created(&pool).await?;
        let e2e = e as f64 / seconds(done - first);
        let ingest_loaded = e as f64 / seconds(ingested - first);
        let not_success = count(
            &pool,
            "SELECT count(*) FROM deliveries WHERE status <> 'SUCCESS'",
        )
        .await?;
        let report = &mut self.report;
        report.figure(
            "end_to_end_events_per_s",
            e2e.round(),
            format!(
                "end to end: {e2e:.0} events/s ({e} events, {} deliveries, {:.1} s until every delivery terminal and projected, {not_success} not SUCCESS; target {})",
                2 * e,
                seconds(done - first),
                target("end_to_end_events_per_s")
            ),
        );
        report.figure(
            "end_to_end_dispatched_s",
            (seconds(dispatched - first) * 10.0).round() / 10.0,
            format!(
                "end to end, where the time went: every notification stored after {:.1} s, every delivery terminal after {:.1} s, the read model caught up after {:.1} s",
                seconds(ingested - first),
                seconds(dispatched - first),
                seconds(done - first)
            ),
        );
        report
            .writes(
                "end_to_end_writes",
                &pool,
                &before,
                e,
                "end to end (2 deliveries per event, both SUCCESS first time)",
                Some(target("end_to_end_writes")),
            )
            .await?;
        report.cpu("end_to_end_cpu_ms_per_event", cpu, "end to end");
        let kept = self.retention_purge(&b, &pool).await?;
        self.report.figure(
            "ingest_with_every_role_events_per_s",
            ingest_loaded.round(),
            format!("ingest while dispatching and projecting: {ingest_loaded:.0} events/s"),
        );
        Ok(EveryRole {
            run: b,
            herald,
            pool,
            pids,
            topic,
            offsets,
            held,
            kept,
        })
    }

    /// What deleting the end-to-end phase's history costs when its retention runs out: the
    /// purge with a cutoff of now, per notification it deletes. Returns the notifications
    /// it kept (none, in a run from a fresh database).
    async fn retention_purge(&mut self, run: &Run, pool: &PgPool) -> anyhow::Result<usize> {
        let before = Writes::settled(pool).await?;
        // Its own pool, closed after: a backend that goes idle reports its table counters
        // only after a while, one that exits reports them at once.
        let purge_pool = herald::db::pool(&run.settings.database)?;
        let purged = herald::retention::purge(
            &purge_pool,
            herald::retention::Cutoffs::at(Utc::now()),
            chrono_tz::UTC,
        )
        .await?
        .unwrap_or_default();
        purge_pool.close().await;
        let kept = count(pool, "SELECT count(*) FROM notifications").await? as usize;
        self.report
            .writes(
                "retention_writes",
                pool,
                &before,
                purged.notifications as usize,
                &format!(
                    "retention purge ({} notifications deleted, per notification)",
                    purged.notifications
                ),
                None,
            )
            .await?;
        Ok(kept)
    }

    /// The steady load: events at `--rate` for `--seconds`, open loop; its writes, its CPU
    /// and each delivery's latency from occurredAt to SUCCESS.
    async fn steady(&mut self, every: &mut EveryRole) -> anyhow::Result<()> {
        let (rate, pool) = (self.args.rate, &every.pool);
        let tag = format!("{}-lat", every.run.tag);
        let fast = load::producer(&self.base.kafka, 0)?;
        let before = Writes::settled(pool).await?;
        let cpu = Cpu::read(&every.pids);
        let duration = Duration::from_secs(self.args.seconds);
        let offered = load::open_loop(
            &fast,
            &every.topic,
            &tag,
            "PAYMENT_COMPLETED",
            rate,
            duration,
        )
        .await?;
        // The next phase then measures an idle Herald, not its relay and projector still
        // draining this phase's events.
        let consumed = Stored::Consumed {
            offsets: &every.offsets,
            published: self.args.e2e_events + offered,
            notifications: every.kept + offered,
        };
        wait_caught_up(pool, consumed, Duration::from_secs(600)).await?;
        let cpu = Cpu::read(&every.pids).per_event_since(&cpu, offered);
        // The same writes under a steady load below capacity, where a delivery is created
        // and finished within the projector's linger (the backlog above is the worst case
        // for it).
        self.report
            .writes(
                "steady_writes",
                pool,
                &before,
                offered,
                &format!("at {rate} events/s (2 deliveries per event)"),
                None,
            )
            .await?;
        self.report.cpu(
            "steady_cpu_ms_per_event",
            cpu,
            &format!("at {rate} events/s"),
        );
        if let Some((snapshot, since)) = every.held.take() {
            snapshot.rollback().await?;
            let since = since.elapsed().as_secs_f64();
            self.report.figure(
                "snapshot_held_s",
                since.round(),
                format!(
                    "a snapshot was held on the database for {since:.0} s, through the end-to-end and steady phases (--hold-snapshot)"
                ),
            );
        }
        self.latency(pool, &tag).await
    }

    /// Each SUCCESS delivery's occurredAt -> completed_at in the steady phase (events
    /// tagged `tag`), and the same time split at two stamps: the notification's created_at
    /// (set as ingest prepares it) and the start of the successful attempt.
    async fn latency(&mut self, pool: &PgPool, tag: &str) -> anyhow::Result<()> {
        // The phase's rows can be newer than the tables' statistics, and a plan made
        // without them once ran this query as a nested loop over every delivery for minutes.
        sqlx::query("ANALYZE notifications, deliveries, delivery_attempts")
            .execute(pool)
            .await?;
        // One pass over the phase's deliveries.
        let lat: (f64, f64, f64, i64, f64, f64, f64, f64, f64, f64) = sqlx::query_as(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                     percentile_cont(0.95) WITHIN GROUP (ORDER BY ms), \
                     percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), count(*), \
                     percentile_cont(0.5) WITHIN GROUP (ORDER BY ingest), \
                     percentile_cont(0.99) WITHIN GROUP (ORDER BY ingest), \
                     percentile_cont(0.5) WITHIN GROUP (ORDER BY queued), \
                     percentile_cont(0.99) WITHIN GROUP (ORDER BY queued), \
                     percentile_cont(0.5) WITHIN GROUP (ORDER BY sent), \
                     percentile_cont(0.99) WITHIN GROUP (ORDER BY sent) \
                 FROM (SELECT extract(epoch FROM d.completed_at - n.occurred_at) * 1000 AS ms, \
                              extract(epoch FROM n.created_at - n.occurred_at) * 1000 AS ingest, \
                              extract(epoch FROM a.started_at - n.created_at) * 1000 AS queued, \
                              extract(epoch FROM d.completed_at - a.started_at) * 1000 AS sent \
                       FROM deliveries d JOIN notifications n ON n.id = d.notification_id \
                       LEFT JOIN delivery_attempt_log a \
                           ON a.delivery_id = d.id AND a.attempt = d.attempts \
                       WHERE n.event_id LIKE $1 AND d.status = 'SUCCESS') t",
        )
        .bind(format!("{tag}-%"))
        .fetch_one(pool)
        .await?;
        let (p50, p95, p99, samples) = (lat.0, lat.1, lat.2, lat.3);
        let report = &mut self.report;
        report.figure(
            "latency_p99_ms",
            p99,
            format!(
                "latency occurredAt->SUCCESS at {} events/s open loop for {} s ({samples} deliveries): p50 {p50:.1} ms, p95 {p95:.1} ms, p99 {p99:.1} ms (target p99 {})",
                self.args.rate,
                self.args.seconds,
                target("latency_p99_ms")
            ),
        );
        report.figure("latency_p50_ms", p50, String::new());
        report.figure("latency_p95_ms", p95, String::new());
        report.figure(
            "latency_stages_ms",
            json!({
                "ingest": {"p50": lat.4, "p99": lat.5},
                "queued": {"p50": lat.6, "p99": lat.7},
                "sent": {"p50": lat.8, "p99": lat.9},
            }),
            format!(
                "latency, where the time went (p50 / p99): occurredAt to stored {:.1} / {:.1} ms, stored to send started {:.1} / {:.1} ms, send started to recorded {:.1} / {:.1} ms",
                lat.4, lat.5, lat.6, lat.7, lat.8, lat.9
            ),
        );
        Ok(())
    }

    /// The HTTP intake as an upstream service would call it: with an API key holding
    /// notifications:write, first without and then with an Idempotency-Key on each request
    /// (the two take different paths to the database); then what checking that key costs.
    async fn intake(&mut self, every: &EveryRole) -> anyhow::Result<()> {
        let key = herald::auth::keys::create(
            &every.pool,
            "bench-intake",
            &[herald::auth::Scope::NotificationsWrite],
            "bench",
        )
        .await?
        .secret;
        let api_base = format!("http://{}", every.herald.addr);
        let target_of = IntakeTarget {
            base: &api_base,
            credential: &key,
            pool: &every.pool,
            pids: &every.pids,
        };
        let (rate, seconds) = (self.args.intake_rate, self.args.seconds);
        let phase = Duration::from_secs(seconds);
        let IntakePhase {
            p50,
            p99,
            failed,
            cpu,
        } = intake_phase(&target_of, &every.run.tag, rate, phase, false).await?;
        let report = &mut self.report;
        report.figure(
            "intake_p99_ms",
            p99,
            format!(
                "HTTP intake with an API key at {rate} requests/s open loop for {seconds} s: p50 {p50:.1} ms, p99 {p99:.1} ms, {failed} (target p99 {})",
                target("intake_p99_ms")
            ),
        );
        report.figure("intake_p50_ms", p50, String::new());
        report.cpu(
            "intake_cpu_ms_per_request",
            cpu,
            &format!(
                "HTTP intake at {rate} requests/s, per request with its IN_APP send, relay and projection"
            ),
        );
        let keyed_tag = format!("{}-keyed", every.run.tag);
        let IntakePhase {
            p50,
            p99,
            failed,
            cpu,
        } = intake_phase(&target_of, &keyed_tag, rate, phase, true).await?;
        report.figure(
            "intake_idempotency_key_p99_ms",
            p99,
            format!(
                "HTTP intake with an Idempotency-Key on each request, same load: p50 {p50:.1} ms, p99 {p99:.1} ms, {failed}"
            ),
        );
        report.figure("intake_idempotency_key_p50_ms", p50, String::new());
        report.cpu(
            "intake_idempotency_key_cpu_ms_per_request",
            cpu,
            "HTTP intake with an Idempotency-Key, per request with its IN_APP send, relay and projection",
        );
        let check = key_check_cost(&every.pool, &key).await?;
        report.figure(
            "key_check_us",
            check,
            format!("checking a cached API key: {check:.2} microseconds per request"),
        );
        Ok(())
    }

    /// Email deliveries/s into MailDev: `--emails` ORDER_COMPLETED events, from the first
    /// delivery created to the last completed.
    async fn email(&mut self, every: &EveryRole) -> anyhow::Result<()> {
        let m = self.args.emails;
        let topic = every.run.topic("fluxpay.order.events");
        let tag = format!("{}-mail", every.run.tag);
        load::backlog(&self.producer, &topic, &tag, "ORDER_COMPLETED", m).await?;
        let email = loop {
            let (total, open, sent, from, to): (
                i64,
                i64,
                i64,
                Option<DateTime<Utc>>,
                Option<DateTime<Utc>>,
            ) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE status IN ('PENDING', 'PROCESSING')), \
                     count(*) FILTER (WHERE status = 'SUCCESS'), min(created_at), max(completed_at) \
                 FROM deliveries WHERE channel = 'EMAIL'",
            )
            .fetch_one(&every.pool)
            .await?;
            if total >= m as i64
                && open == 0
                && let (Some(from), Some(to)) = (from, to)
            {
                break sent as f64 / seconds(to - from);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.report.figure(
            "email_per_s",
            email.round(),
            format!("email into MailDev (pooled SMTP): {email:.0} deliveries/s ({m} emails)"),
        );
        Ok(())
    }

    /// Herald's peak RSS (VmHWM) with every role through phase 2 and ingesting alone.
    fn peak_rss(&mut self, every_role: u64, ingest_alone: u64) {
        let mib = |b: u64| (b as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0;
        self.report.figure(
            "peak_rss_mib",
            mib(every_role),
            format!(
                "peak RSS (VmHWM) of herald serve: {:.1} MiB with every role through phase 2, {:.1} MiB ingesting alone (target {})",
                mib(every_role),
                mib(ingest_alone),
                target("peak_rss_mib")
            ),
        );
        self.report
            .figure("peak_rss_ingest_only_mib", mib(ingest_alone), String::new());
    }

    /// Writes the figures and the targets as JSON to `--out`, if given.
    fn write_json(&self) -> anyhow::Result<()> {
        let Some(out) = &self.args.out else {
            return Ok(());
        };
        let targets: BTreeMap<&str, &str> = TARGETS.iter().copied().collect();
        let json = json!({
            "figures": self.report.figures,
            "targets": targets,
            "args": format!("{:?}", self.args),
            "machine": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            },
        });
        std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
        Ok(())
    }
}

/// When the first notification of a phase's fresh database was stored.
async fn first_created(pool: &PgPool) -> anyhow::Result<DateTime<Utc>> {
    Ok(
        sqlx::query_scalar("SELECT min(created_at) FROM notifications")
            .fetch_one(pool)
            .await?,
    )
}

fn seconds(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}

/// Opens a transaction that holds its snapshot until it ends (`--hold-snapshot`): while
/// it lasts, no row version it might see can be pruned, nor its index entries dropped.
async fn hold_snapshot(pool: &PgPool) -> anyhow::Result<HeldSnapshot> {
    let mut snapshot = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *snapshot)
        .await?;
    sqlx::query("SELECT count(*) FROM pg_class")
        .execute(&mut *snapshot)
        .await?;
    Ok((snapshot, Instant::now()))
}

async fn count(pool: &PgPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// When a phase's work was done: its last notification stored, its last delivery
/// finished (both from the rows), and the read model seen caught up (by polling).
struct CaughtUp {
    ingested: DateTime<Utc>,
    dispatched: DateTime<Utc>,
    done: DateTime<Utc>,
}

/// What says a phase's notifications are all stored.
enum Stored<'a> {
    /// They came over HTTP and were stored before their requests were answered.
    Already,
    /// They are the first `published` messages of a fresh topic, so they are stored once
    /// the group's committed offsets cover them (Herald stores an offset only after the
    /// rows before it are committed); then `notifications` rows exist.
    Consumed {
        offsets: &'a Offsets,
        published: usize,
        notifications: usize,
    },
}

/// Waits until the notifications are stored, every delivery is terminal and the read
/// model holds a terminal row for each. Each step is polled with a query cheap enough not
/// to slow Herald down: counting three tables every 100 ms took a sizeable share of a
/// core, and counting the notifications every 250 ms while a backlog was stored still
/// took 1 s of PostgreSQL's time in 15 s (`pg_stat_statements`), counted in its CPU per
/// event, so a consumed phase watches the group's offsets on the broker instead.
async fn wait_caught_up(
    pool: &PgPool,
    stored: Stored<'_>,
    timeout: Duration,
) -> anyhow::Result<CaughtUp> {
    const POLL: Duration = Duration::from_millis(250);
    // Once every delivery is terminal the pipeline is idle but for the relay and the
    // projector, and only the read model is waited on: a count every 50 ms (about 25 ms
    // of one core for 200,000 rows) then puts the end of the phase within 50 ms of when
    // the last row was written, where a poll every 250 ms read it about 125 ms late on
    // average.
    const FINAL_POLL: Duration = Duration::from_millis(50);
    let started = Instant::now();
    let waited = |what: String| {
        anyhow::ensure!(started.elapsed() < timeout, "timed out: {what}");
        Ok(())
    };
    if let Stored::Consumed {
        offsets,
        published,
        notifications,
    } = stored
    {
        offsets
            .wait_stored(pool, published, notifications, timeout)
            .await?;
    }
    loop {
        // Herald's own count of the dispatch queue, through the dispatcher's partial
        // indexes: `status = 'PENDING'` alone matches none of them and read the whole
        // table on each poll.
        let queue = herald::deliveries::queue_depth(pool).await?;
        if queue.pending + queue.held + queue.processing == 0 {
            break;
        }
        waited("deliveries still open".to_owned())?;
        tokio::time::sleep(POLL).await;
    }
    let deliveries = count(pool, "SELECT count(*) FROM deliveries").await?;
    loop {
        let projected = count(
            pool,
            "SELECT count(*) FROM notification_log WHERE status IN ('SUCCESS', 'FAILED', 'SKIPPED')",
        )
        .await?;
        if projected >= deliveries {
            break;
        }
        waited(format!("{projected}/{deliveries} projected"))?;
        tokio::time::sleep(FINAL_POLL).await;
    }
    let done = Utc::now();
    let (ingested, dispatched): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "SELECT (SELECT max(created_at) FROM notifications), \
             (SELECT max(completed_at) FROM deliveries)",
    )
    .fetch_one(pool)
    .await?;
    Ok(CaughtUp {
        ingested,
        dispatched,
        done,
    })
}

/// A consumer group's committed offsets on a fresh topic.
struct Offsets {
    consumer: BaseConsumer,
    partitions: TopicPartitionList,
}

impl Offsets {
    fn new(run: &Run, group: &str, topic: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = herald::kafka::client_config(&run.settings.kafka)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            partitions.add_partition(topic, partition);
        }
        Ok(Offsets {
            consumer,
            partitions,
        })
    }

    /// Waits until the group has committed past all `published` messages (Herald stores an
    /// offset only after the rows before it are committed), then checks that
    /// `notifications` rows exist; returns when the offsets were seen committed.
    async fn wait_stored(
        &self,
        pool: &PgPool,
        published: usize,
        notifications: usize,
        timeout: Duration,
    ) -> anyhow::Result<DateTime<Utc>> {
        let started = Instant::now();
        let done = loop {
            if self.all_committed(published)? {
                break Utc::now();
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "timed out: {published} messages not all committed"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let rows = count(pool, "SELECT count(*) FROM notifications").await?;
        anyhow::ensure!(
            rows as usize >= notifications,
            "the group committed past all {published} messages, but {rows} of {notifications} notifications are stored"
        );
        Ok(done)
    }

    /// True when the group has committed past all `published` messages of the topic. The
    /// topic is fresh, so its offsets start at 0 and the committed offsets add up to the
    /// messages consumed. (Tansu's high watermarks trail the end of a batch, so they
    /// cannot be the yardstick.)
    fn all_committed(&self, published: usize) -> anyhow::Result<bool> {
        let committed = self
            .consumer
            .committed_offsets(self.partitions.clone(), Duration::from_secs(10))?;
        let mut total = 0;
        for element in committed.elements() {
            match element.offset() {
                rdkafka::Offset::Offset(offset) => total += offset,
                _ => return Ok(false),
            }
        }
        Ok(total as usize >= published)
    }
}
