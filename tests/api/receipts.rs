//! Provider receipts and suppression (issue 15), against a gateway double that behaves like
//! an SMS provider: it answers a send with a message id, then calls Herald back later with a
//! signed receipt.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app_with, wait_until};

/// The user the SMS are for.
const USER: i64 = 4242;

/// The Standard Webhooks specification's example secret.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the double reports for a number: (status, reason, permanent).
type Script = HashMap<String, (&'static str, &'static str, bool)>;

/// An SMS provider: `POST /send` answers `{"messageId"}`; when Herald's address is known
/// and the number has a scripted outcome, it posts that receipt 200 ms later.
#[derive(Clone, Default)]
struct Provider {
    herald: Arc<Mutex<Option<String>>>,
    script: Arc<Mutex<Script>>,
    /// The message id the next send gets, instead of a fresh one.
    next_id: Arc<Mutex<Option<String>>>,
    sends: Arc<Mutex<Vec<Value>>>,
    /// Each message id: who it went to, and how often its status was asked.
    messages: Arc<Mutex<HashMap<String, (String, usize)>>>,
}

/// `GET /status/{id}`, for a gateway polled instead of calling back: SENT the first two
/// times, then the scripted outcome for the number (DELIVERED without one).
async fn status(
    State(provider): State<Provider>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, axum::http::StatusCode> {
    let mut messages = provider.messages.lock().unwrap();
    let Some((to, asked)) = messages.get_mut(&id) else {
        return Err(axum::http::StatusCode::NOT_FOUND);
    };
    *asked += 1;
    if *asked <= 2 {
        return Ok(Json(json!({ "status": "SENT" })));
    }
    Ok(Json(
        match provider.script.lock().unwrap().get(to.as_str()) {
            Some((status, reason, permanent)) => {
                json!({ "status": status, "reason": reason, "permanent": permanent })
            }
            None => json!({ "status": "DELIVERED" }),
        },
    ))
}

async fn send(State(provider): State<Provider>, Json(body): Json<Value>) -> Json<Value> {
    let id = provider
        .next_id
        .lock()
        .unwrap()
        .take()
        .unwrap_or_else(|| format!("m-{}", Uuid::new_v4().simple()));
    provider.sends.lock().unwrap().push(body.clone());
    let to = body["to"].as_str().unwrap_or_default().to_owned();
    provider
        .messages
        .lock()
        .unwrap()
        .insert(id.clone(), (to.clone(), 0));
    let outcome = provider.script.lock().unwrap().get(&to).copied();
    let herald = provider.herald.lock().unwrap().clone();
    if let (Some((status, reason, permanent)), Some(herald)) = (outcome, herald) {
        let id = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let receipt = json!({ "messageId": id, "status": status, "reason": reason, "permanent": permanent });
            post_receipt(&herald, "sms", &receipt, SECRET, now(), None).await;
        });
    }
    Json(json!({ "messageId": id }))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Posts a receipt signed with `secret` at `timestamp` (and `webhook_id`, or a fresh one).
async fn post_receipt(
    herald: &str,
    channel: &str,
    body: &Value,
    secret: &str,
    timestamp: i64,
    webhook_id: Option<&str>,
) -> reqwest::Response {
    let payload = body.to_string();
    signed(
        herald,
        channel,
        payload.as_bytes(),
        "application/json",
        secret,
        timestamp,
        webhook_id,
    )
    .await
}

async fn signed(
    herald: &str,
    channel: &str,
    payload: &[u8],
    content_type: &str,
    secret: &str,
    timestamp: i64,
    webhook_id: Option<&str>,
) -> reqwest::Response {
    let id = webhook_id
        .map(str::to_owned)
        .unwrap_or_else(|| format!("msg_{}", Uuid::new_v4().simple()));
    let signature = standardwebhooks::Webhook::new(secret)
        .unwrap()
        .sign(&id, timestamp, payload)
        .unwrap();
    reqwest::Client::new()
        .post(format!("{herald}/api/v1/receipts/{channel}"))
        .header("content-type", content_type)
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(payload.to_vec())
        .send()
        .await
        .unwrap()
}

