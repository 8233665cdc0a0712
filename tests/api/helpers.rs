//! `spawn_app()`: one Herald instance in-process on a random port, with a database and a
//! topic prefix of its own, so tests run in parallel without seeing each other's data.

use std::{sync::Once, time::Duration};

use rdkafka::producer::{FutureProducer, FutureRecord};

use herald::{
    config::{DEFAULT_CONFIG_FILE, Settings},
    kafka::{KafkaAdmin, TopicCatalogue},
    roles::Role,
    startup::Application,
};
use secrecy::SecretString;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A running Herald and the handles a test needs.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub address: String,
    pub db: PgPool,
    pub db_name: String,
    pub settings: Settings,
    pub redis: redis::aio::ConnectionManager,
    /// Sends the admin token with every request (a request's own `Authorization` wins).
    pub http: reqwest::Client,
    /// Sends no credential.
    pub anonymous: reqwest::Client,
    shutdown: CancellationToken,
}

/// The admin token every test instance accepts (unless a test sets another).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The user-token secret every test instance uses.
pub const USER_TOKEN_SECRET: &str = "test-user-token-secret-0123456789abcdef";

impl TestApp {
    /// GET `path` on this instance.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("Herald answers HTTP requests")
    }

    /// PUT a JSON body.
    pub async fn put_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.http
            .put(format!("{}{path}", self.address))
            .json(body)
            .send()
            .await
            .expect("Herald answers HTTP requests")
    }

    /// POST a JSON body with extra headers.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.http.post(format!("{}{path}", self.address)).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("Herald answers HTTP requests")
    }

    /// Publishes raw bytes to an upstream topic (unprefixed name) with a key.
    pub async fn publish(&self, topic: &str, key: &str, payload: &[u8]) {
        self.publish_all(topic, &[(key.to_owned(), payload.to_vec())])
            .await;
    }

    /// An idempotent producer, as an upstream service would have, and the prefixed name of
    /// the upstream `topic`.
    fn upstream_producer(&self, topic: &str) -> (FutureProducer, String) {
        let producer = herald::kafka::client_config(&self.settings.kafka)
            .set("message.timeout.ms", "10000")
            .set("enable.idempotence", "true")
            .create()
            .unwrap();
        (
            producer,
            format!("{}{topic}", self.settings.kafka.topic_prefix),
        )
    }

    /// Publishes several messages in order, on one producer.
    pub async fn publish_all(&self, topic: &str, messages: &[(String, Vec<u8>)]) {
        let (producer, topic) = self.upstream_producer(topic);
        for (key, payload) in messages {
            producer
                .send(
                    FutureRecord::to(&topic).key(key).payload(payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .expect("the test broker takes the message");
        }
    }

    /// Publishes many messages at once, on one producer (in order per partition): a
    /// backlog, where `publish_all` waits for each message in turn.
    pub async fn publish_backlog(&self, topic: &str, messages: &[(String, Vec<u8>)]) {
        let (producer, topic) = self.upstream_producer(topic);
        let sent = messages.iter().map(|(key, payload)| {
            producer.send(
                FutureRecord::to(&topic).key(key).payload(payload),
                Duration::from_secs(10),
            )
        });
        for result in futures_util::future::join_all(sent).await {
            result
                .map_err(|(e, _)| e)
                .expect("the test broker takes the message");
        }
    }

    /// Makes an API key with `scopes` through the API and returns it.
    pub async fn api_key(&self, name: &str, scopes: &[&str]) -> String {
        let response = self
            .post_json(
                "/api/v1/admin/keys",
                &serde_json::json!({ "name": name, "scopes": scopes }),
                &[],
            )
            .await;
        assert_eq!(response.status(), 201, "an API key is created");
        let body: serde_json::Value = response.json().await.unwrap();
        body["key"]
            .as_str()
            .expect("the key is shown once")
            .to_owned()
    }

    /// A user token for `user`, valid for an hour.
    pub fn user_token(&self, user: i64) -> String {
        herald::auth::user_token::mint(
            &SecretString::from(USER_TOKEN_SECRET.to_owned()),
            herald::domain::UserId::new(user).unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    /// Number of notifications stored.
    pub async fn notification_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM notifications")
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// The deliveries of the notification made from `event_id`: (channel, status, address,
    /// skip reason), by channel.
    pub async fn deliveries_of_event(&self, event_id: &str) -> Vec<DeliveryRow> {
        sqlx::query_as(
            "SELECT d.channel, d.status, d.address, d.skip_reason FROM deliveries d \
             JOIN notifications n ON n.id = d.notification_id \
             WHERE n.event_id = $1 ORDER BY d.channel",
        )
        .bind(event_id)
        .fetch_all(&self.db)
        .await
        .unwrap()
    }

    /// Writes one outbox row of `kind` for `topic` carrying `payloads`, as a transaction
    /// of Herald's would; returns the row's id.
    pub async fn outbox_row(&self, kind: &str, topic: &str, payloads: &[&[u8]]) -> i64 {
        let keys: Vec<Option<&[u8]>> = vec![None; payloads.len()];
        let headers = serde_json::Value::Array(vec![serde_json::json!({}); payloads.len()]);
        sqlx::query_scalar(
            "INSERT INTO outbox (kind, topic, message_keys, payloads, headers) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(kind)
        .bind(topic)
        .bind(&keys)
        .bind(payloads)
        .bind(&headers)
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    /// Dead letters written to the outbox: (topic, headers, payload).
    pub async fn dead_letters(&self) -> Vec<(String, serde_json::Value, Vec<u8>)> {
        sqlx::query_as(
            "SELECT topic, headers, payload FROM outbox_messages WHERE kind = 'dead_letter' ORDER BY id, position",
        )
        .fetch_all(&self.db)
        .await
        .unwrap()
    }
}

/// (channel, status, address, skip reason)
pub type DeliveryRow = (String, String, Option<String>, Option<String>);

/// Polls `check` every 100 ms until it returns true, for at most `seconds`.
pub async fn wait_until<F, Fut>(seconds: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {seconds} s waiting until {what}");
}

/// The event schemas in `schemas/`, as every test app loads them.
pub fn schemas() -> &'static herald::event_schemas::EventSchemas {
    static SCHEMAS: std::sync::OnceLock<herald::event_schemas::EventSchemas> =
        std::sync::OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        herald::event_schemas::EventSchemas::load(&root.join("schemas"), []).unwrap()
    })
}

/// A valid event envelope: `data` over the required fields of the event type's schema (at
/// their examples), so a test names only the fields it is about.
pub fn envelope(event_type: &str, user_id: i64, data: serde_json::Value) -> serde_json::Value {
    let data = match (schemas().get(event_type), data) {
        (Some(schema), serde_json::Value::Object(given)) => {
            let mut full = schema.minimal_payload();
            full.as_object_mut().unwrap().extend(given);
            full
        }
        (_, data) => data,
    };
    serde_json::json!({
        "eventId": Uuid::new_v4().to_string(),
        "eventType": event_type,
        "occurredAt": "2026-11-21T09:30:00Z",
        "userId": user_id,
        "recipient": { "email": format!("user{user_id}@example.com"), "locale": "ko" },
        "data": data,
    })
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Settings for the test stack, read from the environment `make test` sets.
pub fn stack_settings() -> Settings {
    init_test_logging();
    assert!(
        std::env::var("HERALD_DATABASE_URL").is_ok(),
        "the test stack is not configured: run the tests with `make test`, which starts it \
         and sets HERALD_* (or export the output of `scripts/stack.sh env test`)"
    );
    let env = |name: &str| std::env::var(name).ok();
    Settings::load_from(std::path::Path::new(DEFAULT_CONFIG_FILE), &env)
        .expect("the test environment holds valid settings")
}

/// Creates an empty database on the test server and returns its name and URL.
pub async fn create_database(settings: &Settings) -> (String, String) {
    let mut url = url::Url::parse(settings.database_url()).expect("a valid database URL");
    let name = format!("herald_test_{}", Uuid::new_v4().simple());
    let mut conn = tokio::time::timeout(STEP_TIMEOUT, PgConnection::connect(url.as_str()))
        .await
        .expect("the test PostgreSQL answers within STEP_TIMEOUT")
        .expect("the test PostgreSQL accepts connections");
    let create = conn.execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)));
    tokio::time::timeout(STEP_TIMEOUT, create)
        .await
        .expect("the test database is created within STEP_TIMEOUT")
        .expect("the test database can be created");
    url.set_path(&name);
    (name, url.to_string())
}

