//! What every fault scenario needs: the `faults` stack and its services, the real `herald`
//! binary as child processes, a load of events, doubles of the third-party receivers, and
//! the audit that checks every event's fate and prints the scenario's figures.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::OpenOptions,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection, PgPool, postgres::PgPoolOptions};
use uuid::Uuid;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::method};

/// The stack profile the suite runs on (its own ports and data, see scripts/stack.sh).
const PROFILE: &str = "faults";

/// Sends in flight per channel and instance (HERALD_DISPATCH_CONCURRENCY, the default).
pub const CONCURRENCY: usize = 32;

/// The scenarios share one stack and stop its services: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/stack.sh ARGS...` and panics with its output if it fails.
fn stack_script(args: &[&str]) -> String {
    let output = Command::new(root().join("scripts/stack.sh"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("scripts/stack.sh runs");
    assert!(
        output.status.success(),
        "scripts/stack.sh {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `faults` stack: where its services listen, and the switch of each.
pub struct Stack {
    vars: BTreeMap<String, String>,
}

impl Stack {
    fn load() -> Self {
        let vars = stack_script(&["env", PROFILE])
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        let stack = Stack { vars };
        let status = stack_script(&["status", PROFILE]);
        assert!(
            !status.contains(" down "),
            "the faults stack is not fully up; run the suite with `make test-faults`:\n{status}"
        );
        stack
    }

    /// One variable of `scripts/stack.sh env faults`.
    pub fn var(&self, name: &str) -> &str {
        &self.vars[name]
    }

    /// Stops one service: `postgres`, `redis`, `smtp` or `kafka` (whose topics are in
    /// memory: started again, it has none).
    pub fn stop(&self, service: &str) {
        stack_script(&["stop", PROFILE, service]);
    }

    /// Starts one service again and waits until it is ready.
    pub fn start(&self, service: &str) {
        stack_script(&["start", PROFILE, service]);
    }

    /// Freezes the broker (SIGSTOP): its connections stay open and nothing answers.
    pub fn pause_broker(&self) {
        stack_script(&["pause", PROFILE, "kafka"]);
    }

    /// Lets the broker run again (SIGCONT).
    pub fn resume_broker(&self) {
        stack_script(&["resume", PROFILE, "kafka"]);
    }
}

/// One upstream event of the load.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub key: String,
    pub bytes: Vec<u8>,
}

/// `count` order events of `event_type` spread over `users` users, with addresses only this
/// scenario uses.
pub fn order_events(event_type: &str, count: usize, users: i64, tag: &str) -> Vec<Event> {
    (0..count)
        .map(|i| order_event(event_type, 1 + i as i64 % users, tag))
        .collect()
}

/// One valid order event for `user`.
pub fn order_event(event_type: &str, user: i64, tag: &str) -> Event {
    let id = Uuid::new_v4().to_string();
    let envelope = json!({
        "eventId": id,
        "eventType": event_type,
        "occurredAt": chrono::Utc::now().to_rfc3339(),
        "userId": user,
        "recipient": {
            "email": format!("user{user}@{tag}.faults.example"),
            "phone": format!("+8210{user:08}"),
            "locale": "en",
        },
        "data": {
            "orderId": format!("o-{id}"), "carrier": "CJ", "trackingNumber": "T-1",
            "amount": 12000, "currency": "KRW", "itemCount": 2, "reason": "changed mind",
        },
    });
    Event {
        key: user.to_string(),
        bytes: envelope.to_string().into_bytes(),
        id,
    }
}

/// A free loopback port for a Herald instance's HTTP listener.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// One fault scenario: a fresh database, topic prefix and Redis prefix on the faults stack,
/// the settings its Herald instances share, and the clock of its run.
pub struct Scenario {
    pub name: &'static str,
    pub stack: Stack,
    /// The scenario's own database.
    pub db: PgPool,
    /// Topic prefix (and part of the Redis prefix and of the email domain).
    pub prefix: String,
    env: BTreeMap<String, String>,
    started: Instant,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Scenario {
    /// Makes the database and topics and the settings (`overrides` on top of the suite's).
    pub async fn start(name: &'static str, overrides: &[(&str, String)]) -> Scenario {
        let serial = SERIAL.lock().await;
        let stack = Stack::load();
        let tag = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let prefix = format!("f{tag}.");

        let server_url = stack.var("HERALD_DATABASE_URL").to_owned();
        let database = format!("herald_fault_{name}_{tag}");
        PgConnection::connect(&server_url)
            .await
            .expect("the faults PostgreSQL accepts connections")
            .execute(sqlx::AssertSqlSafe(format!(
                r#"CREATE DATABASE "{database}""#
            )))
            .await
            .expect("a scenario database can be created");
        let mut db_url = url::Url::parse(&server_url).expect("a database URL");
        db_url.set_path(&database);

        let mut env: BTreeMap<String, String> = [
            ("HERALD_DATABASE_URL", db_url.to_string()),
            (
                "HERALD_KAFKA_BROKERS",
                stack.var("HERALD_KAFKA_BROKERS").into(),
            ),
            ("HERALD_REDIS_URL", stack.var("HERALD_REDIS_URL").into()),
            ("HERALD_SMTP_URL", stack.var("HERALD_SMTP_URL").into()),
            ("HERALD_TOPIC_PREFIX", prefix.clone()),
            ("HERALD_REDIS_KEY_PREFIX", format!("herald:{prefix}")),
            ("HERALD_ROUTING_FILE", "tests/faults/routing.toml".into()),
            ("HERALD_ADMIN_TOKEN", ADMIN_TOKEN.into()),
            // A dead instance's deliveries are reclaimed after 10 s instead of a minute; a
            // send may take 5 s, well under the lease.
            ("HERALD_DISPATCH_LEASE_SECS", "10".into()),
            ("HERALD_SEND_TIMEOUT_SECS", "5".into()),
            // An open breaker probes every 2 s, so recovery is seen within the scenario.
            ("HERALD_BREAKER_COOLDOWN_SECS", "2".into()),
            ("HERALD_SHUTDOWN_GRACE_PERIOD_SECS", "10".into()),
            ("HERALD_DISPATCH_CONCURRENCY", CONCURRENCY.to_string()),
            // Every channel at the same bound (the file raises IN_APP's), which the
            // duplicate-send audits rely on.
            (
                "HERALD_DISPATCH_CONCURRENCY_IN_APP",
                CONCURRENCY.to_string(),
            ),
            // No limits unless a scenario sets one: the load must not wait a minute.
            ("HERALD_RATE_LIMIT_SMS", String::new()),
            ("HERALD_RATE_LIMIT_KAKAOTALK", String::new()),
            ("RUST_LOG", "info,librdkafka=warn,sqlx=warn".into()),
            // Logs a scenario can read back (Herald::log_records).
            ("HERALD_LOG_FORMAT", "json".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (name, value) in overrides {
            env.insert((*name).to_owned(), value.clone());
        }

        let scenario = Scenario {
            name,
            db: PgPoolOptions::new()
                .max_connections(3)
                .acquire_timeout(Duration::from_secs(2))
                .connect_lazy(db_url.as_str())
                .expect("a database URL"),
            stack,
            prefix,
            env,
            started: Instant::now(),
            _serial: serial,
        };
        scenario.create_topics();
        // The schema exists before any instance starts: the scenario's first reads may
        // come before a slow-starting child has run its own (then idle) migrations.
        herald::db::migrate(&scenario.db)
            .await
            .expect("the scenario database is migrated");
        scenario
    }

    /// Creates the scenario's topics that do not exist (`herald topics create`, as `make
    /// run` does at its start).
    pub fn create_topics(&self) {
        let topics = self
            .herald_command()
            .args(["topics", "create"])
            .output()
            .expect("herald runs");
        assert!(
            topics.status.success(),
            "herald topics create: {}",
            String::from_utf8_lossy(&topics.stderr)
        );
    }

    /// The email domain of this scenario's recipients.
    pub fn tag(&self) -> &str {
        self.prefix.trim_end_matches('.')
    }

    fn herald_command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command.current_dir(root());
        // Only the scenario's settings: nothing from the caller's environment leaks in.
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("HERALD_")) {
            command.env_remove(name);
        }
        command.envs(&self.env);
        command
    }

    /// Starts `herald serve` as instance `instance` with extra settings; its logs go to
    /// target/tmp/faults/{scenario}-{instance}.log (appended to across restarts).
    pub fn spawn(&self, instance: &str, extra: &[(&str, String)]) -> Herald {
        let port = free_port();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults");
        std::fs::create_dir_all(&dir).expect("the log folder can be made");
        let log = dir.join(format!("{}-{instance}.log", self.name));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("the log file opens");
        let log_from = file.metadata().map_or(0, |m| m.len() as usize);
        let mut command = self.herald_command();
        command
            .arg("serve")
            .env("HERALD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .envs(extra.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log file"))
            .stderr(file);
        let child = command.spawn().expect("herald starts");
        Herald {
            name: instance.to_owned(),
            child,
            address: format!("http://127.0.0.1:{port}"),
            log,
            log_from,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .default_headers(reqwest::header::HeaderMap::from_iter([(
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {ADMIN_TOKEN}")
                        .parse()
                        .expect("a header value"),
                )]))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Publishes events to an upstream topic (unprefixed name), all in flight at once.
    pub async fn publish(&self, topic: &str, events: &[Event]) {
        let raw: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|e| (e.key.clone(), e.bytes.clone()))
            .collect();
        self.publish_raw(topic, &raw).await;
    }

    /// Publishes (key, bytes) messages, hostile ones included.
    pub async fn publish_raw(&self, topic: &str, messages: &[(String, Vec<u8>)]) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.stack.var("HERALD_KAFKA_BROKERS"))
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", "2000000")
            // One message per record batch. Tansu 0.6.0 answers a fetch from an offset
            // inside a record batch with the batches after it (tansu-storage dynostore.rs,
            // `offsets.split_off(&offset)`), so a consumer group that resumes mid-batch after
            // a rebalance skips the rest of that batch. Kafka returns the whole batch and
            // the client drops the records before the offset. Single-message batches keep
            // the broker's bug out of Herald's figures; see the fault suite in README.md.
            .set("batch.num.messages", "1")
            .create()
            .expect("a Kafka producer");
        let topic = format!("{}{topic}", self.prefix);
        for chunk in messages.chunks(2000) {
            let sends = chunk.iter().map(|(key, payload)| {
                producer.send(
                    FutureRecord::to(&topic).key(key).payload(payload),
                    Duration::from_secs(30),
                )
            });
            for sent in join_all(sends).await {
                sent.map_err(|(e, _)| e)
                    .expect("the faults broker takes the message");
            }
        }
    }

    /// Counts of the scenario's tables, or the database error while PostgreSQL is down.
    pub async fn tally(&self) -> Result<Tally, sqlx::Error> {
        let notifications: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
            .fetch_one(&self.db)
            .await?;
        let by_status: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM deliveries GROUP BY status")
                .fetch_all(&self.db)
                .await?;
        let dead_letters: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox_messages WHERE kind = 'dead_letter'")
                .fetch_one(&self.db)
                .await?;
        let dlq_messages: i64 = sqlx::query_scalar("SELECT count(*) FROM dlq_messages")
            .fetch_one(&self.db)
            .await?;
        Ok(Tally {
            notifications,
            deliveries: by_status.into_iter().collect(),
            dead_letters,
            dlq_messages,
        })
    }

    /// Waits until `expected` deliveries exist and none is PENDING or PROCESSING, and every
    /// dead letter has reached the DLQ store.
    pub async fn wait_settled(&self, expected: i64, seconds: u64) -> Tally {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut last = None;
        let mut settled = false;
        while !settled && Instant::now() < deadline {
            if let Ok(tally) = self.tally().await {
                settled = tally.total() == expected
                    && tally.count("PENDING") + tally.count("PROCESSING") == 0
                    && tally.dlq_messages == tally.dead_letters;
                last = Some(tally);
            }
            if !settled {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert!(
            settled,
            "fault {}: deliveries did not settle within {seconds} s (expected {expected}); last \
             count {last:?}",
            self.name
        );
        last.expect("a tally was read")
    }

    /// Checks every event's fate: its notification exists once, each delivery ended SUCCESS
    /// (or FAILED with its dead letter in the DLQ store, or SKIPPED), and each SUCCESS of a
    /// channel in `receipts` was received. Receipts counted twice are duplicate sends.
    pub async fn audit(&self, events: &[Event], receipts: &Receipts) -> Audit {
        let stored: Vec<(String, i64)> = sqlx::query_as(
            "SELECT event_id, count(*) FROM notifications WHERE event_id IS NOT NULL GROUP BY event_id",
        )
        .fetch_all(&self.db)
        .await
        .expect("notifications can be read");
        let stored: HashMap<String, i64> = stored.into_iter().collect();
        let deliveries: Vec<(String, String, String, bool, i32)> = sqlx::query_as(
            "SELECT d.id::text, d.channel, d.status, \
                 EXISTS (SELECT 1 FROM dlq_messages m WHERE m.delivery_id = d.id), d.attempts \
             FROM deliveries d",
        )
        .fetch_all(&self.db)
        .await
        .expect("deliveries can be read");

        let mut audit = Audit {
            events: events.len(),
            notifications: stored.values().sum::<i64>() as usize,
            deliveries: deliveries.len(),
            ..Audit::default()
        };
        for event in events {
            match stored.get(&event.id) {
                None => audit.lost_events += 1,
                Some(n) if *n > 1 => audit.duplicate_notifications += (*n - 1) as usize,
                Some(_) => {}
            }
        }
        for (id, channel, status, dead_lettered, attempts) in &deliveries {
            match status.as_str() {
                "SUCCESS" => {
                    audit.succeeded += 1;
                    if *attempts > 1 {
                        audit.retried += 1;
                    }
                    if receipts.channels.contains(channel.as_str())
                        && !receipts.counts.contains_key(id)
                    {
                        audit.unreceived += 1;
                    }
                }
                "FAILED" if *dead_lettered => audit.dead_lettered += 1,
                "SKIPPED" => audit.skipped += 1,
                _ => audit.unfinished += 1,
            }
        }
        for (id, _, _, _, attempts) in &deliveries {
            let received = receipts.counts.get(id).copied().unwrap_or(0);
            audit.duplicate_sends += received.saturating_sub(1);
            audit.unaccounted += received.saturating_sub((*attempts).max(0) as usize);
        }
        audit
    }

    /// Prints the scenario's one summary line.
    pub fn report(&self, audit: &Audit, bound: Option<usize>, extra: &str) {
        let bound = bound.map(|b| format!(" (bound {b})")).unwrap_or_default();
        println!(
            "fault {}: events {}, notifications {}, deliveries {}, duplicate sends {}{bound}, lost {}{}{extra} [{:.0} s]",
            self.name,
            audit.events,
            audit.notifications,
            audit.deliveries,
            audit.duplicate_sends,
            audit.lost(),
            if extra.is_empty() { "" } else { ", " },
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Attempts on `channel` that failed in a way worth retrying.
    pub async fn retryable_attempts(&self, channel: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM delivery_attempt_log WHERE channel = $1 AND outcome = 'RETRYABLE'",
        )
        .bind(channel)
        .fetch_one(&self.db)
        .await
        .expect("attempts can be read")
    }

    /// The most attempts of `channel` Herald started within any one second (what its
    /// shared rate limiter admitted), first-time successes included (they are stored on
    /// the delivery, hence the view).
    pub async fn busiest_second_of_attempts(&self, channel: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT COALESCE(max(n), 0) FROM (SELECT count(*) OVER (ORDER BY started_at \
                 RANGE BETWEEN CURRENT ROW AND interval '999.999 milliseconds' FOLLOWING) AS n \
             FROM delivery_attempt_log WHERE channel = $1) AS windows",
        )
        .bind(channel)
        .fetch_one(&self.db)
        .await
        .expect("attempts can be read")
    }

    /// Deliveries of `channel` in `status`.
    pub async fn deliveries_in(&self, channel: &str, status: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE channel = $1 AND status = $2")
            .bind(channel)
            .bind(status)
            .fetch_one(&self.db)
            .await
            .expect("deliveries can be read")
    }
}

/// Row counts of a scenario's database.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub notifications: i64,
    pub deliveries: BTreeMap<String, i64>,
    /// Dead letters written to the outbox.
    pub dead_letters: i64,
    /// Dead letters that went through Kafka into the DLQ store.
    pub dlq_messages: i64,
}

impl Tally {
    /// Deliveries in `status`.
    pub fn count(&self, status: &str) -> i64 {
        self.deliveries.get(status).copied().unwrap_or(0)
    }

    /// Every delivery.
    pub fn total(&self) -> i64 {
        self.deliveries.values().sum()
    }
}

/// Every event's fate, as [`Scenario::audit`] found it.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    pub events: usize,
    pub notifications: usize,
    pub deliveries: usize,
    pub succeeded: usize,
    /// Succeeded after more than one attempt.
    pub retried: usize,
    /// FAILED with the dead letter in the DLQ store.
    pub dead_lettered: usize,
    pub skipped: usize,
    /// Events without a notification.
    pub lost_events: usize,
    pub duplicate_notifications: usize,
    /// Neither SUCCESS, SKIPPED nor FAILED with a dead letter.
    pub unfinished: usize,
    /// SUCCESS, but the receiver never saw it.
    pub unreceived: usize,
    /// Receipts beyond the first per delivery.
    pub duplicate_sends: usize,
    /// Receipts beyond the attempts Herald counted for the delivery (a reclaim counts the
    /// attempt a dead worker may have made): a send no attempt explains, such as two
    /// instances sending the same delivery at once.
    pub unaccounted: usize,
}

impl Audit {
    /// Events or deliveries whose fate is unaccounted for.
    pub fn lost(&self) -> usize {
        self.lost_events + self.unfinished + self.unreceived
    }

    /// The promises every scenario keeps: nothing lost, nothing stored twice, every send
    /// an attempt Herald counted, `notifications` and `deliveries` rows as the load implies.
    pub fn assert_kept(&self, scenario: &str, notifications: usize, deliveries: usize) {
        assert_eq!(self.lost(), 0, "fault {scenario}: lost work: {self:?}");
        assert_eq!(
            self.unaccounted, 0,
            "fault {scenario}: a receiver got more sends than Herald made attempts: {self:?}"
        );
        assert_eq!(
            self.duplicate_notifications, 0,
            "fault {scenario}: an event was stored twice: {self:?}"
        );
        assert_eq!(
            (self.notifications, self.deliveries),
            (notifications, deliveries),
            "fault {scenario}: rows stored: {self:?}"
        );
    }
}

/// A running `herald serve` child process.
pub struct Herald {
    pub name: String,
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub address: String,
    pub log: PathBuf,
    /// Where this process' part of the log starts (earlier runs and restarts come before).
    log_from: usize,
    /// Sends the admin token with every request.
    pub http: reqwest::Client,
}

/// The admin token of every instance the scenarios start.
pub const ADMIN_TOKEN: &str = "faults-admin-token";

impl Herald {
    /// GET `path`: the status, or `None` when the instance does not answer.
    pub async fn status_of(&self, path: &str) -> Option<u16> {
        let response = self
            .http
            .get(format!("{}{path}", self.address))
            .send()
            .await;
        response.ok().map(|r| r.status().as_u16())
    }

    /// Waits until `path` answers `status`.
    pub async fn wait_status(&mut self, path: &str, status: u16, seconds: u64) {
        let reached = wait_until(seconds, || async {
            self.status_of(path).await == Some(status)
        })
        .await;
        self.assert_running();
        assert!(
            reached,
            "herald {} did not answer {status} on {path} within {seconds} s; see {}",
            self.name,
            self.log.display()
        );
    }

    /// Panics (pointing at the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("the child can be polled") {
            panic!(
                "herald {} exited ({status}); see {}",
                self.name,
                self.log.display()
            );
        }
    }

    /// This process' log records so far whose message is `message`.
    pub fn log_records(&self, message: &str) -> Vec<Value> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.get(self.log_from..)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|record| record["message"] == message)
            .collect()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        self.child.kill().expect("herald can be killed");
        self.child.wait().expect("a killed child is reaped");
    }

    /// SIGTERM, then waits for the exit, at most `seconds`.
    pub async fn terminate(&mut self, seconds: u64) -> Option<ExitStatus> {
        let signalled = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(signalled.success(), "SIGTERM reaches herald {}", self.name);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(seconds) {
            if let Some(status) = self.child.try_wait().expect("the child can be polled") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The dead letters the admin API lists (one page of up to 500, newest first).
    pub async fn dead_letters(&self) -> Vec<Value> {
        let page: Value = self
            .http
            .get(format!("{}/api/v1/admin/dlq?limit=500", self.address))
            .send()
            .await
            .expect("herald answers")
            .json()
            .await
            .expect("a page of dead letters");
        page["items"].as_array().cloned().unwrap_or_default()
    }

    /// The sum of a Prometheus counter's series whose labels contain `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .expect("herald serves /metrics")
            .text()
            .await
            .expect("a metrics body");
        text.lines()
            .filter(|line| line.starts_with(name) && line.contains(labels))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 100 ms until it holds, for at most `seconds`; says whether it did.
pub async fn wait_until<F, Fut>(seconds: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// One request a receiver double took.
#[derive(Debug, Clone)]
pub struct Hit {
    /// `sms` or `slack`.
    pub channel: String,
    /// The Herald instance it came from (each is given its own URL).
    pub instance: String,
    /// Idempotency-Key (gateway) or X-Herald-Delivery-Id (Slack).
    pub delivery_id: String,
    /// The gateway request's `text` (empty for Slack).
    pub text: String,
    pub at: Instant,
}

/// Doubles of the SMS gateway and the Slack webhook at `{uri}/{sms|slack}/{instance}`,
/// answering 200 and recording every request.
pub struct Receivers {
    server: MockServer,
    hits: Arc<Mutex<Vec<Hit>>>,
}

struct Recorder(Arc<Mutex<Vec<Hit>>>);

impl Respond for Recorder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut parts = request.url.path().trim_start_matches('/').split('/');
        let channel = parts.next().unwrap_or_default().to_owned();
        let instance = parts.next().unwrap_or_default().to_owned();
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let delivery_id = header("Idempotency-Key")
            .or_else(|| header("X-Herald-Delivery-Id"))
            .unwrap_or_default();
        self.0.lock().unwrap().push(Hit {
            channel,
            instance,
            delivery_id: delivery_id.clone(),
            text: serde_json::from_slice::<Value>(&request.body)
                .ok()
                .and_then(|body| body["text"].as_str().map(str::to_owned))
                .unwrap_or_default(),
            at: Instant::now(),
        });
        ResponseTemplate::new(200).set_body_json(json!({ "messageId": delivery_id }))
    }
}

impl Receivers {
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        let hits = Arc::new(Mutex::new(Vec::new()));
        Mock::given(method("POST"))
            .respond_with(Recorder(hits.clone()))
            .mount(&server)
            .await;
        Receivers { server, hits }
    }

    /// Settings that send SMS and Slack of `instance` to these doubles.
    pub fn settings(&self, instance: &str) -> Vec<(&'static str, String)> {
        vec![
            (
                "HERALD_SMS_GATEWAY_URL",
                format!("{}/sms/{instance}", self.server.uri()),
            ),
            (
                "HERALD_SLACK_WEBHOOK_URL",
                format!("{}/slack/{instance}", self.server.uri()),
            ),
        ]
    }

    /// Every request so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Requests so far.
    pub fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    /// Receipts per delivery id.
    pub fn receipts(&self) -> Receipts {
        Receipts::of(
            ["SMS", "SLACK"],
            self.hits().into_iter().map(|h| h.delivery_id),
        )
    }
}

