//! The projector, history, inbox, dashboard and read-model rebuild.

use std::time::Duration;

use herald::{read_model::Projector, roles::Role};
use serde_json::{Value, json};
use wiremock::MockServer;

use crate::helpers::{
    TestApp, committed_offsets, envelope, read_topic, slack_mock, spawn_app_as, spawn_app_on,
    spawn_app_with, wait_until, with_slack,
};

/// Counts per (channel, status) from the write side: what really happened.
async fn truth(app: &TestApp) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT channel, status, count(*) FROM deliveries GROUP BY channel, status ORDER BY 1, 2",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
}

async fn stats(app: &TestApp) -> Vec<(String, i64, i64, i64)> {
    sqlx::query_as(
        "SELECT channel, sum(success)::int8, sum(failed)::int8, sum(skipped)::int8 \
         FROM delivery_stats GROUP BY channel ORDER BY channel",
    )
    .fetch_all(&app.db)
    .await
    .unwrap()
}

/// Publishes a mix with successes, failures (SLACK answers 400) and a skip, and waits until
/// every delivery is terminal and projected.
async fn mixed_traffic() -> (TestApp, MockServer) {
    let slack = slack_mock(&[(400, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;
    for user in [20, 20, 21] {
        let event = envelope(
            "PAYMENT_FAILED",
            user,
            json!({ "orderId": "o", "amount": 1000, "currency": "KRW", "reason": "declined" }),
        );
        app.publish(
            "fluxpay.payment.events",
            &user.to_string(),
            event.to_string().as_bytes(),
        )
        .await;
    }
    let shipped = envelope("ORDER_SHIPPED", 20, json!({ "orderId": "o-9" }));
    app.publish("fluxpay.order.events", "20", shipped.to_string().as_bytes())
        .await;
    let mut no_email = envelope(
        "ORDER_COMPLETED",
        22,
        json!({ "orderId": "o-1", "amount": 1, "currency": "KRW" }),
    );
    no_email.as_object_mut().unwrap().remove("recipient");
    app.publish(
        "fluxpay.order.events",
        "22",
        no_email.to_string().as_bytes(),
    )
    .await;

    wait_until(60, "every delivery is terminal and projected", || async {
        let open: (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM deliveries), \
                    (SELECT count(*) FROM deliveries WHERE status IN ('PENDING', 'PROCESSING')), \
                    (SELECT count(*) FROM notification_log WHERE counted_status IS NOT NULL)",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        open.0 == 12 && open.1 == 0 && open.2 == 12
    })
    .await;
    (app, slack)
}

#[tokio::test]
async fn after_mixed_outcomes_history_shows_final_statuses_and_the_dashboard_counts_them() {
    let (app, _slack) = mixed_traffic().await;

    let history: Value = app
        .get("/api/v1/notifications?userId=20")
        .await
        .json()
        .await
        .unwrap();
    let items = history["items"].as_array().unwrap();
    assert_eq!(items.len(), 8, "{history}");
    let final_statuses: Vec<(String, String)> = sqlx::query_as(
        "SELECT d.id::text, d.status FROM deliveries d JOIN notifications n ON n.id = d.notification_id \
         WHERE n.user_id = 20",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    for item in items {
        let id = item["deliveryId"].as_str().unwrap();
        let status = &final_statuses.iter().find(|(d, _)| d == id).unwrap().1;
        assert_eq!(item["status"], status.as_str(), "{item}");
    }
    let times: Vec<&str> = items
        .iter()
        .map(|i| i["createdAt"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );

    let daily: Value = app
        .get("/api/v1/dashboard/delivery")
        .await
        .json()
        .await
        .unwrap();
    let row = |channel: &str| {
        daily["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["channel"] == channel)
            .cloned()
            .unwrap_or_else(|| panic!("no {channel} row in {daily}"))
    };
    assert_eq!(row("EMAIL")["success"], 4);
    assert_eq!(row("EMAIL")["skipped"], 1);
    assert_eq!(row("IN_APP")["success"], 4);
    assert_eq!(row("SLACK")["failed"], 3);
    assert_eq!(row("SLACK")["sent"], 3);
    assert_eq!(row("SLACK")["successRate"], 0.0);
    let expected = truth(&app).await;
    for (channel, status, count) in &expected {
        let key = match status.as_str() {
            "SUCCESS" => "success",
            "FAILED" => "failed",
            _ => "skipped",
        };
        assert_eq!(row(channel)[key], *count, "{channel} {status}");
    }

    let channels: Value = app
        .get("/api/v1/dashboard/delivery/channels")
        .await
        .json()
        .await
        .unwrap();
    let email = channels["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["channel"] == "EMAIL")
        .unwrap();
    assert_eq!(email["successRate"], 1.0);
    let failures: Value = app
        .get("/api/v1/dashboard/delivery/failures?limit=10")
        .await
        .json()
        .await
        .unwrap();
    let failures = failures.as_array().unwrap();
    assert_eq!(failures.len(), 3);
    assert!(
        failures
            .iter()
            .all(|f| f["channel"] == "SLACK" && f["reason"].as_str().unwrap().contains("400"))
    );
}

#[tokio::test]
async fn replaying_the_delivery_events_or_rebuilding_leaves_the_counts_unchanged() {
    let (app, _slack) = mixed_traffic().await;
    let before = stats(&app).await;
    let log_before: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_log")
        .fetch_one(&app.db)
        .await
        .unwrap();

    // Replay every event from the start of the topic through the projection again.
    let records = read_topic(&app.settings, "notification.delivery.events", 15, |r| {
        r.len() >= 36
    })
    .await;
    let messages: Vec<_> = records
        .iter()
        .enumerate()
        .map(|(i, r)| herald::kafka::consumer::IncomingMessage {
            topic: "replay".to_owned(),
            partition: 0,
            offset: i as i64,
            key: None,
            payload: r.payload.clone(),
            headers: Vec::new(),
            timestamp: None,
        })
        .collect();
    let projector = Projector {
        db: app.db.clone(),
        reporting_tz: app.settings.read_model.reporting_timezone,
    };
    let replayed = projector.apply(&messages).await.unwrap();
    assert_eq!(replayed.applied, 0, "every replayed event is stale");
    assert_eq!(stats(&app).await, before);

    let db_url = herald::config::Settings::database_url(&app.settings).to_owned();
    let prefix = app.settings.kafka.topic_prefix.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["read-model", "rebuild"])
            .env("HERALD_DATABASE_URL", db_url)
            .env("HERALD_TOPIC_PREFIX", prefix)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("read model rebuilt"));

    assert_eq!(stats(&app).await, before);
    let log_after: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_log")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(log_after, log_before);
}

#[tokio::test]
async fn history_pages_with_a_cursor_filters_and_refuses_bad_queries() {
    let app = spawn_app_with(|_| {}).await;
    for i in 0..5 {
        app.post_json(
            "/api/v1/notifications",
            &json!({ "userId": 30, "channels": ["IN_APP"], "subject": "s", "body": format!("b{i}") }),
            &[],
        )
        .await;
    }
    wait_until(30, "five entries are projected", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notification_log WHERE user_id = 30 AND status = 'SUCCESS'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        n == 5
    })
    .await;

    let mut seen = Vec::new();
    let mut path = "/api/v1/notifications?userId=30&limit=2".to_owned();
    loop {
        let page: Value = app.get(&path).await.json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["deliveryId"].as_str().unwrap().to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(cursor) => {
                path = format!("/api/v1/notifications?userId=30&limit=2&cursor={cursor}")
            }
            None => break,
        }
    }
    seen.dedup();
    assert_eq!(seen.len(), 5);
    let email: Value = app
        .get("/api/v1/notifications?userId=30&channel=EMAIL")
        .await
        .json()
        .await
        .unwrap();
    assert!(email["items"].as_array().unwrap().is_empty());
    for bad in [
        "/api/v1/notifications?userId=30&status=DONE",
        "/api/v1/notifications?userId=30&channel=FAX",
        "/api/v1/notifications?userId=30&limit=0",
        "/api/v1/notifications?userId=30&cursor=nope",
        "/api/v1/notifications?userId=30&from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
        "/api/v1/dashboard/delivery?from=2026-13-01",
        "/api/v1/dashboard/delivery?from=2026-11-20&to=2026-11-01",
        "/api/v1/dashboard/delivery?from=2020-01-01&to=2026-01-01",
        "/api/v1/dashboard/delivery/failures?limit=100000",
        "/api/v1/dashboard/delivery?to=-262144-01-03",
    ] {
        let response = app.get(bad).await;
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_request", "{bad}");
    }
}

#[tokio::test]
async fn the_inbox_counts_unread_messages_and_marks_them_read() {
    let app = spawn_app_with(|_| {}).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let response = app
            .post_json(
                "/api/v1/notifications",
                &json!({ "userId": 31, "channels": ["IN_APP"], "subject": "s", "body": format!("b{i}") }),
                &[],
            )
            .await;
        let body: Value = response.json().await.unwrap();
        ids.push(body["deliveries"][0]["id"].as_str().unwrap().to_owned());
    }
    let unread = || async {
        let body: Value = app
            .get("/api/v1/users/31/inbox/unread-count")
            .await
            .json()
            .await
            .unwrap();
        body["unread"].as_i64().unwrap()
    };
    wait_until(30, "three unread messages", || async {
        unread().await == 3
    })
    .await;

    let one = app
        .post_json(
            &format!("/api/v1/users/31/inbox/{}/read", ids[0]),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(one.status(), 200);
    assert_eq!(unread().await, 2);
    let inbox: Value = app
        .get("/api/v1/users/31/inbox?unreadOnly=true")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(inbox["items"].as_array().unwrap().len(), 2);
    let all = app
        .post_json("/api/v1/users/31/inbox/read-all", &json!({}), &[])
        .await;
    let all: Value = all.json().await.unwrap();
    assert_eq!(all["marked"], 2);
    assert_eq!(unread().await, 0);
    let stranger = app
        .post_json(
            &format!("/api/v1/users/32/inbox/{}/read", ids[1]),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(stranger.status(), 404);
}

#[tokio::test]
async fn an_sse_client_receives_an_in_app_message_published_for_its_user() {
    let app = spawn_app_with(|_| {}).await;
    let response = app
        .http
        .get(format!("{}/api/v1/users/33/inbox/stream", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut response = response;
    // The subscription is in place once the response has started.
    let accepted = app
        .post_json(
            "/api/v1/notifications",
            &json!({ "userId": 33, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED", "data": { "orderId": "o-33" } }),
            &[],
        )
        .await;
    let accepted: Value = accepted.json().await.unwrap();
    let delivery = accepted["deliveries"][0]["id"].as_str().unwrap().to_owned();

    let mut received = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !received.contains(&delivery) {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("an SSE event within 20 s")
            .unwrap()
            .expect("the stream stays open");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(received.contains("event: notification"), "{received}");
    assert!(received.contains("o-33"), "{received}");
}

/// From now on, records each row version written to notification_log (an insert, or an
/// update that changed the row) in `log_writes`, at once and exactly, unlike the
/// statistics views, which backends report a second or more late.
async fn record_log_writes(app: &TestApp) {
    for statement in [
        "CREATE TABLE log_writes (op TEXT NOT NULL, status TEXT NOT NULL, read BOOLEAN NOT NULL)",
        "CREATE FUNCTION record_log_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             INSERT INTO log_writes VALUES (TG_OP, NEW.status, NEW.read_at IS NOT NULL); \
             RETURN NULL; END $$",
        "CREATE TRIGGER record_log_write AFTER INSERT OR UPDATE ON notification_log \
             FOR EACH ROW EXECUTE FUNCTION record_log_write()",
    ] {
        sqlx::query(statement).execute(&app.db).await.unwrap();
    }
}

/// Posts one IN_APP notification for `user`; returns its delivery id.
async fn post_in_app(app: &TestApp, user: i64) -> String {
    post_notification(
        app,
        json!({ "userId": user, "channels": ["IN_APP"], "subject": "s", "body": "b" }),
    )
    .await
}

/// Posts one IN_APP notification for `user` scheduled an hour from now: its delivery stays
/// PENDING, so a projector batch holding its creation has a delivery still open and
/// lingers. Returns its delivery id.
async fn post_scheduled_in_app(app: &TestApp, user: i64) -> String {
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    post_notification(
        app,
        json!({ "userId": user, "channels": ["IN_APP"], "subject": "s", "body": "b",
                "scheduledAt": later }),
    )
    .await
}

async fn post_notification(app: &TestApp, body: Value) -> String {
    let response = app.post_json("/api/v1/notifications", &body, &[]).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    accepted["deliveries"][0]["id"].as_str().unwrap().to_owned()
}

async fn delivery_status(app: &TestApp, delivery: &str) -> String {
    sqlx::query_scalar("SELECT status FROM deliveries WHERE id = $1::uuid")
        .bind(delivery)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// The status of `delivery`'s log row, if the projector wrote one.
async fn log_status(app: &TestApp, delivery: &str) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM notification_log WHERE delivery_id = $1::uuid")
        .bind(delivery)
        .fetch_optional(&app.db)
        .await
        .unwrap()
}

async fn log_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notification_log")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_delivery_that_finishes_within_the_linger_is_written_to_the_log_once_with_its_read_mark()
{
    // Far longer than an IN_APP send takes here, so both events fall in the first batch,
    // which a scheduled delivery keeps open (the batch would end once every delivery in
    // it finished).
    let app = spawn_app_with(|s| s.read_model.projector_linger = Duration::from_secs(5)).await;
    record_log_writes(&app).await;
    post_scheduled_in_app(&app, 49).await;
    let delivery = post_in_app(&app, 50).await;
    wait_until(30, "the delivery succeeded", || async {
        delivery_status(&app, &delivery).await == "SUCCESS"
    })
    .await;
    read_topic(&app.settings, "notification.delivery.events", 15, |r| {
        r.len() >= 3
    })
    .await;
    // Time for a batch that ended early to be applied; well inside the linger.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log_rows(&app).await, 0, "the events still linger");
    // The user read it from the live stream before the read model had it.
    let read = app
        .post_json(
            &format!("/api/v1/users/50/inbox/{delivery}/read"),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(read.status(), 200);

    wait_until(30, "the delivery is projected", || async {
        log_rows(&app).await == 2
    })
    .await;
    let writes: Vec<(String, String, bool)> =
        sqlx::query_as("SELECT op, status, read FROM log_writes ORDER BY status")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        writes,
        [
            ("INSERT".to_owned(), "PENDING".to_owned(), false),
            ("INSERT".to_owned(), "SUCCESS".to_owned(), true)
        ]
    );
    let unread: Value = app
        .get("/api/v1/users/50/inbox/unread-count")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(unread["unread"], 0);
}

/// Offsets the projector's group has committed on the delivery events topic, summed over
/// its partitions (a partition without a committed offset counts 0).
async fn projector_committed(app: &TestApp) -> i64 {
    committed_offsets(
        &app.settings,
        "notif-readmodel",
        "notification.delivery.events",
    )
    .await
    .unwrap_or(0)
}

#[tokio::test]
async fn events_lingering_when_the_projector_stops_are_neither_committed_nor_lost() {
    let app = spawn_app_with(|s| s.read_model.projector_linger = Duration::from_secs(120)).await;
    let group = format!("{}notif-readmodel", app.settings.kafka.topic_prefix);
    wait_until(30, "the projector holds its partitions", || async {
        let ready: Value = app.get("/health/ready").await.json().await.unwrap();
        ready["consumers"][&group]["assignedPartitions"]
            .as_array()
            .is_some_and(|p| p.len() == 6)
    })
    .await;
    // The scheduled delivery keeps the batch open: without it, the batch would end once the
    // other delivery finished.
    post_scheduled_in_app(&app, 52).await;
    let delivery = post_in_app(&app, 51).await;
    wait_until(30, "the delivery succeeded", || async {
        delivery_status(&app, &delivery).await == "SUCCESS"
    })
    .await;
    read_topic(&app.settings, "notification.delivery.events", 15, |r| {
        r.len() >= 3
    })
    .await;
    // Time for the projector to fetch both into the batch it is gathering.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(log_rows(&app).await, 0, "nothing applied while lingering");
    assert_eq!(projector_committed(&app).await, 0, "nothing committed");

    let mut settings = app.settings.clone();
    drop(app);
    settings.read_model.projector_linger = Duration::from_millis(50);
    let restarted = spawn_app_on(settings, &[Role::Projector]).await;
    wait_until(
        60,
        "the delivery is projected after the restart",
        || async { log_status(&restarted, &delivery).await.as_deref() == Some("SUCCESS") },
    )
    .await;
    wait_until(30, "the three offsets are committed", || async {
        projector_committed(&restarted).await == 3
    })
    .await;
}

#[tokio::test]
async fn a_batch_whose_deliveries_all_finished_is_applied_without_waiting_out_the_linger() {
    let app = spawn_app_with(|s| s.read_model.projector_linger = Duration::from_secs(120)).await;
    record_log_writes(&app).await;
    let delivery = post_in_app(&app, 53).await;
    wait_until(
        30,
        "the delivery is projected, long before the linger",
        || async { log_status(&app, &delivery).await.as_deref() == Some("SUCCESS") },
    )
    .await;
    wait_until(30, "both offsets are committed", || async {
        projector_committed(&app).await == 2
    })
    .await;
    // The batch stayed open until the outcome came: the row was written once.
    let writes: Vec<(String, String)> = sqlx::query_as("SELECT op, status FROM log_writes")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(writes, [("INSERT".to_owned(), "SUCCESS".to_owned())]);
}

#[tokio::test]
async fn a_batch_naming_more_deliveries_than_one_transaction_takes_is_applied_whole() {
    let app = spawn_app_as(&[Role::Api], |_| {}).await;
    let deliveries = 2500;
    let mut messages = Vec::new();
    for _ in 0..deliveries {
        let (delivery, notification) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        for (version, status) in [(1, "PENDING"), (2, "SUCCESS")] {
            let event = json!({
                "deliveryId": delivery, "notificationId": notification, "eventType": "ORDER_SHIPPED",
                "userId": 60, "channel": "IN_APP", "status": status, "attempts": version - 1,
                "version": version, "createdAt": "2026-11-21T09:30:00Z",
                "updatedAt": "2026-11-21T09:30:01Z",
            });
            messages.push(herald::kafka::consumer::IncomingMessage {
                topic: "synthetic".to_owned(),
                partition: 0,
                offset: messages.len() as i64,
                key: None,
                payload: event.to_string().into_bytes(),
                headers: Vec::new(),
                timestamp: None,
            });
        }
    }
    let projector = Projector {
        db: app.db.clone(),
        reporting_tz: app.settings.read_model.reporting_timezone,
    };

    let applied = projector.apply(&messages).await.unwrap();

    assert_eq!(applied.applied, 2 * deliveries);
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notification_log WHERE status = 'SUCCESS'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(succeeded, deliveries as i64);
    assert_eq!(stats(&app).await, [("IN_APP".to_owned(), 2500, 0, 0)]);
}