/// A connection to the test server's main database, for tests that act as an operator.
pub async fn admin_connection(settings: &Settings) -> tokio::sync::Mutex<PgConnection> {
    let mut url = url::Url::parse(settings.database_url()).expect("a valid database URL");
    url.set_path("herald");
    tokio::sync::Mutex::new(PgConnection::connect(url.as_str()).await.unwrap())
}

/// Runs one statement on an admin connection.
pub async fn execute(conn: &tokio::sync::Mutex<PgConnection>, sql: &str) {
    conn.lock()
        .await
        .execute(sqlx::AssertSqlSafe(sql.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Drops a database, disconnecting its clients: PostgreSQL going away, as a client sees it.
pub async fn drop_database(settings: &Settings, name: &str) {
    let admin_url = {
        let mut url = url::Url::parse(settings.database_url()).expect("a valid database URL");
        url.set_path("herald");
        url
    };
    let mut conn = PgConnection::connect(admin_url.as_str()).await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!(
        r#"DROP DATABASE "{name}" WITH (FORCE)"#
    )))
    .await
    .expect("the test database can be dropped");
}

/// A topic prefix no other test uses.
pub fn unique_topic_prefix() -> String {
    format!("t{}.", &Uuid::new_v4().simple().to_string()[..12])
}

/// Starts Herald with every role against a fresh database and fresh topics.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Like [`spawn_app`], with a chance to change the settings before the build (after the
/// database and topics have been made).
pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_as(&Role::ALL, customise).await
}

