//! The broadcast acceptance run: 15,000 imported users over EMAIL + IN_APP, with a
//! PAYMENT_FAILED event taken in while it runs. A binary of its own so that its 15,000
//! emails never slow the MailDev reads of the main suite (cargo runs test binaries one
//! after another). Prints its figures; `--nocapture` shows them.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use helpers::{
    envelope, maildev_emails, read_topic, slack_mock, spawn_app_with, wait_until, with_slack,
};

const USERS: i64 = 15_000;

#[tokio::test]
async fn a_broadcast_to_15000_imported_users_completes_while_payment_events_stay_prompt() {
    let slack = slack_mock(&[(200, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;
    let domain = format!(
        "scale{}.example.com",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let users: Vec<Value> = (1..=USERS)
        .map(|id| json!({"userId": id, "email": format!("u{id}@{domain}"), "locale": "ko", "tags": ["scale"]}))
        .collect();
    let started = Instant::now();
    let report: Value = app
        .http
        .post(format!("{}/api/v1/users:import", app.address))
        .json(&users)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["imported"], USERS, "{report}");
    println!(
        "import: {USERS} users in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let created: Value = app
        .post_json(
            "/api/v1/broadcasts",
            &json!({
                "name": "scale",
                "audience": {"segment": {"tags": ["scale"]}},
                "channels": ["EMAIL", "IN_APP"],
                "subject": "정기 점검 안내",
                "body": "일요일 02:00-04:00 서비스 점검이 있습니다.",
            }),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["broadcastId"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let view = |id: String| {
        let app = &app;
        async move {
            app.get(&format!("/api/v1/broadcasts/{id}"))
                .await
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    wait_until(120, "the broadcast is well under way", || async {
        view(id.clone()).await["totals"]["sent"].as_i64().unwrap() >= 2_000
    })
    .await;

    // A transactional event in the middle of the broadcast.
    let payment = envelope(
        "PAYMENT_FAILED",
        900_001,
        json!({"orderId": "o-1", "amount": 1000, "currency": "KRW", "reason": "card declined"}),
    );
    let event_id = payment["eventId"].as_str().unwrap().to_owned();
    let published = Instant::now();
    app.publish(
        "fluxpay.payment.events",
        "900001",
        payment.to_string().as_bytes(),
    )
    .await;
    wait_until(30, "the payment's deliveries are sent", || async {
        let rows = app.deliveries_of_event(&event_id).await;
        rows.len() == 3 && rows.iter().all(|r| r.1 == "SUCCESS")
    })
    .await;
    let payment_latency = published.elapsed();
    let during = view(id.clone()).await;
    println!(
        "PAYMENT_FAILED published to all 3 deliveries sent: {:.0} ms, with the broadcast {} at {}%",
        payment_latency.as_secs_f64() * 1000.0,
        during["status"],
        during["progress"]
    );
    assert_eq!(
        during["status"], "RUNNING",
        "the payment went out while the broadcast ran"
    );
    assert!(
        payment_latency < Duration::from_secs(10),
        "transactional deliveries keep priority: {payment_latency:?}"
    );

    wait_until(900, "the broadcast completes", || async {
        view(id.clone()).await["status"] == "COMPLETED"
    })
    .await;
    let took = started.elapsed();
    let done = view(id.clone()).await;
    println!(
        "broadcast: {USERS} recipients x 2 channels in {:.1} s = {:.0} recipients/s (server timing: {} s)",
        took.as_secs_f64(),
        USERS as f64 / took.as_secs_f64(),
        done["timings"]["elapsedSecs"]
    );
    let totals = &done["totals"];
    assert_eq!(totals["audience"], USERS, "{done}");
    assert_eq!(totals["created"], USERS, "{done}");
    assert_eq!(totals["sent"], 2 * USERS, "{done}");
    assert_eq!(totals["channels"]["EMAIL"]["sent"], USERS, "{done}");
    assert_eq!(totals["channels"]["IN_APP"]["sent"], USERS, "{done}");

    // Every email is in MailDev, once.
    let emails = maildev_emails().await;
    let mut ids: Vec<&str> = emails
        .iter()
        .filter(|e| {
            e["to"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|to| to["address"].as_str().unwrap_or("").ends_with(&domain))
        })
        .filter_map(|e| e["messageId"].as_str())
        .collect();
    let received = ids.len();
    ids.sort_unstable();
    ids.dedup();
    println!("maildev: {received} emails, {} distinct", ids.len());
    assert_eq!((received, ids.len()), (USERS as usize, USERS as usize));

    let events = read_topic(&app.settings, "notification.broadcast.events", 30, |r| {
        !r.is_empty()
    })
    .await;
    let event: Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(event["eventType"], "BROADCAST_COMPLETED");
    assert_eq!(event["totals"]["sent"], 2 * USERS);

    // Leave MailDev small for whoever reads it next.
    let maildev = std::env::var("MAILDEV_URL").unwrap();
    reqwest::Client::new()
        .delete(format!("{maildev}/email/all"))
        .send()
        .await
        .unwrap();
}
