//! Signed outbound webhooks (issue 15), against a receiver that checks each call's
//! Standard Webhooks signature with the secret Herald showed once.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, routing::post};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, committed_offsets, read_topic, slack_mock, spawn_app_with, wait_until, with_slack,
};

/// One call a [`Receiver`] got.
#[derive(Clone, Debug)]
struct Call {
    webhook_id: String,
    /// Its signature held with the endpoint's secret.
    valid: bool,
    body: Value,
    /// Answered 2xx.
    taken: bool,
}

/// A webhook receiver: answers 503 while `down`, else 204; keeps every call.
#[derive(Clone, Default)]
struct Receiver {
    secret: Arc<Mutex<Option<String>>>,
    down: Arc<Mutex<bool>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

async fn hook(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let secret = receiver.secret.lock().unwrap().clone();
    let valid = secret.is_some_and(|s| {
        standardwebhooks::Webhook::new(&s)
            .unwrap()
            .verify(&body, &headers)
            .is_ok()
    });
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let down = *receiver.down.lock().unwrap();
    receiver.calls.lock().unwrap().push(Call {
        webhook_id: id,
        valid,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        taken: !down,
    });
    if down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    }
}

async fn receiver() -> (Receiver, String) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let router = Router::new()
        .route("/hook", post(hook))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (receiver, url)
}

