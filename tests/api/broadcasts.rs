//! Broadcasts: the user import, segments, fan-out through the ordinary tables, cancel,
//! idempotency and crash recovery. The 15,000-user acceptance run is tests/broadcast_scale.rs.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, read_topic, spawn_app, spawn_app_as, spawn_app_on, wait_until};
use herald::roles::Role;

/// NDJSON lines for users `from..=to`, every one with an email, a locale, a birth year and
/// a tag of its own parity.
pub fn users_ndjson(from: i64, to: i64, domain: &str) -> String {
    (from..=to)
        .map(|id| {
            json!({
                "userId": id,
                "email": format!("u{id}@{domain}"),
                "locale": if id % 2 == 0 { "ko" } else { "en" },
                "birthYear": 1960 + (id % 50),
                "tags": [if id % 2 == 0 { "even" } else { "odd" }, "imported"],
            })
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn import(app: &TestApp, body: String, content_type: &str) -> (u16, Value) {
    let response = app
        .http
        .post(format!("{}/api/v1/users:import", app.address))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn contact(app: &TestApp, user: i64) -> Value {
    app.get(&format!("/api/v1/users/{user}/contact"))
        .await
        .json()
        .await
        .unwrap()
}

async fn create(app: &TestApp, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let response = app.post_json("/api/v1/broadcasts", body, headers).await;
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn broadcast(app: &TestApp, id: &str) -> Value {
    app.get(&format!("/api/v1/broadcasts/{id}"))
        .await
        .json()
        .await
        .unwrap()
}

/// Waits until the broadcast has `status`, and returns its view.
async fn wait_for_status(app: &TestApp, id: &str, status: &str, seconds: u64) -> Value {
    wait_until(seconds, &format!("broadcast {id} is {status}"), || async {
        broadcast(app, id).await["status"] == status
    })
    .await;
    broadcast(app, id).await
}

#[tokio::test]
async fn an_import_stores_good_lines_and_reports_each_bad_one_by_number() {
    let app = spawn_app().await;
    let body = [
        json!({"userId": 1, "email": "a@example.com", "birthYear": 1990, "tags": ["VIP"]})
            .to_string(),
        "{not json".to_owned(),
        String::new(),
        json!({"userId": -3, "email": "c@example.com"}).to_string(),
        json!({"userId": 4, "email": "not an address"}).to_string(),
        json!({"userId": 5, "birthYear": 1800}).to_string(),
        json!({"userId": 6, "locale": "ko", "shoeSize": 44}).to_string(),
        json!({"userId": 7, "phone": "+821012345678", "tags": ["a b"]}).to_string(),
        json!({"userId": 8, "locale": "ko-KR", "timezone": "Asia/Seoul"}).to_string(),
    ]
    .join("\n");

    let (status, report) = import(&app, body, "application/x-ndjson").await;

    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["received"], 8,
        "blank lines are not counted: {report}"
    );
    assert_eq!(report["imported"], 2, "{report}");
    assert_eq!(report["rejected"], 6, "{report}");
    let lines: Vec<i64> = report["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_i64().unwrap())
        .collect();
    assert_eq!(lines, [2, 4, 5, 6, 7, 8], "{report}");
    let reasons = report["rejections"].to_string();
    for expected in [
        "not JSON",
        "userId",
        "email",
        "birthYear",
        "shoeSize",
        "tag",
    ] {
        assert!(
            reasons.contains(expected),
            "{expected} missing in {reasons}"
        );
    }
    let stored = contact(&app, 1).await;
    assert_eq!(stored["birthYear"], 1990);
    assert_eq!(stored["tags"], json!(["vip"]), "tags are case-folded");
    assert_eq!(app.get("/api/v1/users/4/contact").await.status(), 404);

    // The same as a JSON array; a second import replaces entries.
    let array = json!([{"userId": 1, "email": "new@example.com"}, {"userId": 0}]).to_string();
    let (status, report) = import(&app, array, "application/json").await;
    assert_eq!(status, 200);
    assert_eq!(
        (report["imported"].clone(), report["rejected"].clone()),
        (json!(1), json!(1))
    );
    let stored = contact(&app, 1).await;
    assert_eq!(stored["email"], "new@example.com");
    assert_eq!(
        stored["tags"],
        json!([]),
        "an import replaces the whole entry"
    );

    let (status, error) = import(&app, "{\"userId\": 1}".into(), "application/json").await;
    assert_eq!(status, 400, "a JSON body must be an array: {error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("array")
    );
}

#[tokio::test]
async fn a_segment_broadcast_reaches_exactly_the_matching_users_and_announces_its_end() {
    let app = spawn_app().await;
    let (_, report) = import(
        &app,
        users_ndjson(1, 60, "seg.example.com"),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(report["imported"], 60);
    let year = chrono::Datelike::year(&chrono::Utc::now()) as i64;
    // Even users (locale ko, tag "even") aged 30 to 49 this year.
    let segment = json!({"ageMin": 30, "ageMax": 49, "locale": "ko", "tags": ["even"]});
    let expected: Vec<i64> = (1..=60)
        .filter(|id| id % 2 == 0 && (30..=49).contains(&(year - (1960 + id % 50))))
        .collect();
    assert!(!expected.is_empty() && expected.len() < 30, "{expected:?}");

    let (status, created) = create(
        &app,
        &json!({
            "name": "autumn notice",
            "audience": {"segment": segment},
            "channels": ["IN_APP"],
            "subject": "Service notice",
            "body": "Maintenance on Sunday.",
        }),
        &[],
    )
    .await;
    assert_eq!(status, 202, "{created}");
    let id = created["broadcastId"].as_str().unwrap().to_owned();
    let done = wait_for_status(&app, &id, "COMPLETED", 30).await;

    let totals = &done["totals"];
    assert_eq!(totals["audience"], expected.len(), "{done}");
    assert_eq!(totals["created"], expected.len(), "{done}");
    assert_eq!(totals["sent"], expected.len(), "{done}");
    assert_eq!(
        (totals["failed"].clone(), totals["pending"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(done["progress"], 100.0);
    assert!(done["timings"]["finishedAt"].is_string(), "{done}");
    let reached: Vec<i64> = sqlx::query_scalar(
        "SELECT user_id FROM notifications WHERE broadcast_id = $1::uuid ORDER BY user_id",
    )
    .bind(&id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(reached, expected);

    let events = read_topic(&app.settings, "notification.broadcast.events", 20, |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(events.len(), 1);
    let event: Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(event["eventType"], "BROADCAST_COMPLETED");
    assert_eq!(event["broadcastId"], id.as_str());
    assert_eq!(event["totals"]["sent"], expected.len());
    assert_eq!(events[0].key.as_deref(), Some(id.as_str()));
}

#[tokio::test]
async fn broadcast_requests_are_checked_and_idempotent() {
    let app = spawn_app().await;
    let good = json!({
        "audience": {"userIds": [1, 2, 3]},
        "channels": ["IN_APP"],
        "eventType": "SUBSCRIPTION_EXPIRING",
        "data": {"plan": "Pro", "expiresAt": "2026-12-01"},
        "scheduledAt": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
    });
    for (change, expected) in [
        (json!({"audience": {"userIds": []}}), "nobody"),
        (
            json!({"audience": {"segment": {"ageMin": 40, "ageMax": 20}}}),
            "ageMin",
        ),
        (
            json!({"audience": {"segment": {"shoeSize": 3}}}),
            "shoeSize",
        ),
        (json!({"audience": {"userIds": [0]}}), "userId"),
        (json!({"channels": []}), "at least one"),
        (json!({"channels": ["PIGEON"]}), "PIGEON"),
        (json!({"channels": ["SLACK"]}), "operator"),
        (json!({"eventType": "NOT_A_TYPE"}), "NOT_A_TYPE"),
        (json!({"subject": "s", "body": "b"}), "not both"),
        (json!({"scheduledAt": "2001-01-01T00:00:00Z"}), "past"),
        (json!({"data": {"blob": "x".repeat(70_000)}}), "64 KiB"),
    ] {
        let mut body = good.clone();
        body.as_object_mut()
            .unwrap()
            .extend(change.as_object().unwrap().clone());
        let (status, error) = create(&app, &body, &[]).await;
        assert_eq!(status, 400, "{change}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{change}: {message}");
    }

    let key = [("Idempotency-Key", "campaign-42")];
    let (status, first) = create(&app, &good, &key).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(
        first["status"], "SCHEDULED",
        "it waits for scheduledAt: {first}"
    );
    let (status, again) = create(&app, &good, &key).await;
    assert_eq!(status, 202);
    assert_eq!(again["broadcastId"], first["broadcastId"]);
    let mut other = good.clone();
    other["audience"] = json!({"userIds": [4]});
    let (status, error) = create(&app, &other, &key).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM broadcasts")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count, 1);

    // A scheduled broadcast can be cancelled before it starts, once; it never sends.
    let id = first["broadcastId"].as_str().unwrap();
    let cancel = |id: String| {
        let app = &app;
        async move {
            app.post_json(&format!("/api/v1/broadcasts/{id}/cancel"), &json!({}), &[])
                .await
        }
    };
    let cancelled: Value = cancel(id.to_owned()).await.json().await.unwrap();
    assert_eq!(cancelled["status"], "CANCELLED");
    // Its end is announced at once, not at the scheduled time.
    let events = read_topic(&app.settings, "notification.broadcast.events", 20, |r| {
        !r.is_empty()
    })
    .await;
    let event: Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(event["eventType"], "BROADCAST_CANCELLED");
    assert_eq!(
        event["totals"]["audience"], 0,
        "nobody was reached: {event}"
    );
    assert_eq!(
        cancel(id.to_owned()).await.status(),
        200,
        "cancelling twice is harmless"
    );
    assert_eq!(cancel(Uuid::now_v7().to_string()).await.status(), 404);
    assert_eq!(app.get("/api/v1/broadcasts/not-a-uuid").await.status(), 400);
    let listed: Value = app
        .get("/api/v1/broadcasts?limit=5")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["broadcastId"], id);
}

/// A gateway double that answers after `delay`, so a broadcast takes a while.
async fn slow_sms_gateway(delay: Duration) -> wiremock::MockServer {
    use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messageId": "m"}))
                .set_delay(delay),
        )
        .mount(&server)
        .await;
    server
}

/// Starts an SMS broadcast to every user tagged `sms`; returns its id.
async fn sms_broadcast(app: &TestApp) -> String {
    let (status, created) = create(
        app,
        &json!({"audience": {"segment": {"tags": ["sms"]}}, "channels": ["SMS"],
                "subject": "Notice", "body": "Terms update."}),
        &[],
    )
    .await;
    assert_eq!(status, 202, "{created}");
    created["broadcastId"].as_str().unwrap().to_owned()
}

fn phones_ndjson(count: i64) -> String {
    (1..=count)
        .map(|id| {
            json!({"userId": id, "phone": format!("+8210{id:08}"), "tags": ["sms"]}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_cancel_stops_every_delivery_not_yet_sent() {
    let gateway = slow_sms_gateway(Duration::from_millis(50)).await;
    let url = format!("{}/sms", gateway.uri());
    let app = spawn_app_with_sms(&url, |s| {
        s.dispatch.concurrency = 4;
        s.broadcast.batch_size = 50;
        s.broadcast.max_queued_deliveries = 100;
    })
    .await;
    import(&app, phones_ndjson(1_000), "application/x-ndjson").await;
    let id = sms_broadcast(&app).await;
    wait_until(30, "some SMS went out", || async {
        broadcast(&app, &id).await["totals"]["sent"]
            .as_i64()
            .unwrap()
            >= 20
    })
    .await;

    let cancelled: Value = app
        .post_json(&format!("/api/v1/broadcasts/{id}/cancel"), &json!({}), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "CANCELLED");
    let events = read_topic(&app.settings, "notification.broadcast.events", 30, |r| {
        !r.is_empty()
    })
    .await;
    let done = broadcast(&app, &id).await;
    let totals = &done["totals"];
    let sent = totals["sent"].as_i64().unwrap();
    let requests = gateway.received_requests().await.unwrap().len() as i64;

    assert_eq!(totals["pending"], 0, "{done}");
    assert!(sent < 500, "the cancel stopped the rest: {done}");
    assert_eq!(
        requests, sent,
        "every request is a sent delivery, none after the end"
    );
    assert_eq!(
        totals["skipped"].as_i64().unwrap() + sent + totals["failed"].as_i64().unwrap(),
        totals["created"].as_i64().unwrap(),
        "{done}"
    );
    assert!(
        totals["created"].as_i64().unwrap() < 1_000,
        "fan-out stopped too: {done}"
    );
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT skip_reason FROM deliveries WHERE status = 'SKIPPED'")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(reasons, ["broadcast cancelled"]);
    let event: Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(event["eventType"], "BROADCAST_CANCELLED");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gateway.received_requests().await.unwrap().len() as i64,
        requests,
        "nothing is sent after a cancelled broadcast ended"
    );
}

async fn spawn_app_with_sms(
    url: &str,
    customise: impl FnOnce(&mut herald::config::Settings),
) -> TestApp {
    let url = url.to_owned();
    crate::helpers::spawn_app_with(move |s| {
        s.channels.sms_gateway_url = Some(url.parse().unwrap());
        s.dispatch.rate_limits.clear();
        customise(s);
    })
    .await
}

/// A child process killed when dropped, so a failing test leaves no Herald behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `herald serve --roles dispatch` as a child process on the app's database and topics.
fn herald_dispatcher(app: &TestApp, sms_url: &str) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--roles", "dispatch"])
        .env("HERALD_DATABASE_URL", app.settings.database_url())
        .env("HERALD_TOPIC_PREFIX", &app.settings.kafka.topic_prefix)
        .env("HERALD_REDIS_KEY_PREFIX", &app.settings.redis.key_prefix)
        .env("HERALD_HTTP_ADDR", "127.0.0.1:0")
        .env("HERALD_SMS_GATEWAY_URL", sms_url)
        .env("HERALD_RATE_LIMIT_SMS", "")
        .env("HERALD_DISPATCH_CONCURRENCY", "4")
        .env("HERALD_DISPATCH_LEASE_SECS", "2")
        .env("HERALD_BROADCAST_BATCH_SIZE", "50")
        .env("HERALD_BROADCAST_MAX_QUEUED_DELIVERIES", "100")
        .env("HERALD_BROADCAST_LEASE_SECS", "2")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the herald binary starts");
    KillOnDrop(child)
}

#[tokio::test]
async fn a_dispatcher_killed_mid_broadcast_is_resumed_without_losing_or_duplicating_anyone() {
    let gateway = slow_sms_gateway(Duration::from_millis(20)).await;
    let url = format!("{}/sms", gateway.uri());
    // The API alone: the broadcast is fanned out and sent by the child process first.
    let app = spawn_app_as(&[Role::Api], |_| {}).await;
    import(&app, phones_ndjson(1_500), "application/x-ndjson").await;
    let mut child = herald_dispatcher(&app, &url);
    let id = sms_broadcast(&app).await;
    wait_until(60, "the broadcast is part way", || async {
        let view = broadcast(&app, &id).await;
        view["totals"]["sent"].as_i64().unwrap() >= 200
    })
    .await;
    child.0.kill().expect("SIGKILL the dispatcher");
    child.0.wait().unwrap();
    let at_crash = broadcast(&app, &id).await;
    assert_eq!(at_crash["status"], "RUNNING", "{at_crash}");
    assert!(
        at_crash["totals"]["created"].as_i64().unwrap() < 1_500,
        "{at_crash}"
    );

    // A new instance takes over after the leases run out.
    let mut settings = app.settings.clone();
    settings.channels.sms_gateway_url = Some(url.parse().unwrap());
    settings.dispatch.rate_limits.clear();
    settings.dispatch.lease = Duration::from_secs(2);
    let _resumed = spawn_app_on(settings, &[Role::Dispatch, Role::Relay]).await;
    let done = wait_for_status(&app, &id, "COMPLETED", 120).await;

    let totals = &done["totals"];
    assert_eq!(
        (totals["audience"].clone(), totals["created"].clone()),
        (json!(1500), json!(1500)),
        "{done}"
    );
    assert_eq!(totals["sent"], 1500, "{done}");
    let (notifications, users): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT user_id) FROM notifications WHERE broadcast_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (notifications, users),
        (1500, 1500),
        "one notification per recipient"
    );
    // Sends the killed worker had in flight may go out twice (the gateway dedupes by the
    // Idempotency-Key, which is the delivery id); at most its concurrency.
    let requests = gateway.received_requests().await.unwrap();
    let mut keys: Vec<String> = requests
        .iter()
        .filter_map(|r| {
            r.headers
                .get("idempotency-key")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .collect();
    let total = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 1500, "every recipient got the message");
    assert!(
        total - keys.len() <= 4,
        "{} duplicate sends",
        total - keys.len()
    );
    // Read on for a while after the first: a second completion event would show up.
    let events = read_topic(&app.settings, "notification.broadcast.events", 5, |r| {
        r.len() > 1
    })
    .await;
    assert_eq!(events.len(), 1, "one completion event");
}

#[tokio::test]
async fn herald_broadcast_creates_follows_and_reports_a_broadcast() {
    let app = spawn_app().await;
    import(
        &app,
        users_ndjson(1, 30, "cli.example.com"),
        "application/x-ndjson",
    )
    .await;
    let key = app
        .api_key("campaigns", &["broadcasts:write", "broadcasts:read"])
        .await;
    // Blocking, so on a thread of its own: the app under test runs on this test's runtime.
    let herald = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .arg("broadcast")
            .args(args)
            .args(["--api", &app.address, "--api-key", &key]);
        tokio::task::spawn_blocking(move || command.output())
    };

    let output = herald(&[
        "create",
        "--tag",
        "odd",
        "--channels",
        "IN_APP",
        "--subject",
        "Hello",
        "--body",
        "Hi there",
    ])
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("100.0%  COMPLETED"), "{stdout}");
    assert!(stdout.contains("COMPLETED in"), "{stdout}");
    assert!(
        stdout.contains("15 recipients, 15 deliveries sent, 0 failed"),
        "{stdout}"
    );
    let id = stdout.split_whitespace().nth(1).unwrap().to_owned();
    assert_eq!(broadcast(&app, &id).await["totals"]["sent"], 15);

    let output = herald(&["cancel", &id]).await.unwrap().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("409") && stderr.contains("already finished"),
        "{stderr}"
    );
    let output = herald(&[
        "create",
        "--user-ids",
        "1",
        "--channels",
        "IN_APP",
        "--event-type",
        "NOPE",
    ])
    .await
    .unwrap()
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("NOPE"));
}

#[tokio::test]
async fn on_a_rate_limited_channel_a_broadcast_leaves_the_window_reserve_to_transactional_sends() {
    let gateway = slow_sms_gateway(Duration::ZERO).await;
    let url = format!("{}/sms", gateway.uri());
    let app = spawn_app_with_sms(&url, |s| {
        s.dispatch.rate_limits.insert(
            herald::domain::Channel::Sms,
            herald::config::RateLimit {
                limit: 10,
                window: Duration::from_secs(60),
            },
        );
    })
    .await;
    import(&app, phones_ndjson(50), "application/x-ndjson").await;
    let id = sms_broadcast(&app).await;
    wait_until(30, "the broadcast used its half of the window", || async {
        broadcast(&app, &id).await["totals"]["sent"] == 5
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        broadcast(&app, &id).await["totals"]["sent"],
        5,
        "no more than half"
    );

    let accepted: Value = app
        .post_json(
            "/api/v1/notifications",
            &json!({"recipient": {"phone": "+821099998888"}, "channels": ["SMS"],
                    "subject": "Code", "body": "Your code is 123456"}),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
    let delivery: Uuid = accepted["deliveries"][0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    crate::helpers::wait_for_delivery(&app, delivery, "SUCCESS", 10).await;
    assert_eq!(broadcast(&app, &id).await["totals"]["sent"], 5);
}

#[tokio::test]
async fn an_in_app_broadcast_is_sent_inside_the_transactions_that_lock_it_and_leaves_room_for_a_transactional_message()
 {
    // 4 IN_APP slots: the broadcast may hold 2, a transactional message finds the others.
    let (app, id) = in_app_broadcast_on_four_slots(2000).await;
    let count = |filter: &'static str| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM deliveries WHERE broadcast_id = $1 AND {filter}"
            )))
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    wait_until(30, "the broadcast is being sent", || async {
        count("status = 'SUCCESS'").await > 0
    })
    .await;

    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({"userId": 1, "channels": ["IN_APP"], "subject": "s", "body": "urgent"}),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let notification = accepted["notificationId"].as_str().unwrap().to_owned();
    wait_until(10, "the transactional message is sent", || async {
        let view: Value = app
            .get(&format!("/api/v1/notifications/{notification}"))
            .await
            .json()
            .await
            .unwrap();
        view["deliveries"][0]["status"] == "SUCCESS"
    })
    .await;
    let unsent = count("status <> 'SUCCESS'").await;
    assert!(
        unsent > 0,
        "the broadcast was still going when the message went out"
    );

    let done = wait_for_status(&app, &id.to_string(), "COMPLETED", 120).await;
    assert_eq!(done["totals"]["sent"], 2000, "{done}");
    // Inserted, then recorded in the transaction that locked it: no claim, no lease.
    assert_eq!(count("version = 2 AND lease_until IS NULL").await, 2000);
}

#[tokio::test]
async fn a_broadcast_delivery_due_before_the_ones_being_sent_is_still_sent() {
    // 2 broadcast slots: the broadcast takes a few seconds, and each lock starts where
    // the previous one did (`deliveries::lock_due`'s floor).
    let (app, id) = in_app_broadcast_on_four_slots(1000).await;
    let behind: Uuid = loop {
        // Once sending has begun, one unsent delivery becomes due an hour before the rest.
        let moved: Option<Uuid> = sqlx::query_scalar(
            "UPDATE deliveries SET next_attempt_at = now() - interval '1 hour' \
             WHERE id = (SELECT id FROM deliveries WHERE broadcast_id = $1 \
                 AND status = 'PENDING' ORDER BY next_attempt_at DESC LIMIT 1 \
                 FOR UPDATE SKIP LOCKED) \
               AND EXISTS (SELECT 1 FROM deliveries WHERE broadcast_id = $1 \
                 AND status = 'SUCCESS') \
             RETURNING id",
        )
        .bind(id)
        .fetch_optional(&app.db)
        .await
        .unwrap();
        if let Some(moved) = moved {
            break moved;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let done = wait_for_status(&app, &id.to_string(), "COMPLETED", 120).await;
    assert_eq!(done["totals"]["sent"], 1000, "{done}");
    let status: String = sqlx::query_scalar("SELECT status FROM deliveries WHERE id = $1")
        .bind(behind)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(status, "SUCCESS");
}

/// An app with 4 IN_APP slots (2 for broadcasts) and a running IN_APP broadcast to
/// `users` imported users.
async fn in_app_broadcast_on_four_slots(users: i64) -> (TestApp, Uuid) {
    let app = crate::helpers::spawn_app_with(|s| {
        s.dispatch
            .channel_concurrency
            .insert(herald::domain::Channel::InApp, 4);
    })
    .await;
    let (_, report) = import(
        &app,
        users_ndjson(1, users, "inapp.example.com"),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(report["imported"], users);
    let (status, created) = create(
        &app,
        &json!({"audience": {"segment": {"tags": ["imported"]}}, "channels": ["IN_APP"],
                "subject": "Notice", "body": "A broadcast to everyone."}),
        &[],
    )
    .await;
    assert_eq!(status, 202, "{created}");
    let id = created["broadcastId"].as_str().unwrap().parse().unwrap();
    (app, id)
}
