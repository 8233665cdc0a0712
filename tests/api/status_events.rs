//! notification.status.events (issue 15): a notification's overall status each time it
//! changes, exactly once per change, a terminal one for every notification.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    TestApp, envelope, read_topic, slack_mock, spawn_app_with, wait_until, with_slack,
};

const TOPIC: &str = "notification.status.events";

/// The status events of `notification`, in topic order.
fn events_of(records: &[crate::helpers::Record], notification: &str) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r.key.as_deref() == Some(notification))
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect()
}

fn statuses(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect()
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "COMPLETED" | "PARTIALLY_FAILED" | "FAILED")
}

/// Publishes a PAYMENT_FAILED (EMAIL, IN_APP and the ops SLACK) for each user and returns
/// the notification id of each.
async fn payment_failures(app: &TestApp, users: std::ops::Range<i64>) -> Vec<String> {
    let mut event_ids = Vec::new();
    for user in users {
        let mut event = envelope(
            "PAYMENT_FAILED",
            user,
            json!({ "orderId": format!("o-{user}"), "amount": 5000, "currency": "KRW", "reason": "card declined" }),
        );
        event["recipient"] =
            json!({ "email": format!("u{}@example.com", Uuid::new_v4().simple()) });
        app.publish(
            "fluxpay.payment.events",
            &user.to_string(),
            event.to_string().as_bytes(),
        )
        .await;
        event_ids.push(event["eventId"].as_str().unwrap().to_owned());
    }
    let mut notifications = Vec::new();
    for event_id in &event_ids {
        wait_until(30, "the event is stored", || async {
            app.deliveries_of_event(event_id).await.len() == 3
        })
        .await;
        let id: Uuid = sqlx::query_scalar("SELECT id FROM notifications WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        notifications.push(id.to_string());
    }
    notifications
}

#[tokio::test]
async fn a_notification_on_email_in_app_and_slack_yields_exactly_one_terminal_status_event() {
    let slack = slack_mock(&[(200, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;

    // Twenty at once, so that the three channels' dispatchers finish siblings concurrently.
    let notifications = payment_failures(&app, 1..21).await;
    let records = read_topic(&app.settings, TOPIC, 60, |records| {
        notifications.iter().all(|n| {
            events_of(records, n)
                .iter()
                .any(|e| is_terminal(e["status"].as_str().unwrap()))
        })
    })
    .await;
    // Anything that would come late (a second terminal event) has had time to arrive.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let records = read_topic(&app.settings, TOPIC, 5, |r| r.len() > records.len()).await;

    for n in &notifications {
        let events = events_of(&records, n);
        let statuses = statuses(&events);
        assert_eq!(statuses.first(), Some(&"PENDING"), "{n}: {statuses:?}");
        assert_eq!(statuses.last(), Some(&"COMPLETED"), "{n}: {statuses:?}");
        assert_eq!(
            statuses.iter().filter(|s| is_terminal(s)).count(),
            1,
            "{n}: {statuses:?}"
        );
        // One event per change: never the same status twice in a row, each naming the one
        // before it, in version order.
        assert!(statuses.windows(2).all(|w| w[0] != w[1]), "{statuses:?}");
        assert!(events[0]["previousStatus"].is_null());
        for pair in events.windows(2) {
            assert_eq!(pair[1]["previousStatus"], pair[0]["status"], "{events:?}");
            assert!(
                pair[1]["version"].as_i64() > pair[0]["version"].as_i64(),
                "{events:?}"
            );
        }
        let last = events.last().unwrap();
        assert_eq!(last["eventType"], "PAYMENT_FAILED");
        assert_eq!(last["domain"], "payment");
        assert!(
            last["eventId"].is_string() && last["userId"].is_i64(),
            "{last}"
        );
        let mut channels: Vec<(&str, &str)> = last["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["channel"].as_str().unwrap(),
                    c["status"].as_str().unwrap(),
                )
            })
            .collect();
        channels.sort();
        assert_eq!(
            channels,
            [
                ("EMAIL", "SUCCESS"),
                ("IN_APP", "SUCCESS"),
                ("SLACK", "SUCCESS")
            ]
        );
    }
}

#[tokio::test]
async fn a_channel_failing_for_good_ends_partially_failed_and_a_retry_of_its_dead_letter_reopens_it()
 {
    // Slack refuses the first message for good (400), then accepts.
    let slack = slack_mock(&[(400, Some(1)), (200, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;

    let notification = payment_failures(&app, 7..8).await.remove(0);
    let has = |status: &'static str, times: usize| {
        let n = notification.clone();
        move |records: &[crate::helpers::Record]| {
            statuses(&events_of(records, &n))
                .iter()
                .filter(|s| **s == status)
                .count()
                >= times
        }
    };
    let records = read_topic(&app.settings, TOPIC, 60, has("PARTIALLY_FAILED", 1)).await;
    let events = events_of(&records, &notification);
    let last = events.last().unwrap();
    assert_eq!(last["status"], "PARTIALLY_FAILED", "{events:?}");
    let slack_state = last["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == "SLACK")
        .unwrap();
    assert_eq!(slack_state["status"], "FAILED");

    // The operator retries the dead letter: the notification is open again, then done.
    let letter = wait_for_dead_letter(&app).await;
    let response = app
        .post_json(
            &format!("/api/v1/admin/dlq/{letter}/retry"),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let records = read_topic(&app.settings, TOPIC, 60, has("COMPLETED", 1)).await;
    let statuses = statuses(&events_of(&records, &notification)).join(",");
    assert!(
        statuses.ends_with("PARTIALLY_FAILED,PROCESSING,COMPLETED"),
        "{statuses}"
    );
}

#[tokio::test]
async fn a_notification_with_every_delivery_skipped_is_announced_completed_once() {
    // No Slack webhook configured: an incident's only channel is SKIPPED at once.
    let app = spawn_app_with(|_| {}).await;
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({ "eventType": "SYSTEM_INCIDENT", "data": { "title": "DB failover", "severity": "critical" } }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["notificationId"]
        .as_str()
        .unwrap()
        .to_owned();

    let records = read_topic(&app.settings, TOPIC, 30, |r| !events_of(r, &id).is_empty()).await;
    let events = events_of(&records, &id);
    assert_eq!(statuses(&events), ["COMPLETED"]);
    assert_eq!(events[0]["channels"][0]["status"], "SKIPPED");
    assert_eq!(events[0]["eventType"], "SYSTEM_INCIDENT");
}

/// The id of the one dead letter the DLQ consumer has stored.
async fn wait_for_dead_letter(app: &TestApp) -> Uuid {
    wait_until(30, "a dead letter is stored", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dlq_messages")
            .fetch_one(&app.db)
            .await
            .unwrap()
            == 1
    })
    .await;
    sqlx::query_scalar("SELECT id FROM dlq_messages")
        .fetch_one(&app.db)
        .await
        .unwrap()
}