/// Only the front half (API and Kafka intake): deliveries stay as the intake left them,
/// for tests of what ingestion writes.
pub async fn spawn_front_half(customise: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_as(&[Role::Api, Role::Ingest], customise).await
}

/// Starts Herald with the given roles against a fresh database and fresh topics.
pub async fn spawn_app_as(roles: &[Role], customise: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = stack_settings();
    let (_, db_url) = create_database(&settings).await;
    settings.database.url = SecretString::from(db_url);
    settings.kafka.topic_prefix = unique_topic_prefix();
    settings.redis.key_prefix = format!("herald:{}", settings.kafka.topic_prefix);
    settings.http.addr = "127.0.0.1:0".parse().unwrap();
    settings.admin.token = Some(ADMIN_TOKEN.to_owned().into());
    settings.access.user_token_secret = Some(USER_TOKEN_SECRET.to_owned().into());
    // The in-process alerts post to the ops Slack, which many tests count messages on:
    // tests of the alerts (alerts.rs) turn them on.
    settings.alerts.enabled = false;

    let catalogue = TopicCatalogue::load(&settings.kafka.topics_file).unwrap();
    let admin = KafkaAdmin::new(&settings.kafka).unwrap();
    tokio::time::timeout(STEP_TIMEOUT, admin.create_topics(&catalogue))
        .await
        .expect("the test broker creates topics within STEP_TIMEOUT")
        .expect("the test broker creates topics");

    customise(&mut settings);
    spawn_app_on(settings, roles).await
}

/// The longest one setup step or one request may take: a hang becomes a failure that
/// names the step instead of a suite that never ends.
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// Starts Herald on settings whose database and topics already exist (a restart).
pub async fn spawn_app_on(settings: Settings, roles: &[Role]) -> TestApp {
    let db_name = url::Url::parse(settings.database_url())
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_owned();
    let app = tokio::time::timeout(STEP_TIMEOUT, Application::build(settings.clone(), roles))
        .await
        .expect("Herald builds within STEP_TIMEOUT")
        .expect("Herald builds against the test stack");
    let address = format!("http://{}", app.local_addr());
    let db = app.state().db.clone();
    let redis = app.state().redis.clone();
    let shutdown = app.shutdown_token();
    tokio::spawn(app.run_until_stopped());
    let http = match &settings.admin.token {
        Some(token) => {
            use secrecy::ExposeSecret;
            let bearer = format!("Bearer {}", token.expose_secret());
            reqwest::Client::builder()
                .timeout(STEP_TIMEOUT)
                .default_headers(reqwest::header::HeaderMap::from_iter([(
                    reqwest::header::AUTHORIZATION,
                    bearer.parse().unwrap(),
                )]))
                .build()
                .unwrap()
        }
        None => reqwest::Client::new(),
    };

    TestApp {
        address,
        db,
        db_name,
        settings,
        redis,
        http,
        anonymous: reqwest::Client::builder()
            .timeout(STEP_TIMEOUT)
            .build()
            .unwrap(),
        shutdown,
    }
}