/// Makes an endpoint for `kinds` at `url`; returns (id, secret).
async fn endpoint(app: &TestApp, url: &str, kinds: &[&str]) -> (String, String) {
    let response = app
        .post_json(
            "/api/v1/webhooks",
            &json!({ "url": url, "kinds": kinds }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    (
        body["id"].as_str().unwrap().to_owned(),
        body["secret"].as_str().unwrap().to_owned(),
    )
}

/// Sends an incident (one SLACK delivery); returns its notification id.
async fn incident(app: &TestApp, title: &str) -> String {
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({ "eventType": "SYSTEM_INCIDENT", "data": { "title": title, "severity": "critical" } }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["notificationId"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn an_endpoint_down_for_a_while_receives_every_event_afterwards_each_verifiable_with_its_secret()
 {
    let slack = slack_mock(&[(200, None)]).await;
    let slack = with_slack(&slack);
    let app = spawn_app_with(|s| {
        slack(s);
        s.webhooks.allow_private = true;
        s.webhooks.backoff = vec![Duration::from_millis(500), Duration::from_secs(1)];
    })
    .await;
    let (receiver, url) = receiver().await;
    let (id, secret) = endpoint(&app, &url, &["notification_status"]).await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    *receiver.secret.lock().unwrap() = Some(secret);
    *receiver.down.lock().unwrap() = true;

    let mut notifications = Vec::new();
    for n in 0..3 {
        notifications.push(incident(&app, &format!("incident {n}")).await);
    }
    wait_until(60, "the receiver has refused some calls", || async {
        receiver.calls.lock().unwrap().len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    *receiver.down.lock().unwrap() = false;

    // Every notification's terminal status event arrives once the endpoint is back.
    wait_until(60, "every terminal status event was taken", || async {
        let calls = receiver.calls.lock().unwrap().clone();
        notifications.iter().all(|n| {
            calls.iter().any(|c| {
                c.valid
                    && c.taken
                    && c.body["data"]["notificationId"] == n.as_str()
                    && c.body["data"]["status"] == "COMPLETED"
            })
        })
    })
    .await;
    // Let the calls retried meanwhile finish too.
    wait_until(30, "no call waits", || async {
        let log: Value = app
            .get(&format!("/api/v1/webhooks/{id}/deliveries?status=PENDING"))
            .await
            .json()
            .await
            .unwrap();
        log["items"].as_array().unwrap().is_empty()
    })
    .await;

    let calls = receiver.calls.lock().unwrap().clone();
    assert!(
        calls.iter().all(|c| c.valid),
        "every call is signed with the endpoint's secret"
    );
    assert!(
        calls
            .iter()
            .all(|c| c.body["type"] == "notification.status_changed")
    );
    // A retried call keeps its webhook-id, so the receiver can drop repeats.
    let mut by_id: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &calls {
        *by_id.entry(c.webhook_id.as_str()).or_default() += 1;
    }
    assert!(
        by_id.values().any(|n| *n > 1),
        "some calls were retried: {by_id:?}"
    );
    let distinct_events: std::collections::BTreeSet<String> = calls
        .iter()
        .map(|c| {
            format!(
                "{}:{}",
                c.body["data"]["notificationId"], c.body["data"]["version"]
            )
        })
        .collect();
    assert_eq!(
        by_id.len(),
        distinct_events.len(),
        "one webhook-id per event"
    );

    // The endpoint's delivery log shows the calls, retried and then delivered.
    let log: Value = app
        .get(&format!("/api/v1/webhooks/{id}/deliveries"))
        .await
        .json()
        .await
        .unwrap();
    let items = log["items"].as_array().unwrap();
    assert_eq!(items.len(), distinct_events.len(), "{log}");
    assert!(items.iter().all(|c| c["status"] == "SUCCESS"), "{log}");
    assert!(
        items.iter().any(|c| c["attempts"].as_i64() > Some(1)),
        "{log}"
    );
    // The secret is never shown again.
    let listed: Value = app.get("/api/v1/webhooks").await.json().await.unwrap();
    assert!(listed["items"][0].get("secret").is_none(), "{listed}");
}

/// Offsets the fan-out's group has committed on the status events topic; `None` when it has
/// committed none.
async fn fan_out_committed(app: &TestApp) -> Option<i64> {
    committed_offsets(
        &app.settings,
        "notif-webhooks",
        "notification.status.events",
    )
    .await
}

#[tokio::test]
async fn the_fan_out_reads_nothing_until_an_endpoint_exists_and_then_only_what_came_after_it() {
    let slack = slack_mock(&[(200, None)]).await;
    let slack = with_slack(&slack);
    let app = spawn_app_with(|s| {
        slack(s);
        s.webhooks.allow_private = true;
    })
    .await;
    let before = incident(&app, "before any endpoint").await;
    read_topic(&app.settings, "notification.status.events", 30, |records| {
        records.iter().any(|r| {
            serde_json::from_slice::<Value>(&r.payload)
                .is_ok_and(|e| e["notificationId"] == before.as_str() && e["status"] == "COMPLETED")
        })
    })
    .await;
    // Time enough for a fan-out that read the topics to have read and committed them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fan_out_committed(&app).await, None, "nothing read yet");

    let (receiver, url) = receiver().await;
    let (_, secret) = endpoint(&app, &url, &["notification_status"]).await;
    *receiver.secret.lock().unwrap() = Some(secret);
    let after = incident(&app, "after the endpoint").await;
    wait_until(
        60,
        "the second incident's terminal status was called",
        || async {
            receiver.calls.lock().unwrap().iter().any(|c| {
                c.valid
                    && c.body["data"]["notificationId"] == after.as_str()
                    && c.body["data"]["status"] == "COMPLETED"
            })
        },
    )
    .await;
    let calls = receiver.calls.lock().unwrap().clone();
    assert!(
        calls
            .iter()
            .all(|c| c.body["data"]["notificationId"] == after.as_str()),
        "only the events from the endpoint's creation on: {calls:?}"
    );
    assert!(fan_out_committed(&app).await.is_some());
}

#[tokio::test]
async fn a_webhook_url_on_a_loopback_private_or_link_local_address_is_refused_by_default() {
    let app = spawn_app_with(|_| {}).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
    ] {
        let response = app
            .post_json("/api/v1/webhooks", &json!({ "url": url }), &[])
            .await;
        assert_eq!(response.status(), 400, "{url}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not a public address"),
            "{url}: {body}"
        );
    }
    for (body, why) in [
        (json!({ "url": "ftp://example.com/x" }), "http"),
        (
            json!({ "url": "https://93.184.215.14/hook", "kinds": ["everything"] }),
            "kinds",
        ),
        (
            json!({ "url": "https://93.184.215.14/hook", "kinds": [] }),
            "kinds",
        ),
    ] {
        let response = app.post_json("/api/v1/webhooks", &body, &[]).await;
        assert_eq!(response.status(), 400, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(why),
            "{answer}"
        );
    }
    // A public address is taken (no call is made until an event comes).
    let response = app
        .post_json(
            "/api/v1/webhooks",
            &json!({ "url": "https://93.184.215.14/hook", "kinds": ["delivery"] }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 201);
    // Without the scope: 403.
    let key = app.api_key("sender", &["notifications:write"]).await;
    let refused = app
        .http
        .get(format!("{}/api/v1/webhooks", app.address))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
}

/// An app whose webhook calls retry every 300 ms, with these deadlines.
async fn failing_app(disable_after: Duration, give_up_after: Duration) -> TestApp {
    let slack = slack_mock(&[(200, None)]).await;
    let slack = with_slack(&slack);
    spawn_app_with(move |s| {
        slack(s);
        s.webhooks.allow_private = true;
        s.webhooks.backoff = vec![Duration::from_millis(300)];
        s.webhooks.disable_after = disable_after;
        s.webhooks.give_up_after = give_up_after;
    })
    .await
}

/// How many calls of endpoint `id` are in `status`.
async fn calls_in(app: &TestApp, id: &str, status: &str) -> usize {
    let log: Value = app
        .get(&format!("/api/v1/webhooks/{id}/deliveries?status={status}"))
        .await
        .json()
        .await
        .unwrap();
    log["items"].as_array().unwrap().len()
}

#[tokio::test]
async fn an_endpoint_failing_long_enough_is_disabled_its_calls_wait_and_go_out_when_enabled() {
    let app = failing_app(Duration::from_secs(1), Duration::from_secs(600)).await;
    let (receiver, url) = receiver().await;
    let (id, secret) = endpoint(&app, &url, &["notification_status"]).await;
    *receiver.secret.lock().unwrap() = Some(secret);
    *receiver.down.lock().unwrap() = true;
    let notification = incident(&app, "nobody listens").await;

    let endpoint_state = || async {
        app.get(&format!("/api/v1/webhooks/{id}"))
            .await
            .json::<Value>()
            .await
            .unwrap()
    };
    wait_until(60, "the endpoint is disabled", || async {
        endpoint_state().await["disabledAt"].is_string()
    })
    .await;
    let shown = endpoint_state().await;
    assert!(
        shown["disabledReason"].as_str().unwrap().contains("failed"),
        "{shown}"
    );
    // Its calls wait: no call is made while it is disabled.
    let pending = calls_in(&app, &id, "PENDING").await;
    assert!(pending > 0);
    let made = receiver.calls.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        receiver.calls.lock().unwrap().len(),
        made,
        "no call while disabled"
    );

    // Fixed and enabled, the waiting calls go out.
    *receiver.down.lock().unwrap() = false;
    let enabled = app
        .post_json(&format!("/api/v1/webhooks/{id}/enable"), &json!({}), &[])
        .await;
    assert_eq!(enabled.status(), 200);
    wait_until(30, "the waiting calls are delivered", || async {
        calls_in(&app, &id, "PENDING").await == 0 && calls_in(&app, &id, "SUCCESS").await > 0
    })
    .await;
    let calls = receiver.calls.lock().unwrap().clone();
    assert!(calls.iter().any(|c| c.taken
        && c.valid
        && c.body["data"]["notificationId"] == notification.as_str()
        && c.body["data"]["status"] == "COMPLETED"));
}

#[tokio::test]
async fn a_call_failing_past_its_deadline_is_dead_lettered_and_a_retry_of_the_letter_sends_it() {
    let app = failing_app(Duration::from_secs(600), Duration::from_secs(1)).await;
    let (receiver, url) = receiver().await;
    let (id, secret) = endpoint(&app, &url, &["notification_status"]).await;
    *receiver.secret.lock().unwrap() = Some(secret);
    *receiver.down.lock().unwrap() = true;
    let notification = incident(&app, "nobody listens").await;

    let letters = || async {
        sqlx::query_scalar::<_, uuid::Uuid>(
            "SELECT id FROM dlq_messages WHERE error_class = 'webhook_exhausted'",
        )
        .fetch_all(&app.db)
        .await
        .unwrap()
    };
    wait_until(
        60,
        "every call is dead-lettered and the letters stored",
        || async {
            let failed = calls_in(&app, &id, "FAILED").await;
            calls_in(&app, &id, "PENDING").await == 0
                && failed > 0
                && letters().await.len() == failed
        },
    )
    .await;
    let letters = letters().await;

    // The receiver is fixed; the operator retries the letters and the calls go out.
    *receiver.down.lock().unwrap() = false;
    for letter in &letters {
        let retried = app
            .post_json(
                &format!("/api/v1/admin/dlq/{letter}/retry"),
                &json!({}),
                &[],
            )
            .await;
        assert_eq!(retried.status(), 200, "{:?}", retried.text().await);
    }
    wait_until(30, "the log shows the calls delivered", || async {
        calls_in(&app, &id, "SUCCESS").await == letters.len()
    })
    .await;
    let last = receiver.calls.lock().unwrap().last().cloned().unwrap();
    assert!(last.valid && last.taken);
    assert_eq!(last.body["data"]["notificationId"], notification.as_str());
}