/// Starts the double and an app sending SMS through it, with the receipt secret set; the
/// double calls back with receipts.
async fn start() -> (TestApp, Provider) {
    let (app, provider) = start_polled(false).await;
    *provider.herald.lock().unwrap() = Some(app.address.clone());
    (app, provider)
}

/// Starts the double and an app; when `polled`, Herald polls the double's status URL (and
/// the double does not call back).
async fn start_polled(polled: bool) -> (TestApp, Provider) {
    let provider = Provider::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = Router::new()
        .route("/send", post(send))
        .route("/status/{id}", axum::routing::get(status))
        .with_state(provider.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let app = spawn_app_with(move |s| {
        s.channels.sms_gateway_url = Some(format!("{base}/send").parse().unwrap());
        if polled {
            s.channels.status_urls.insert(
                herald::domain::Channel::Sms,
                format!("{base}/status/{{messageId}}"),
            );
            s.channels.receipt_poll_backoff = vec![Duration::from_millis(200)];
        }
        s.channels
            .receipt_secrets
            .insert(herald::domain::Channel::Sms, SECRET.to_owned().into());
        s.channels
            .receipt_secrets
            .insert(herald::domain::Channel::Email, SECRET.to_owned().into());
    })
    .await;
    (app, provider)
}

/// Sends one SMS over the HTTP intake and returns its notification and delivery ids.
async fn sms(app: &TestApp, phone: &str) -> (String, Uuid) {
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({ "userId": USER, "recipient": { "phone": phone }, "channels": ["SMS"], "subject": "s", "body": "b" }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    (
        body["notificationId"].as_str().unwrap().to_owned(),
        body["deliveries"][0]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
    )
}

/// The one delivery of a notification, as GET /api/v1/notifications/{id} shows it.
async fn delivery(app: &TestApp, notification: &str) -> Value {
    let body: Value = app
        .get(&format!("/api/v1/notifications/{notification}"))
        .await
        .json()
        .await
        .unwrap();
    body["deliveries"][0].clone()
}

async fn wait_for(
    app: &TestApp,
    notification: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(30, what, || async {
        check(&delivery(app, notification).await)
    })
    .await;
    delivery(app, notification).await
}

#[tokio::test]
async fn an_sms_reported_undelivered_shows_on_the_notification_and_suppresses_the_number_until_lifted()
 {
    let (app, provider) = start().await;
    let phone = "+821099990001";
    provider.script.lock().unwrap().insert(
        phone.to_owned(),
        ("UNDELIVERED", "unknown subscriber", true),
    );

    let (first, _) = sms(&app, phone).await;
    let shown = wait_for(&app, &first, "the receipt is applied", |d| {
        !d["receipt"].is_null()
    })
    .await;
    assert_eq!(
        shown["status"], "SUCCESS",
        "the delivery status keeps its meaning"
    );
    assert_eq!(shown["receipt"]["status"], "UNDELIVERED");
    assert_eq!(shown["receipt"]["reason"], "unknown subscriber");
    assert_eq!(shown["receipt"]["permanent"], true);

    // History and the dashboard learn it from the delivery events.
    wait_until(30, "history shows the receipt", || async {
        let page: Value = app
            .get(&format!("/api/v1/notifications?userId={USER}"))
            .await
            .json()
            .await
            .unwrap();
        page["items"][0]["receipt"]["status"] == "UNDELIVERED"
    })
    .await;
    let report: Value = app
        .get("/api/v1/dashboard/delivery/channels")
        .await
        .json()
        .await
        .unwrap();
    let sms_stats = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == "SMS")
        .cloned()
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(sms_stats["success"], 1, "{sms_stats}");
    assert_eq!(sms_stats["undelivered"], 1, "{sms_stats}");
    assert_eq!(sms_stats["delivered"], 0, "{sms_stats}");
    assert_eq!(sms_stats["deliveredRate"], 0.0, "{sms_stats}");

    // The next SMS to that number is not sent.
    let (second, _) = sms(&app, phone).await;
    let skipped = wait_for(&app, &second, "the second SMS is skipped", |d| {
        d["status"] == "SKIPPED"
    })
    .await;
    assert_eq!(skipped["skipReason"], "suppressed");
    assert_eq!(provider.sends.lock().unwrap().len(), 1);

    // The operator finds the suppression and lifts it; the number gets messages again.
    let list: Value = app
        .get("/api/v1/admin/suppressions?channel=sms")
        .await
        .json()
        .await
        .unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["address"], phone);
    assert!(
        items[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown subscriber")
    );
    let id = items[0]["id"].as_str().unwrap();
    let lifted = app
        .http
        .delete(format!("{}/api/v1/admin/suppressions/{id}", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(lifted.status(), 200);
    let lifted: Value = lifted.json().await.unwrap();
    assert!(
        lifted["liftedAt"].is_string() && lifted["liftedBy"].is_string(),
        "{lifted}"
    );

    provider.script.lock().unwrap().clear();
    let (third, _) = sms(&app, phone).await;
    wait_for(&app, &third, "the third SMS is sent", |d| {
        d["status"] == "SUCCESS"
    })
    .await;
    assert_eq!(provider.sends.lock().unwrap().len(), 2);

    // Without the scope, the list is refused.
    let key = app.api_key("reader", &["notifications:read"]).await;
    let refused = app
        .http
        .get(format!("{}/api/v1/admin/suppressions", app.address))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
}

#[tokio::test]
async fn a_forged_stale_or_replayed_receipt_is_refused_and_an_out_of_order_one_changes_nothing() {
    let (app, provider) = start().await;
    let (notification, _) = sms(&app, "+821099990002").await;
    let sent = wait_for(&app, &notification, "the SMS is sent", |d| {
        d["status"] == "SUCCESS"
    })
    .await;
    let message_id = sent["providerRef"].as_str().unwrap().to_owned();
    assert_eq!(provider.sends.lock().unwrap().len(), 1);

    let delivered = json!({ "messageId": message_id, "status": "delivered", "occurredAt": "2026-12-02T10:00:05Z" });
    let forged = post_receipt(
        &app.address,
        "sms",
        &delivered,
        "whsec_c2VjcmV0LW9mLXNvbWVvbmUtZWxzZQ==",
        now(),
        None,
    )
    .await;
    assert_eq!(forged.status(), 401);
    let stale = post_receipt(&app.address, "sms", &delivered, SECRET, now() - 600, None).await;
    assert_eq!(stale.status(), 401);
    let body: Value = stale.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too old"),
        "{body}"
    );
    let unsigned = reqwest::Client::new()
        .post(format!("{}/api/v1/receipts/sms", app.address))
        .json(&delivered)
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    assert!(delivery(&app, &notification).await["receipt"].is_null());

    let applied = post_receipt(
        &app.address,
        "sms",
        &delivered,
        SECRET,
        now(),
        Some("msg_once"),
    )
    .await;
    assert_eq!(applied.status(), 200);
    assert_eq!(applied.json::<Value>().await.unwrap()["applied"], true);
    let replayed = post_receipt(
        &app.address,
        "sms",
        &delivered,
        SECRET,
        now(),
        Some("msg_once"),
    )
    .await;
    assert_eq!(replayed.status(), 409);

    // An earlier failure arriving after the delivery report is kept but not applied.
    let earlier = json!({ "messageId": message_id, "status": "UNDELIVERED", "reason": "absent subscriber", "occurredAt": "2026-12-02T10:00:01Z" });
    let late = post_receipt(&app.address, "sms", &earlier, SECRET, now(), None).await;
    assert_eq!(late.status(), 200);
    assert_eq!(late.json::<Value>().await.unwrap()["applied"], false);
    let shown = delivery(&app, &notification).await;
    assert_eq!(shown["receipt"]["status"], "DELIVERED");
    assert_eq!(shown["receipt"]["at"], "2026-12-02T10:00:05Z");

    // A receipt in a shape it cannot read is a 400 that says why.
    let bad = post_receipt(
        &app.address,
        "sms",
        &json!({ "messageId": message_id, "status": "BOUNCED" }),
        SECRET,
        now(),
        None,
    )
    .await;
    assert_eq!(bad.status(), 400);
    let unknown = post_receipt(
        &app.address,
        "sms",
        &json!({ "messageId": "m-nobody", "status": "DELIVERED" }),
        SECRET,
        now(),
        None,
    )
    .await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"]["code"],
        "unknown_message"
    );
}

#[tokio::test]
async fn a_receipt_that_comes_before_its_send_is_recorded_is_kept_and_applied() {
    let (app, provider) = start().await;
    // The provider's callback wins the race against Herald's record of the send.
    let early = json!({ "messageId": "m-early", "status": "DELIVERED" });
    let response = post_receipt(&app.address, "sms", &early, SECRET, now(), None).await;
    assert_eq!(response.status(), 404);

    *provider.next_id.lock().unwrap() = Some("m-early".to_owned());
    let (notification, _) = sms(&app, "+821099990003").await;
    let shown = wait_for(&app, &notification, "the kept receipt is applied", |d| {
        !d["receipt"].is_null()
    })
    .await;
    assert_eq!(shown["receipt"]["status"], "DELIVERED");
}

#[tokio::test]
async fn a_bounce_report_from_a_mail_server_suppresses_the_address_for_email() {
    let (app, _) = start().await;
    let address = format!("gone{}@example.com", Uuid::new_v4().simple());
    let send = |address: String| {
        let app = &app;
        async move {
            let response = app
                .post_json(
                    "/api/v1/notifications",
                    &json!({ "recipient": { "email": address }, "channels": ["EMAIL"], "subject": "s", "body": "b" }),
                    &[],
                )
                .await;
            assert_eq!(response.status(), 202);
            let body: Value = response.json().await.unwrap();
            body["notificationId"].as_str().unwrap().to_owned()
        }
    };
    let first = send(address.clone()).await;
    let sent = wait_for(&app, &first, "the email is sent", |d| {
        d["status"] == "SUCCESS"
    })
    .await;
    let delivery_id = sent["id"].as_str().unwrap();

    let report = format!(
        "Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\n\
         Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.com\r\n\r\n\
         Final-Recipient: rfc822; {address}\r\nAction: failed\r\nStatus: 5.1.1\r\n\
         Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n\
         Message-ID: <{delivery_id}@herald>\r\n--b--\r\n"
    );
    let response = signed(
        &app.address,
        "email",
        report.as_bytes(),
        "multipart/report; report-type=delivery-status; boundary=b",
        SECRET,
        now(),
        None,
    )
    .await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let shown = delivery(&app, &first).await;
    assert_eq!(shown["receipt"]["status"], "BOUNCED");
    assert_eq!(shown["receipt"]["permanent"], true);
    assert_eq!(shown["receipt"]["reason"], "550 5.1.1 user unknown");

    let second = send(address).await;
    let skipped = wait_for(&app, &second, "the second email is skipped", |d| {
        d["status"] == "SKIPPED"
    })
    .await;
    assert_eq!(skipped["skipReason"], "suppressed");
}

#[tokio::test]
async fn a_gateway_without_callbacks_is_polled_until_it_answers_and_the_answer_applies() {
    let (app, provider) = start_polled(true).await;
    let gone = "+821099990004";
    provider
        .script
        .lock()
        .unwrap()
        .insert(gone.to_owned(), ("UNDELIVERED", "unknown subscriber", true));

    let (undelivered, _) = sms(&app, gone).await;
    let (delivered, _) = sms(&app, "+821099990005").await;
    let shown = wait_for(&app, &undelivered, "the polled receipt is applied", |d| {
        !d["receipt"].is_null()
    })
    .await;
    assert_eq!(shown["receipt"]["status"], "UNDELIVERED");
    assert_eq!(shown["receipt"]["reason"], "unknown subscriber");
    let message_id = shown["providerRef"].as_str().unwrap().to_owned();
    let other = wait_for(&app, &delivered, "the other receipt is applied", |d| {
        !d["receipt"].is_null()
    })
    .await;
    assert_eq!(other["receipt"]["status"], "DELIVERED");

    // Asked until it answered (twice "SENT", then the answer), and not after.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(provider.messages.lock().unwrap()[&message_id].1, 3);
    let polls: i64 = sqlx::query_scalar("SELECT count(*) FROM receipt_polls")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(polls, 0);
    // The permanent failure suppressed the number.
    let (third, _) = sms(&app, gone).await;
    let skipped = wait_for(&app, &third, "the next SMS is skipped", |d| {
        d["status"] == "SKIPPED"
    })
    .await;
    assert_eq!(skipped["skipReason"], "suppressed");
}