fn init_test_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            herald::telemetry::init_tracing(herald::telemetry::LogFormat::Text);
        }
    });
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: std::collections::BTreeMap<String, String>,
}

/// The offsets consumer group `group` has committed on `topic` (both unprefixed names),
/// summed over the partitions that have one; `None` when no partition has one.
pub async fn committed_offsets(settings: &Settings, group: &str, topic: &str) -> Option<i64> {
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
    };
    let prefix = &settings.kafka.topic_prefix;
    let consumer: BaseConsumer = herald::kafka::client_config(&settings.kafka)
        .set("group.id", format!("{prefix}{group}"))
        .create()
        .unwrap();
    let topic = format!("{prefix}{topic}");
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        let mut partitions = TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            partitions.add_partition(&topic, partition.id());
        }
        let committed = consumer
            .committed_offsets(partitions, Duration::from_secs(10))
            .unwrap();
        let offsets: Vec<i64> = committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            })
            .collect();
        (!offsets.is_empty()).then(|| offsets.iter().sum())
    })
    .await
    .unwrap()
}

/// Reads a topic (unprefixed name) from the beginning, without a consumer group, until
/// `predicate` holds for what was read or `seconds` pass.
pub async fn read_topic(
    settings: &Settings,
    topic: &str,
    seconds: u64,
    predicate: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    use rdkafka::{
        Message, Offset, TopicPartitionList,
        consumer::{Consumer, StreamConsumer},
        message::Headers,
    };
    let topic = format!("{}{topic}", settings.kafka.topic_prefix);
    let consumer: StreamConsumer = herald::kafka::client_config(&settings.kafka)
        .set("group.id", format!("test-reader-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(&topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while !predicate(&records) && tokio::time::Instant::now() < deadline {
        if let Ok(Ok(message)) = tokio::time::timeout_at(deadline, consumer.recv()).await {
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(Record {
                key: message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: message.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    records
}

/// Waits until every delivery of the app is in a terminal state, or panics.
pub async fn wait_for_delivery(app: &TestApp, delivery_id: Uuid, status: &str, seconds: u64) {
    wait_until(
        seconds,
        &format!("delivery {delivery_id} is {status}"),
        || async {
            let now: Option<String> =
                sqlx::query_scalar("SELECT status FROM deliveries WHERE id = $1")
                    .bind(delivery_id)
                    .fetch_optional(&app.db)
                    .await
                    .unwrap();
            now.as_deref() == Some(status)
        },
    )
    .await;
}

/// A Slack webhook double at `{uri}/slack`: each `(status, times)` answers that many
/// requests (`None`: all the rest), in order.
pub async fn slack_mock(responses: &[(u16, Option<u64>)]) -> wiremock::MockServer {
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path},
    };
    let server = MockServer::start().await;
    for (i, (status, times)) in responses.iter().enumerate() {
        let mock = Mock::given(method("POST"))
            .and(path("/slack"))
            .respond_with(ResponseTemplate::new(*status))
            .with_priority(i as u8 + 1);
        match times {
            Some(n) => mock.up_to_n_times(*n).mount(&server).await,
            None => mock.mount(&server).await,
        }
    }
    server
}

/// The webhook URL of a [`slack_mock`].
pub fn slack_url(server: &wiremock::MockServer) -> String {
    format!("{}/slack", server.uri())
}

/// Settings that post Slack messages to a [`slack_mock`].
pub fn with_slack(server: &wiremock::MockServer) -> impl FnOnce(&mut Settings) + use<> {
    let url = slack_url(server);
    move |s| s.channels.slack_webhook_url = Some(url.into())
}

/// Every email in the test stack's MailDev.
pub async fn maildev_emails() -> Vec<serde_json::Value> {
    let maildev = std::env::var("MAILDEV_URL").expect("make test exports MAILDEV_URL");
    reqwest::get(format!("{maildev}/email"))
        .await
        .expect("MailDev answers")
        .json()
        .await
        .expect("MailDev lists emails as JSON")
}
