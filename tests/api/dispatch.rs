//! The delivery engine against MailDev, Redis, the broker and wiremock gateways.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use herald::{config::RateLimit, domain::Channel, roles::Role};
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::{
    Mock, MockServer, Request, Respond, ResponseTemplate,
    matchers::{header, header_exists, method},
};

use crate::helpers::{
    TestApp, envelope, read_topic, slack_mock, spawn_app_on, spawn_app_with, spawn_front_half,
    wait_for_delivery, wait_until, with_slack,
};

/// POSTs an intake request and returns the delivery ids by channel.
async fn notify(app: &TestApp, request: Value) -> Vec<(String, Uuid)> {
    let response = app.post_json("/api/v1/notifications", &request, &[]).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["channel"].as_str().unwrap().to_owned(),
                d["id"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

fn incident() -> Value {
    json!({ "eventType": "SYSTEM_INCIDENT", "data": { "title": "DB failover", "severity": "critical" } })
}

/// Every attempt of `delivery` (number, start, outcome), wherever it is stored: a
/// first-time success is on the delivery row, the rest in `delivery_attempts`.
async fn attempts_of(app: &TestApp, delivery: Uuid) -> Vec<(i32, DateTime<Utc>, String)> {
    sqlx::query_as(
        "SELECT attempt, started_at, outcome FROM delivery_attempt_log WHERE delivery_id = $1 ORDER BY attempt",
    )
    .bind(delivery)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_email_arrives_in_maildev_with_korean_parts_and_the_delivery_message_id() {
    let app = spawn_app_with(|_| {}).await;
    let address = format!("u{}@example.com", Uuid::new_v4().simple());
    let mut event = envelope(
        "PAYMENT_FAILED",
        3,
        json!({ "orderId": "o-3", "amount": 12000, "currency": "KRW", "reason": "card declined" }),
    );
    event["recipient"] = json!({ "email": address, "locale": "ko" });

    app.publish("fluxpay.payment.events", "3", event.to_string().as_bytes())
        .await;
    wait_until(30, "the email is sent", || async {
        app.deliveries_of_event(event["eventId"].as_str().unwrap())
            .await
            .iter()
            .any(|d| d.0 == "EMAIL" && d.1 == "SUCCESS")
    })
    .await;

    let delivery: Uuid = sqlx::query_scalar("SELECT id FROM deliveries WHERE channel = 'EMAIL'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let emails = crate::helpers::maildev_emails().await;
    let email = emails
        .iter()
        .find(|e| e["to"][0]["address"] == address.as_str())
        .expect("the email is in MailDev");
    assert!(
        email["subject"].as_str().unwrap().contains("결제"),
        "{}",
        email["subject"]
    );
    assert!(
        email["text"].as_str().unwrap().contains("12,000원"),
        "{}",
        email["text"]
    );
    let html = email["html"].as_str().unwrap();
    assert!(
        html.contains("<html") && html.contains("card declined"),
        "{html}"
    );
    assert!(
        email["messageId"]
            .as_str()
            .unwrap()
            .contains(&delivery.to_string()),
        "{}",
        email["messageId"]
    );
}

#[tokio::test]
async fn an_in_app_message_reaches_a_redis_subscriber() {
    let app = spawn_app_with(|_| {}).await;
    let client = redis::Client::open(std::env::var("HERALD_REDIS_URL").unwrap()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}inapp:user:77", app.settings.redis.key_prefix))
        .await
        .unwrap();

    let deliveries = notify(
        &app,
        json!({ "userId": 77, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED", "data": { "orderId": "o-77" } }),
    )
    .await;

    let mut messages = pubsub.on_message();
    let message = tokio::time::timeout(Duration::from_secs(15), messages.next())
        .await
        .expect("an in-app message within 15 s")
        .expect("the subscription stays open");
    let payload: Value = serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
    assert_eq!(payload["deliveryId"], deliveries[0].1.to_string());
    assert_eq!(payload["userId"], 77);
    assert!(payload["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(payload["body"].as_str().unwrap().contains("o-77"));
}

#[tokio::test]
async fn in_app_deliveries_are_sent_and_recorded_in_the_transaction_that_locks_them_without_a_claim()
 {
    let app = spawn_app_with(|_| {}).await;
    let mut pubsub = in_app_subscriber(&app).await;

    let mut ids = Vec::new();
    for user in 1..=30 {
        let deliveries = notify(
            &app,
            json!({ "userId": user, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED", "data": { "orderId": format!("o-{user}") } }),
        )
        .await;
        ids.push(deliveries[0].1);
    }
    for id in &ids {
        wait_for_delivery(&app, *id, "SUCCESS", 20).await;
    }

    // Created at version 1, recorded at version 2: no PROCESSING version and no lease in
    // between, and one Redis message each.
    let rows = versions_of(&app, &ids).await;
    assert_eq!(rows.len(), 30);
    assert!(rows.iter().all(|r| *r == (2, None, 1)), "{rows:?}");
    let mut messages = pubsub.on_message();
    let mut received = in_app_received(&mut messages, 2).await;
    received.sort();
    ids.sort();
    assert_eq!(received, ids);
    // Their delivery events say PENDING (1) then SUCCESS (2), and nothing else.
    assert_published_pending_then_success(&app, &ids).await;

    // An address suppressed on IN_APP is SKIPPED in the same way, and not published.
    sqlx::query(
        "INSERT INTO suppressions (id, channel, address, reason) VALUES ($1, 'IN_APP', 'user:31', 'test')",
    )
    .bind(Uuid::new_v4())
    .execute(&app.db)
    .await
    .unwrap();
    let suppressed = notify(
        &app,
        json!({ "userId": 31, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED", "data": { "orderId": "o-31" } }),
    )
    .await[0]
        .1;
    wait_for_delivery(&app, suppressed, "SKIPPED", 20).await;
    let (version, reason): (i64, String) =
        sqlx::query_as("SELECT version, skip_reason FROM deliveries WHERE id = $1")
            .bind(suppressed)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((version, reason.as_str()), (2, "suppressed"));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), messages.next())
            .await
            .is_err(),
        "a suppressed address got a message"
    );
}

#[tokio::test]
async fn an_in_app_send_whose_record_is_refused_goes_under_a_lease_instead_of_out_again() {
    let app = spawn_app_with(|_| {}).await;
    // PostgreSQL refuses to record an outcome for user 666's in-app delivery.
    sqlx::query(
        "ALTER TABLE deliveries ADD CONSTRAINT refuse_666 \
         CHECK (status IN ('PENDING', 'PROCESSING') OR address <> 'user:666')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let mut pubsub = in_app_subscriber(&app).await;

    let mut others = Vec::new();
    let mut refused = None;
    for user in [665, 666, 667] {
        let id = notify(
            &app,
            json!({ "userId": user, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED", "data": { "orderId": "o-1" } }),
        )
        .await[0]
            .1;
        if user == 666 {
            refused = Some(id);
        } else {
            others.push(id);
        }
    }
    let refused = refused.unwrap();
    for id in &others {
        wait_for_delivery(&app, *id, "SUCCESS", 20).await;
    }
    wait_for_delivery(&app, refused, "PROCESSING", 20).await;

    // It was sent once and waits for its lease, as if its worker had died; it is not sent
    // again and again meanwhile.
    let mut messages = pubsub.on_message();
    let received = in_app_received(&mut messages, 3).await;
    assert_eq!(
        received.iter().filter(|d| **d == refused).count(),
        1,
        "{received:?}"
    );
    assert_eq!(received.len(), 3, "{received:?}");
    let lease: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT lease_until FROM deliveries WHERE id = $1")
            .bind(refused)
            .fetch_one(&app.db)
            .await
            .unwrap();
    let lease = lease.expect("a lease");
    assert!(
        lease > Utc::now() + chrono::Duration::seconds(30),
        "{lease}"
    );
}

#[tokio::test]
async fn two_instances_sending_in_app_messages_inside_their_transactions_send_each_once() {
    let first = spawn_app_with(|_| {}).await;
    let second = spawn_app_on(first.settings.clone(), &[Role::Dispatch]).await;
    let mut pubsub = in_app_subscriber(&first).await;

    let requests = (1..=200).map(|user| {
        notify(
            &first,
            json!({ "userId": user, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED", "data": { "orderId": format!("o-{user}") } }),
        )
    });
    let mut ids: Vec<Uuid> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|d| d[0].1)
        .collect();
    wait_until(30, "every in-app message is sent", || async {
        let sent: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries WHERE status = 'SUCCESS' AND version = 2",
        )
        .fetch_one(&second.db)
        .await
        .unwrap();
        sent == 200
    })
    .await;

    let mut messages = pubsub.on_message();
    let mut received = in_app_received(&mut messages, 2).await;
    received.sort();
    ids.sort();
    assert_eq!(received, ids, "each message exactly once");
}

/// A Slack double answering 200 after a delay the test changes as it goes.
struct Delayed(Arc<Mutex<Duration>>);

impl Respond for Delayed {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        ResponseTemplate::new(200).set_delay(*self.0.lock().unwrap())
    }
}

/// Posts `n` incidents (one SLACK delivery each), one after another; their delivery ids.
async fn incidents(app: &TestApp, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(notify(app, incident()).await[0].1);
    }
    for id in &ids {
        wait_for_delivery(app, *id, "SUCCESS", 30).await;
    }
    ids
}

/// Each delivery's (version, lease, attempts), in the order of `ids`.
async fn versions_of(app: &TestApp, ids: &[Uuid]) -> Vec<(i64, Option<DateTime<Utc>>, i32)> {
    sqlx::query_as(
        "SELECT d.version, d.lease_until, d.attempts FROM UNNEST($1::uuid[]) WITH ORDINALITY AS i(id, n) \
         JOIN deliveries d ON d.id = i.id ORDER BY i.n",
    )
    .bind(ids)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn slack_goes_out_inside_the_transaction_that_locks_it_while_its_sends_are_quick_and_under_claims_once_they_slow_down()
 {
    const CLAIMED: i64 = 3; // PENDING, PROCESSING under a lease, SUCCESS
    const LOCKED: i64 = 2; // PENDING, SUCCESS
    let delay = Arc::new(Mutex::new(Duration::ZERO));
    let slack = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(Delayed(delay.clone()))
        .mount(&slack)
        .await;
    let app = spawn_app_with(with_slack(&slack)).await;

    // The channel starts under claims, and the sends measured there make it quick.
    let mut quick = incidents(&app, 40).await;
    let claimed = versions_of(&app, &quick)
        .await
        .iter()
        .filter(|v| v.0 == CLAIMED)
        .count();
    assert!(
        claimed >= herald::dispatch::send_speed::MIN_SAMPLES as usize,
        "{claimed} claimed before the channel was measured"
    );
    let locked = incidents(&app, 10).await;
    assert!(
        versions_of(&app, &locked)
            .await
            .iter()
            .all(|v| *v == (LOCKED, None, 1)),
        "{:?}",
        versions_of(&app, &locked).await
    );
    quick.extend(&locked);
    assert_published_pending_then_success(&app, &locked).await;

    // Slow answers (still well inside the transaction's two seconds) lift the average past
    // four times the quick time, and the channel goes back to claims.
    *delay.lock().unwrap() = Duration::from_millis(400);
    let slow = incidents(&app, 20).await;
    let claimed_again = incidents(&app, 5).await;
    assert!(
        versions_of(&app, &claimed_again)
            .await
            .iter()
            .all(|v| v.0 == CLAIMED && v.1.is_none() && v.2 == 1),
        "{:?}",
        versions_of(&app, &claimed_again).await
    );

    // Every delivery was sent once, whichever way, and every mark made before a send
    // inside a transaction went with that transaction's record.
    let requests = slack.received_requests().await.unwrap();
    assert_eq!(
        requests.len(),
        quick.len() + slow.len() + claimed_again.len()
    );
    assert_eq!(send_marks(&app).await, 0);
}

/// Writes the mark a transaction leaves when it dies after sending `ids`, a minute old.
async fn abandoned_mark(app: &TestApp, ids: &[Uuid]) {
    sqlx::query(
        "INSERT INTO send_marks (deliveries, marked_at) VALUES ($1, now() - interval '1 minute')",
    )
    .bind(ids)
    .execute(&app.db)
    .await
    .unwrap();
}

/// How many send marks are left.
async fn send_marks(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM send_marks")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// The attempts counted on each delivery, in the order of `ids`.
async fn attempts_counted(app: &TestApp, ids: &[Uuid]) -> Vec<i32> {
    versions_of(app, ids).await.iter().map(|v| v.2).collect()
}

#[tokio::test]
async fn a_send_mark_whose_transaction_died_counts_an_attempt_once_no_transaction_holds_its_deliveries()
 {
    let slack = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&slack)
        .await;
    let app = spawn_app_with(with_slack(&slack)).await;
    let ids = incidents(&app, 2).await;
    assert_eq!(attempts_counted(&app, &ids).await, [1, 1]);

    // Another transaction holds one of the deliveries (a live sender would hold them
    // all), then the mark a transaction leaves when it dies after its sends appears, a
    // minute old.
    let mut holder = app.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE")
        .bind(ids[0])
        .execute(&mut *holder)
        .await
        .unwrap();
    abandoned_mark(&app, &ids).await;
    let counted = herald::deliveries::count_abandoned_marks(&app.db, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(counted, 0, "a mark is not counted while a delivery is held");
    assert_eq!(attempts_counted(&app, &ids).await, [1, 1]);
    assert_eq!(send_marks(&app).await, 1);

    // Once nothing holds them, the dispatcher's sweep counts the attempt on each, once.
    holder.rollback().await.unwrap();
    wait_until(10, "the mark is counted", || async {
        send_marks(&app).await == 0
    })
    .await;
    assert_eq!(attempts_counted(&app, &ids).await, [2, 2]);

    // A fresh mark may be a live transaction's: left alone until it is older than the grace.
    sqlx::query("INSERT INTO send_marks (deliveries) VALUES ($1)")
        .bind(&ids[1..])
        .execute(&app.db)
        .await
        .unwrap();
    let counted = herald::deliveries::count_abandoned_marks(&app.db, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(counted, 0);
    assert_eq!(attempts_counted(&app, &ids).await, [2, 2]);

    // Nor while a claim holds a delivery (PROCESSING under a lease): its record will write
    // the attempts it read at the claim, and would undo the count.
    sqlx::query(
        "UPDATE deliveries SET status = 'PROCESSING', lease_until = now() + interval '1 hour' \
         WHERE id = $1",
    )
    .bind(ids[0])
    .execute(&app.db)
    .await
    .unwrap();
    abandoned_mark(&app, &ids[..1]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counted = herald::deliveries::count_abandoned_marks(&app.db, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        counted, 0,
        "a mark is not counted while a delivery is claimed"
    );
    assert_eq!(attempts_counted(&app, &ids[..1]).await, [2]);
}

/// A subscriber to every user's in-app messages of `app`.
async fn in_app_subscriber(app: &TestApp) -> redis::aio::PubSub {
    let client = redis::Client::open(std::env::var("HERALD_REDIS_URL").unwrap()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .psubscribe(format!("{}inapp:user:*", app.settings.redis.key_prefix))
        .await
        .unwrap();
    pubsub
}

/// The delivery ids of the in-app messages received until none came for `quiet` seconds.
async fn in_app_received(
    messages: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin),
    quiet: u64,
) -> Vec<Uuid> {
    let mut received = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(quiet), messages.next()).await
    {
        let payload: Value =
            serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
        received.push(payload["deliveryId"].as_str().unwrap().parse().unwrap());
    }
    received
}

/// Asserts that each of `ids` published exactly two delivery events: PENDING at version 1,
/// then SUCCESS at version 2 (sent without a claim, whose PROCESSING would be a version).
async fn assert_published_pending_then_success(app: &TestApp, ids: &[Uuid]) {
    let events = delivery_events_of(app, ids).await;
    for id in ids {
        let of: Vec<(i64, &str)> = events
            .iter()
            .filter(|e| e["deliveryId"] == id.to_string())
            .map(|e| {
                (
                    e["version"].as_i64().unwrap(),
                    e["status"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(of, [(1, "PENDING"), (2, "SUCCESS")], "{id}");
    }
}

/// The delivery events published for `deliveries` (each SUCCESS one awaited), in the
/// order they were published.
async fn delivery_events_of(app: &TestApp, deliveries: &[Uuid]) -> Vec<Value> {
    let wanted: Vec<String> = deliveries.iter().map(Uuid::to_string).collect();
    let events_of = |records: &[crate::helpers::Record]| -> Vec<Value> {
        records
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
            .filter(|e| wanted.iter().any(|id| e["deliveryId"] == *id))
            .collect()
    };
    let records = read_topic(&app.settings, "notification.delivery.events", 20, |r| {
        events_of(r)
            .iter()
            .filter(|e| e["status"] == "SUCCESS")
            .count()
            >= deliveries.len()
    })
    .await;
    events_of(&records)
}

/// The `delivery_attempts` rows of `delivery` alone.
async fn attempt_rows_of(app: &TestApp, delivery: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM delivery_attempts WHERE delivery_id = $1")
        .bind(delivery)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_first_time_success_writes_no_attempt_row_but_keeps_its_timing_on_the_delivery() {
    let slack = slack_mock(&[(200, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;

    let delivery = notify(&app, incident()).await[0].1;
    wait_for_delivery(&app, delivery, "SUCCESS", 20).await;

    assert_eq!(attempt_rows_of(&app, delivery).await, 0);
    let (started, latency, completed): (DateTime<Utc>, i32, DateTime<Utc>) = sqlx::query_as(
        "SELECT first_attempt_started_at, first_attempt_latency_ms, completed_at \
         FROM deliveries WHERE id = $1",
    )
    .bind(delivery)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(started <= completed, "{started} {completed}");
    assert!(latency >= 0, "{latency}");
    // Readers of attempts see it as attempt 1 through the view.
    let attempts = attempts_of(&app, delivery).await;
    assert_eq!(attempts, [(1, started, "SUCCESS".to_owned())]);
}

#[tokio::test]
async fn a_webhook_answering_500_500_200_succeeds_on_the_third_attempt_after_1_s_and_2_s() {
    let slack = slack_mock(&[(500, Some(2)), (200, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;

    let deliveries = notify(&app, incident()).await;
    let delivery = deliveries[0].1;
    wait_for_delivery(&app, delivery, "SUCCESS", 30).await;

    let attempts = attempts_of(&app, delivery).await;
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.2.as_str()).collect();
    assert_eq!(outcomes, ["RETRYABLE", "RETRYABLE", "SUCCESS"]);
    // A success after failures is an attempt row of its own, like the failures.
    assert_eq!(attempt_rows_of(&app, delivery).await, 3);
    let gap = |a: usize, b: usize| (attempts[b].1 - attempts[a].1).num_milliseconds();
    assert!(gap(0, 1) >= 1000, "first gap {} ms", gap(0, 1));
    assert!(gap(1, 2) >= 2000, "second gap {} ms", gap(1, 2));
    assert_eq!(slack.received_requests().await.unwrap().len(), 3);

    // Every state change went out on notification.delivery.events, in version order.
    let id = delivery.to_string();
    let events = read_topic(
        &app.settings,
        "notification.delivery.events",
        20,
        |records| {
            records.iter().any(|r| {
                let e: Value = serde_json::from_slice(&r.payload).unwrap();
                e["deliveryId"] == id.as_str() && e["status"] == "SUCCESS"
            })
        },
    )
    .await;
    let mine: Vec<Value> = events
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.payload).unwrap())
        .filter(|e| e["deliveryId"] == id.as_str())
        .collect();
    let statuses: Vec<&str> = mine.iter().map(|e| e["status"].as_str().unwrap()).collect();
    // PROCESSING stays internal (issue 14): creation, two retries scheduled, the success.
    assert_eq!(statuses, ["PENDING", "PENDING", "PENDING", "SUCCESS"]);
    let versions: Vec<i64> = mine
        .iter()
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
}

#[tokio::test]
async fn a_webhook_failing_forever_ends_failed_after_4_attempts_with_one_dead_letter() {
    let slack = slack_mock(&[(500, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;
    let event = envelope(
        "PAYMENT_FAILED",
        8,
        json!({ "orderId": "o-8", "amount": 5000, "currency": "KRW", "reason": "expired card" }),
    );

    app.publish("fluxpay.payment.events", "8", event.to_string().as_bytes())
        .await;
    let event_id = event["eventId"].as_str().unwrap();
    wait_until(40, "SLACK has failed", || async {
        app.deliveries_of_event(event_id)
            .await
            .iter()
            .any(|d| d.0 == "SLACK" && d.1 == "FAILED")
    })
    .await;

    let (delivery, attempts, class): (Uuid, i32, String) =
        sqlx::query_as("SELECT id, attempts, error_class FROM deliveries WHERE channel = 'SLACK'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(attempts, 4);
    assert_eq!(class, "retries_exhausted");
    let letters = read_topic(&app.settings, "notification.dlq.payment", 20, |r| {
        !r.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(letters.len(), 1, "one dead letter, for SLACK only");
    let letter = &letters[0];
    assert_eq!(
        letter.payload,
        event.to_string().into_bytes(),
        "the original bytes"
    );
    assert_eq!(letter.key.as_deref(), Some("8"));
    let h = &letter.headers;
    assert_eq!(h["X-Retry-Count"], "3");
    assert_eq!(h["X-Error-Class"], "retries_exhausted");
    assert_eq!(h["X-Failed-Channel"], "SLACK");
    assert_eq!(h["X-Delivery-Id"], delivery.to_string());
    assert_eq!(h["X-Event-Id"], event_id);
    assert_eq!(
        h["X-Original-Topic"],
        format!("{}fluxpay.payment.events", app.settings.kafka.topic_prefix)
    );
    assert!(h["X-Error-Message"].contains("500"), "{h:?}");
    assert!(h["X-Failed-At"].parse::<DateTime<Utc>>().is_ok());
    for name in [
        "X-Original-Partition",
        "X-Original-Offset",
        "X-Consumer-Group",
        "X-Notification-Id",
    ] {
        assert!(!h[name].is_empty(), "{name} is empty: {h:?}");
    }
    let others: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM deliveries WHERE channel <> 'SLACK' ORDER BY channel",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(others, ["SUCCESS", "SUCCESS"], "EMAIL and IN_APP went out");
}

#[tokio::test]
async fn a_webhook_answering_400_fails_at_once_without_retry() {
    let slack = slack_mock(&[(400, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;

    let delivery = notify(&app, incident()).await[0].1;
    wait_for_delivery(&app, delivery, "FAILED", 20).await;

    assert_eq!(attempts_of(&app, delivery).await.len(), 1);
    assert_eq!(
        attempt_rows_of(&app, delivery).await,
        1,
        "a failure keeps its row"
    );
    let letters = app.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1["X-Error-Class"], "http_4xx");
    assert_eq!(letters[0].1["X-Retry-Count"], "0");
    assert_eq!(
        letters[0].0,
        format!("{}notification.dlq.api", app.settings.kafka.topic_prefix)
    );
}

#[tokio::test]
async fn while_one_webhook_hangs_other_channels_and_the_consumers_keep_flowing() {
    let slack = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(120)))
        .mount(&slack)
        .await;
    let url = format!("{}/slack", slack.uri());
    let app = spawn_app_with(move |s| {
        s.channels.slack_webhook_url = Some(url.into());
        s.dispatch.send_timeout = Duration::from_secs(60);
    })
    .await;

    let mut events = Vec::new();
    for user in 1..=3 {
        let event = envelope(
            "PAYMENT_FAILED",
            user,
            json!({ "orderId": "o", "amount": 1, "currency": "KRW", "reason": "r" }),
        );
        app.publish(
            "fluxpay.payment.events",
            &user.to_string(),
            event.to_string().as_bytes(),
        )
        .await;
        events.push(event);
    }
    let later = envelope(
        "ORDER_COMPLETED",
        4,
        json!({ "orderId": "o-4", "amount": 1, "currency": "KRW" }),
    );
    app.publish("fluxpay.order.events", "4", later.to_string().as_bytes())
        .await;

    wait_until(30, "every EMAIL and IN_APP is sent", || async {
        let sent: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries WHERE channel IN ('EMAIL', 'IN_APP') AND status = 'SUCCESS'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        sent == 7
    })
    .await;
    let slack_states: Vec<String> =
        sqlx::query_scalar("SELECT status FROM deliveries WHERE channel = 'SLACK'")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(slack_states, ["PROCESSING"; 3], "SLACK is still hanging");
}

#[tokio::test]
async fn a_delivery_claimed_by_a_worker_that_died_is_sent_after_its_lease_expires() {
    let front = spawn_front_half(|_| {}).await;
    let delivery = notify(
        &front,
        json!({ "userId": 5, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED", "data": { "orderId": "o-5" } }),
    )
    .await[0]
        .1;
    // What a worker leaves behind when it dies right after claiming.
    sqlx::query(
        "UPDATE deliveries SET status = 'PROCESSING', lease_until = now() + interval '2 seconds' WHERE id = $1",
    )
    .bind(delivery)
    .execute(&front.db)
    .await
    .unwrap();
    let claimed_at = Instant::now();

    let dispatcher = spawn_app_on(front.settings.clone(), &[Role::Dispatch]).await;
    wait_for_delivery(&dispatcher, delivery, "SUCCESS", 20).await;

    assert!(
        claimed_at.elapsed() >= Duration::from_millis(1900),
        "not before the lease ran out"
    );
    let attempts = attempts_of(&dispatcher, delivery).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    // The dead worker's claim counted as attempt 1, so this success is attempt 2 and keeps
    // a row for the audit.
    assert_eq!(attempts[0].0, 2);
    assert_eq!(attempt_rows_of(&dispatcher, delivery).await, 1);
}

/// Records when each request arrived.
struct Clock(Arc<Mutex<Vec<Instant>>>);

impl Respond for Clock {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.0.lock().unwrap().push(Instant::now());
        ResponseTemplate::new(200).set_body_json(json!({ "messageId": Uuid::new_v4() }))
    }
}

#[tokio::test]
async fn with_a_limit_of_n_per_window_no_window_sees_more_than_n_sends_across_two_instances() {
    let gateway = MockServer::start().await;
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .respond_with(Clock(arrivals.clone()))
        .mount(&gateway)
        .await;
    let url = format!("{}/sms", gateway.uri());
    let (limit, window) = (3usize, Duration::from_secs(2));
    let first = spawn_app_with(move |s| {
        s.channels.sms_gateway_url = Some(url.parse().unwrap());
        s.dispatch.rate_limits.insert(
            Channel::Sms,
            RateLimit {
                limit: limit as u32,
                window,
            },
        );
    })
    .await;
    let second = spawn_app_on(first.settings.clone(), &[Role::Dispatch]).await;

    for i in 0..9 {
        notify(
            &first,
            json!({ "recipient": { "phone": "+821012345678" }, "channels": ["SMS"], "subject": "s", "body": format!("b{i}") }),
        )
        .await;
    }
    wait_until(30, "every SMS is sent", || async {
        let sent: i64 =
            sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'SUCCESS'")
                .fetch_one(&second.db)
                .await
                .unwrap();
        sent == 9
    })
    .await;

    let mut times = arrivals.lock().unwrap().clone();
    times.sort();
    assert_eq!(times.len(), 9);
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..].iter().filter(|t| **t - *start < window).count();
        assert!(
            in_window <= limit,
            "{in_window} sends within {window:?} from send {i}"
        );
    }
    let refs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE provider_ref IS NOT NULL")
            .fetch_one(&first.db)
            .await
            .unwrap();
    assert_eq!(refs, 9, "the gateway's messageId is kept");
}

#[tokio::test]
async fn five_failures_open_the_breaker_and_the_next_kakaotalk_goes_out_as_sms() {
    let kakao = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&kakao)
        .await;
    let sms = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer sms-key"))
        .and(header_exists("idempotency-key"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "messageId": "sms-1" })))
        .mount(&sms)
        .await;
    let slack = slack_mock(&[(200, None)]).await;
    let (kakao_url, sms_url) = (
        format!("{}/kakao", kakao.uri()),
        format!("{}/sms", sms.uri()),
    );
    let slack_url = format!("{}/slack", slack.uri());
    let app = spawn_app_with(move |s| {
        s.channels.kakaotalk_gateway_url = Some(kakao_url.parse().unwrap());
        s.channels.sms_gateway_url = Some(sms_url.parse().unwrap());
        s.channels.slack_webhook_url = Some(slack_url.into());
        s.dispatch.max_retries = 0;
        s.dispatch
            .gateway_keys
            .insert(Channel::Sms, "sms-key".to_owned().into());
    })
    .await;
    let request = json!({ "recipient": { "phone": "+821099990000" }, "channels": ["KAKAOTALK"], "subject": "s", "body": "b" });

    for _ in 0..5 {
        let delivery = notify(&app, request.clone()).await[0].1;
        wait_for_delivery(&app, delivery, "FAILED", 20).await;
    }
    let next = notify(&app, request).await[0].1;
    wait_for_delivery(&app, next, "SUCCESS", 20).await;

    let (sent_via, provider_ref): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT sent_via, provider_ref FROM deliveries WHERE id = $1")
            .bind(next)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(sent_via.as_deref(), Some("SMS"));
    assert_eq!(provider_ref.as_deref(), Some("sms-1"));
    assert_eq!(kakao.received_requests().await.unwrap().len(), 5);
    let sent_sms = sms.received_requests().await.unwrap();
    assert_eq!(sent_sms.len(), 1);
    let body: Value = serde_json::from_slice(&sent_sms[0].body).unwrap();
    assert_eq!(body["idempotencyKey"], next.to_string());
    assert_eq!(body["to"], "+821099990000");
    wait_until(10, "the breaker is announced on Slack", || async {
        slack.received_requests().await.unwrap().iter().any(|r| {
            let text = String::from_utf8_lossy(&r.body);
            text.contains("KAKAOTALK") && text.contains("opened")
        })
    })
    .await;
}

#[tokio::test]
async fn taking_in_a_notification_wakes_the_dispatchers_through_notify() {
    let app = spawn_front_half(|_| {}).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.db)
        .await
        .unwrap();
    listener.listen("herald_deliveries").await.unwrap();

    notify(
        &app,
        json!({ "userId": 9, "channels": ["IN_APP"], "subject": "s", "body": "b" }),
    )
    .await;

    let woken = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(
        matches!(woken, Ok(Ok(_))),
        "no NOTIFY after the intake committed: {woken:?}"
    );
}

#[tokio::test]
async fn a_full_rate_limit_window_holds_deliveries_back_instead_of_claiming_and_deferring_them() {
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "messageId": "m" })))
        .mount(&gateway)
        .await;
    let url = format!("{}/sms", gateway.uri());
    let app = spawn_app_with(move |s| {
        s.channels.sms_gateway_url = Some(url.parse().unwrap());
        s.dispatch.rate_limits.insert(
            Channel::Sms,
            RateLimit {
                limit: 2,
                window: Duration::from_secs(1),
            },
        );
    })
    .await;
    for i in 0..6 {
        notify(
            &app,
            json!({ "recipient": { "phone": "+821012345678" }, "channels": ["SMS"], "subject": "s", "body": format!("b{i}") }),
        )
        .await;
    }
    wait_until(30, "every SMS is sent", || async {
        let sent: i64 =
            sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'SUCCESS'")
                .fetch_one(&app.db)
                .await
                .unwrap();
        sent == 6
    })
    .await;

    // PENDING and SUCCESS for each: no round trips back to PENDING, and no PROCESSING
    // events (it stays internal).
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_messages WHERE kind = 'delivery_event'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(events, 12);
    assert_eq!(gateway.received_requests().await.unwrap().len(), 6);
}

#[tokio::test]
async fn a_delivery_whose_workers_keep_dying_ends_in_the_dlq_instead_of_being_resent() {
    let front = spawn_front_half(|_| {}).await;
    let delivery = notify(
        &front,
        json!({ "userId": 6, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED", "data": { "orderId": "o-6" } }),
    )
    .await[0]
        .1;
    // Three attempts made, and the worker of the fourth died holding the lease.
    sqlx::query(
        "UPDATE deliveries SET status = 'PROCESSING', attempts = 3, \
         lease_until = now() - interval '1 second' WHERE id = $1",
    )
    .bind(delivery)
    .execute(&front.db)
    .await
    .unwrap();

    let dispatcher = spawn_app_on(front.settings.clone(), &[Role::Dispatch]).await;
    wait_for_delivery(&dispatcher, delivery, "FAILED", 20).await;

    let class: String = sqlx::query_scalar("SELECT error_class FROM deliveries WHERE id = $1")
        .bind(delivery)
        .fetch_one(&dispatcher.db)
        .await
        .unwrap();
    assert_eq!(class, "lease_expired");
    let letters = dispatcher.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].1["X-Retry-Count"], "3",
        "four attempts, three retries"
    );
}

#[tokio::test]
async fn an_open_breaker_does_not_fall_back_to_a_channel_the_user_opted_out_of() {
    let kakao = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&kakao)
        .await;
    let sms = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "messageId": "sms-1" })))
        .mount(&sms)
        .await;
    let (kakao_url, sms_url) = (
        format!("{}/kakao", kakao.uri()),
        format!("{}/sms", sms.uri()),
    );
    let app = spawn_app_with(move |s| {
        s.channels.kakaotalk_gateway_url = Some(kakao_url.parse().unwrap());
        s.channels.sms_gateway_url = Some(sms_url.parse().unwrap());
        s.dispatch.max_retries = 0;
        s.dispatch.breaker_threshold = 1;
        s.dispatch.breaker_cooldown = Duration::from_secs(120);
    })
    .await;
    // User 71 opted out of SMS; user 72 of SMS for ORDER_SHIPPED only; user 73 did not.
    for (user, settings) in [
        (71, json!({ "channels": { "SMS": false } })),
        (
            72,
            json!({ "eventTypes": { "ORDER_SHIPPED": { "SMS": false } } }),
        ),
    ] {
        let put = app
            .put_json(
                &format!("/api/v1/notifications/settings?userId={user}"),
                &settings,
            )
            .await;
        assert_eq!(put.status(), 200);
    }
    let shipped = |user: i64| {
        json!({ "userId": user, "recipient": { "phone": "+821099990000" }, "channels": ["KAKAOTALK"],
                "eventType": "ORDER_SHIPPED", "data": { "orderId": format!("o-{user}") } })
    };
    // One failure opens KakaoTalk's breaker.
    let opener = notify(&app, shipped(70)).await[0].1;
    wait_for_delivery(&app, opener, "FAILED", 20).await;

    let opted_out = notify(&app, shipped(71)).await[0].1;
    let opted_out_here = notify(&app, shipped(72)).await[0].1;
    let willing = notify(&app, shipped(73)).await[0].1;

    wait_for_delivery(&app, willing, "SUCCESS", 20).await;
    let sent_via: Option<String> =
        sqlx::query_scalar("SELECT sent_via FROM deliveries WHERE id = $1")
            .bind(willing)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(sent_via.as_deref(), Some("SMS"));
    // The others wait for KakaoTalk, as if there were no fallback.
    wait_until(20, "both opted-out deliveries are deferred", || async {
        let deferred: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries WHERE id = ANY($1) AND status = 'PENDING' \
             AND attempts = 0 AND next_attempt_at > now() + interval '30 seconds'",
        )
        .bind([opted_out, opted_out_here])
        .fetch_one(&app.db)
        .await
        .unwrap();
        deferred == 2
    })
    .await;
    assert_eq!(sms.received_requests().await.unwrap().len(), 1);
    assert_eq!(kakao.received_requests().await.unwrap().len(), 1);
}

/// A wait on a `Notify` that counts from when it was armed.
type Armed<'a> = std::pin::Pin<Box<tokio::sync::futures::Notified<'a>>>;

/// A wait on `notify` that counts from now: a `notify_waiters` after this call completes it.
fn armed(notify: &tokio::sync::Notify) -> Armed<'_> {
    let mut notified = Box::pin(notify.notified());
    notified.as_mut().enable();
    notified
}

/// Whether `notified` completes within `wait`.
async fn woken(notified: &mut Armed<'_>, wait: Duration) -> bool {
    tokio::time::timeout(wait, notified.as_mut()).await.is_ok()
}

#[tokio::test]
async fn a_burst_of_wakes_wakes_the_named_loops_and_sends_one_notify_naming_their_channels() {
    use herald::dispatch::wakeup::Wakeup;
    let app = spawn_front_half(|_| {}).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&app.db)
        .await
        .unwrap();
    listener.listen("herald_deliveries").await.unwrap();
    let wakeup = Wakeup::new(app.db.clone());
    let (email, slack) = (wakeup.local(Channel::Email), wakeup.local(Channel::Slack));
    let (mut email_woken, mut slack_woken) = (armed(&email), armed(&slack));
    for i in 0..100 {
        wakeup.wake([if i % 2 == 0 {
            Channel::Email
        } else {
            Channel::InApp
        }]);
    }
    assert!(
        woken(&mut email_woken, Duration::from_millis(100)).await,
        "the EMAIL loop is woken at once"
    );
    assert!(
        !woken(&mut slack_woken, Duration::from_millis(100)).await,
        "the SLACK loop had nothing new and slept on"
    );

    let mut payloads = Vec::new();
    while let Ok(received) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await
    {
        payloads.push(received.unwrap().payload().to_owned());
    }
    assert!(
        (1..=2).contains(&payloads.len()),
        "100 wakes in a burst sent {} NOTIFYs",
        payloads.len()
    );
    let named: std::collections::BTreeSet<&str> = payloads
        .iter()
        .flat_map(|p| p.split_once(' ').unwrap().1.split(','))
        .collect();
    assert_eq!(named, ["EMAIL", "IN_APP"].into());

    // Another instance wakes the loops the NOTIFY names and no other; the instance that
    // sent it wakes none (its loops were woken in process); a payload that names nothing
    // (an older instance's, an operator's NOTIFY) wakes every loop.
    let other = Wakeup::new(app.db.clone());
    let (in_app, other_slack) = (other.local(Channel::InApp), other.local(Channel::Slack));
    let (mut in_app_woken, mut other_slack_woken) = (armed(&in_app), armed(&other_slack));
    let mut own_email_woken = armed(&email);
    for payload in &payloads {
        other.received(payload);
        wakeup.received(payload);
    }
    assert!(woken(&mut in_app_woken, Duration::from_millis(100)).await);
    assert!(!woken(&mut own_email_woken, Duration::from_millis(100)).await);
    assert!(!woken(&mut other_slack_woken, Duration::from_millis(100)).await);
    other.received("");
    assert!(woken(&mut other_slack_woken, Duration::from_millis(100)).await);
}

#[tokio::test]
async fn a_delivery_that_becomes_due_behind_where_the_loops_look_is_still_sent_at_the_sweep() {
    // SLACK is claimed and IN_APP locked: both look for due deliveries from a floor
    // (`deliveries::Cursor`), past the deliveries they took already.
    let slack = slack_mock(&[(200, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;
    let in_app = |order: &str| {
        json!({ "userId": 7, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED",
                "data": { "orderId": order } })
    };
    let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let mut scheduled_incident = incident();
    scheduled_incident["scheduledAt"] = json!(later);
    let mut scheduled_in_app = in_app("o-late");
    scheduled_in_app["scheduledAt"] = json!(later);
    let behind = [
        notify(&app, scheduled_incident).await[0].1,
        notify(&app, scheduled_in_app).await[0].1,
    ];
    // Deliveries sent now move each loop's floor up to a second before their due times.
    for round in 0..3 {
        for delivery in [
            notify(&app, incident()).await[0].1,
            notify(&app, in_app(&format!("o-{round}"))).await[0].1,
        ] {
            wait_for_delivery(&app, delivery, "SUCCESS", 20).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    // The scheduled ones become due an hour ago, far behind both floors, as a delivery
    // whose transaction stamped its due time and committed late would be.
    sqlx::query(
        "UPDATE deliveries SET next_attempt_at = now() - interval '1 hour' WHERE id = ANY($1)",
    )
    .bind(behind)
    .execute(&app.db)
    .await
    .unwrap();
    let moved = Instant::now();
    for delivery in behind {
        wait_for_delivery(&app, delivery, "SUCCESS", 10).await;
    }
    // A sweep a second reads each index from its start.
    assert!(
        moved.elapsed() < Duration::from_secs(5),
        "{:?}",
        moved.elapsed()
    );
}