/// How often each delivery reached its receiver, for the channels that were observed.
#[derive(Debug, Clone, Default)]
pub struct Receipts {
    channels: HashSet<&'static str>,
    counts: HashMap<String, usize>,
}

impl Receipts {
    /// Counts `ids` as receipts of deliveries on `channels`.
    pub fn of<const N: usize>(
        channels: [&'static str; N],
        ids: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut counts = HashMap::new();
        for id in ids {
            *counts.entry(id).or_default() += 1;
        }
        Receipts {
            channels: channels.into_iter().collect(),
            counts,
        }
    }

    /// Deliveries received at least once (of any scenario).
    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    /// Adds the receipts of another observer.
    pub fn and(mut self, other: Receipts) -> Self {
        self.channels.extend(other.channels);
        for (id, n) in other.counts {
            *self.counts.entry(id).or_default() += n;
        }
        self
    }
}

/// Empties MailDev, so that a scenario reads only its own mails.
pub async fn maildev_clear(stack: &Stack) {
    let cleared = reqwest::Client::new()
        .delete(format!("{}/email/all", stack.var("MAILDEV_URL")))
        .send()
        .await
        .expect("MailDev answers");
    assert!(cleared.status().is_success(), "MailDev clears its mails");
}

/// The emails MailDev holds: each Message-ID's delivery id (`<deliveryId@herald>`).
pub async fn maildev_receipts(stack: &Stack) -> Receipts {
    let mails: Vec<Value> = reqwest::get(format!("{}/email", stack.var("MAILDEV_URL")))
        .await
        .expect("MailDev answers")
        .json()
        .await
        .expect("MailDev lists its mails");
    let ids = mails.iter().filter_map(|mail| {
        let id = mail["messageId"].as_str()?;
        Some(
            id.trim_matches(['<', '>'])
                .strip_suffix("@herald")?
                .to_owned(),
        )
    });
    Receipts::of(["EMAIL"], ids)
}
