//! Time-aware delivery (issue 18): quiet hours in the user's time zone, frequency caps and
//! digests, end to end on the real broker, PostgreSQL, Redis and MailDev.
//!
//! Where waiting for the clock would be slow (a quiet period that ends in two hours, a
//! digest window), the test moves the stored due time to now instead: that is all the
//! passing of time does to a held delivery, and the dispatcher then sends it as it would.
//! The wall-clock arithmetic itself (Asia/Seoul, and Europe/London and America/New_York
//! across their changes) is tested in `src/timing/quiet_hours.rs`.

use std::{path::PathBuf, time::Duration};

use chrono::{DateTime, Duration as Span, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use herald::roles::Role;
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

use crate::helpers::{
    TestApp, envelope, maildev_emails, spawn_app_as, spawn_app_on, spawn_app_with, wait_until,
};

/// A routing file for these tests: the default routes, ORDER_SHIPPED and ORDER_CANCELLED
/// also on PUSH, and `extra` appended (caps) or spliced into a route (by the caller).
fn routing_file(edit: impl FnOnce(String) -> String) -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(manifest.join("config/routing.toml")).unwrap();
    let text = text.replace(
        "event_type = \"ORDER_SHIPPED\"\nchannels = [\"EMAIL\", \"IN_APP\"]",
        "event_type = \"ORDER_SHIPPED\"\nchannels = [\"EMAIL\", \"IN_APP\", \"PUSH\"]",
    );
    let text = edit(text);
    let path = std::env::temp_dir().join(format!("herald-routing-{}.toml", Uuid::new_v4()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Adds `line` to the route of `event_type` (a key of its table).
fn on_route(text: String, event_type: &str, line: &str) -> String {
    let anchor = format!("event_type = \"{event_type}\"\n");
    assert!(text.contains(&anchor), "{event_type} has a route");
    text.replacen(&anchor, &format!("{anchor}{line}\n"), 1)
}

async fn set_contact(app: &TestApp, user: i64, email: &str, timezone: &str) {
    let response = app
        .put_json(
            &format!("/api/v1/users/{user}/contact"),
            &json!({ "email": email, "timezone": timezone, "locale": "en" }),
        )
        .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

/// The emails to `address` in MailDev.
async fn emails_to(address: &str) -> Vec<Value> {
    maildev_emails()
        .await
        .into_iter()
        .filter(|e| e["to"][0]["address"] == address)
        .collect()
}

/// The emails to `address` in MailDev, once the first has arrived (within 30 s).
async fn emails_once_arrived(address: &str) -> Vec<Value> {
    wait_until(30, "the digest email arrives", || async {
        !emails_to(address).await.is_empty()
    })
    .await;
    emails_to(address).await
}

async fn set_quiet_hours(app: &TestApp, user: i64, windows: Value) -> reqwest::Response {
    app.put_json(
        &format!("/api/v1/notifications/settings?userId={user}"),
        &json!({ "quietHours": windows }),
    )
    .await
}

/// A notification taken in over HTTP (no recipient: the directory's applies).
async fn notify(app: &TestApp, body: Value) -> Value {
    let response = app.post_json("/api/v1/notifications", &body, &[]).await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    response.json().await.unwrap()
}

/// (channel, status, due, hold reason, digest) of a notification's deliveries.
type Row = (String, String, DateTime<Utc>, Option<String>, Option<Uuid>);

async fn deliveries(app: &TestApp, notification: &str) -> Vec<Row> {
    sqlx::query_as(
        "SELECT channel, status, next_attempt_at, hold_reason, digest_id FROM deliveries \
         WHERE notification_id = $1::uuid ORDER BY channel",
    )
    .bind(notification)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

/// "Moves the clock" to the due time of the notifications' held deliveries.
async fn make_due(app: &TestApp, notifications: &[&str]) {
    sqlx::query(
        "UPDATE deliveries SET next_attempt_at = now() \
         WHERE notification_id = ANY($1::uuid[]) AND status = 'PENDING'",
    )
    .bind(notifications)
    .execute(&app.db)
    .await
    .unwrap();
}

/// A user's history entries (the read model) of one event type.
async fn history_of(app: &TestApp, user: i64, event_type: &str) -> Vec<Value> {
    let page: Value = app
        .get(&format!("/api/v1/notifications?userId={user}"))
        .await
        .json()
        .await
        .unwrap();
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["eventType"] == event_type)
        .cloned()
        .collect()
}

/// The notification made of a Kafka event, once it is taken in.
async fn notification_of(app: &TestApp, event_id: &str) -> String {
    let find = || async {
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM notifications WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&app.db)
            .await
            .unwrap()
    };
    wait_until(60, &format!("event {event_id} is taken in"), || async {
        find().await.is_some()
    })
    .await;
    find().await.unwrap().to_string()
}

/// Waits until every delivery of the notification but the SKIPPED ones is `status`.
async fn wait_for_status(app: &TestApp, notification: &str, status: &str) {
    wait_until(30, &format!("{notification} is {status}"), || async {
        let rows = deliveries(app, notification).await;
        let sent: Vec<_> = rows.iter().filter(|r| r.1 != "SKIPPED").collect();
        !sent.is_empty() && sent.iter().all(|r| r.1 == status)
    })
    .await;
}

/// The next instant after now when it is `hh:mm` in `tz`.
fn next_local(tz: Tz, hour: u32, minute: u32) -> DateTime<Utc> {
    let now = Utc::now().with_timezone(&tz);
    let time = NaiveTime::from_hms_opt(hour, minute, 0).unwrap();
    let today = tz
        .from_local_datetime(&now.date_naive().and_time(time))
        .single()
        .unwrap();
    let at = if today > now {
        today
    } else {
        today + Span::days(1)
    };
    at.with_timezone(&Utc)
}

#[tokio::test]
async fn a_payment_completed_at_23_30_in_seoul_goes_at_08_00_and_a_payment_failed_goes_at_once() {
    let app = spawn_app_with(|s| s.ingest.routing_file = routing_file(|t| t)).await;
    let seoul: Tz = "Asia/Seoul".parse().unwrap();
    set_contact(&app, 1801, "night-owl@example.com", "Asia/Seoul").await;
    let response = set_quiet_hours(&app, 1801, json!([{ "from": "22:00", "to": "08:00" }])).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let settings: Value = response.json().await.unwrap();
    assert_eq!(
        settings["quietHours"],
        json!([{ "from": "22:00", "to": "08:00" }])
    );

    // Planned for the next 23:30 in Seoul (scheduledAt stands in for a clock at 23:30).
    let half_past_eleven = next_local(seoul, 23, 30);
    let eight = next_local(seoul, 8, 0);
    let eight = if eight < half_past_eleven {
        eight + Span::days(1)
    } else {
        eight
    };
    let completed = notify(
        &app,
        json!({ "userId": 1801, "eventType": "PAYMENT_COMPLETED",
                "data": { "amount": 12000, "currency": "KRW" },
                "scheduledAt": half_past_eleven.to_rfc3339() }),
    )
    .await;
    let failed = notify(
        &app,
        json!({ "userId": 1801, "eventType": "PAYMENT_FAILED",
                "data": { "amount": 12000, "currency": "KRW", "reason": "card declined" },
                "scheduledAt": half_past_eleven.to_rfc3339() }),
    )
    .await;

    // The answer says it: held for quiet hours until 08:00 KST the next morning...
    for delivery in completed["deliveries"].as_array().unwrap() {
        assert_eq!(delivery["status"], "PENDING", "{delivery}");
        assert_eq!(delivery["hold"]["reason"], "quiet_hours", "{delivery}");
        let until: DateTime<Utc> = delivery["hold"]["until"].as_str().unwrap().parse().unwrap();
        assert_eq!(until, eight, "{delivery}");
        assert_eq!(until.with_timezone(&seoul).hour(), 8);
    }
    // ...while PAYMENT_FAILED is critical: due at 23:30 as scheduled (its SLACK too).
    for delivery in failed["deliveries"].as_array().unwrap() {
        if delivery["status"] == "SKIPPED" {
            continue;
        }
        assert_eq!(delivery["hold"]["reason"], "scheduled", "{delivery}");
        let until: DateTime<Utc> = delivery["hold"]["until"].as_str().unwrap().parse().unwrap();
        assert_eq!(until, half_past_eleven, "{delivery}");
    }
    let id = completed["notificationId"].as_str().unwrap();
    for (_, status, due, hold, _) in deliveries(&app, id).await {
        assert_eq!(
            (status.as_str(), due, hold.as_deref()),
            ("PENDING", eight, Some("quiet_hours"))
        );
    }
    // GET /notifications/{id} shows the reason next to the due time.
    let view: Value = app
        .get(&format!("/api/v1/notifications/{id}"))
        .await
        .json()
        .await
        .unwrap();
    for delivery in view["deliveries"].as_array().unwrap() {
        assert_eq!(delivery["holdReason"], "quiet_hours", "{delivery}");
        let due: DateTime<Utc> = delivery["nextAttemptAt"].as_str().unwrap().parse().unwrap();
        assert_eq!(due, eight);
    }
}

#[tokio::test]
async fn an_event_inside_quiet_hours_waits_for_their_end_and_then_goes_while_a_critical_one_goes_at_once()
 {
    let app = spawn_app_with(|s| s.ingest.routing_file = routing_file(|t| t)).await;
    let seoul: Tz = "Asia/Seoul".parse().unwrap();
    set_contact(&app, 1802, "quiet@example.com", "Asia/Seoul").await;
    // Quiet from an hour ago until two hours from now, Seoul time: it is quiet now.
    let now = Utc::now().with_timezone(&seoul);
    let (from, to) = (now - Span::hours(1), now + Span::hours(2));
    let ends = to
        .with_second(0)
        .unwrap()
        .with_nanosecond(0)
        .unwrap()
        .with_timezone(&Utc);
    let response = set_quiet_hours(
        &app,
        1802,
        json!([{ "from": from.format("%H:%M").to_string(), "to": to.format("%H:%M").to_string() }]),
    )
    .await;
    assert_eq!(response.status(), 200);

    // Both through Kafka, as upstream services send them.
    let mut completed = envelope("PAYMENT_COMPLETED", 1802, json!({}));
    completed["recipient"] = json!({});
    let mut failed = envelope("PAYMENT_FAILED", 1802, json!({}));
    failed["recipient"] = json!({});
    for event in [&completed, &failed] {
        app.publish(
            "fluxpay.payment.events",
            "1802",
            event.to_string().as_bytes(),
        )
        .await;
    }
    let completed_id = notification_of(&app, completed["eventId"].as_str().unwrap()).await;
    let failed_id = notification_of(&app, failed["eventId"].as_str().unwrap()).await;

    // PAYMENT_FAILED is sent at once on EMAIL and IN_APP.
    wait_until(30, "the critical event is sent", || async {
        deliveries(&app, &failed_id)
            .await
            .iter()
            .filter(|r| r.0 != "SLACK")
            .all(|r| r.1 == "SUCCESS")
    })
    .await;
    // PAYMENT_COMPLETED waits for the end of the quiet period.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (channel, status, due, hold, _) in deliveries(&app, &completed_id).await {
        assert_eq!(status, "PENDING", "{channel}");
        assert_eq!(hold.as_deref(), Some("quiet_hours"), "{channel}");
        assert_eq!(due, ends, "{channel}");
    }
    // The history (the read model) shows why, and until when.
    wait_until(30, "the history shows the held deliveries", || async {
        history_of(&app, 1802, "PAYMENT_COMPLETED")
            .await
            .iter()
            .filter(|i| i["holdReason"] == "quiet_hours")
            .filter(|i| {
                i["holdUntil"]
                    .as_str()
                    .and_then(|t| t.parse::<DateTime<Utc>>().ok())
                    == Some(ends)
            })
            .count()
            == 2
    })
    .await;

    // The period ends: it goes, and the reason is gone.
    make_due(&app, &[&completed_id]).await;
    wait_for_status(&app, &completed_id, "SUCCESS").await;
    assert!(
        deliveries(&app, &completed_id)
            .await
            .iter()
            .all(|r| r.3.is_none())
    );
    wait_until(
        30,
        "the history shows them sent, no longer held",
        || async {
            history_of(&app, 1802, "PAYMENT_COMPLETED")
                .await
                .iter()
                .all(|i| i["status"] == "SUCCESS" && i.get("holdReason").is_none())
        },
    )
    .await;
}

#[tokio::test]
async fn an_event_types_default_quiet_hours_apply_unless_the_user_set_their_own() {
    let path = routing_file(|t| {
        on_route(
            t,
            "SUBSCRIPTION_RENEWED",
            r#"quiet_hours = [{ from = "00:00", to = "23:59" }]"#,
        )
    });
    let app = spawn_app_with(move |s| s.ingest.routing_file = path).await;
    set_contact(&app, 1803, "default@example.com", "Europe/London").await;
    set_contact(&app, 1804, "own@example.com", "Europe/London").await;
    // 1804 has none at all.
    assert_eq!(set_quiet_hours(&app, 1804, json!([])).await.status(), 200);

    let renewed = |user: i64| {
        json!({ "userId": user, "eventType": "SUBSCRIPTION_RENEWED",
                "data": { "plan": "Pro", "amount": 9900, "currency": "KRW" } })
    };
    let default = notify(&app, renewed(1803)).await;
    let own = notify(&app, renewed(1804)).await;

    let london: Tz = "Europe/London".parse().unwrap();
    let held = &default["deliveries"][0];
    assert_eq!(held["hold"]["reason"], "quiet_hours", "{held}");
    let until: DateTime<Utc> = held["hold"]["until"].as_str().unwrap().parse().unwrap();
    let local = until.with_timezone(&london);
    assert_eq!(
        (local.hour(), local.minute()),
        (23, 59),
        "ends at 23:59 London time"
    );
    assert!(own["deliveries"][0].get("hold").is_none(), "{own}");
    wait_for_status(&app, own["notificationId"].as_str().unwrap(), "SUCCESS").await;
}

#[tokio::test]
async fn quiet_hours_that_make_no_sense_are_refused_with_the_reason() {
    let app = spawn_app_with(|s| s.ingest.routing_file = routing_file(|t| t)).await;
    for (windows, needle) in [
        (json!([{ "from": "08:00", "to": "08:00" }]), "empty"),
        (json!([{ "from": "25:00", "to": "08:00" }]), "HH:MM"),
        (json!([{ "from": "22:00" }]), "to"),
        (
            json!([{ "from": "22:00", "to": "08:00", "channels": ["SLACK"] }]),
            "operator",
        ),
        (
            json!([{ "from": "22:00", "to": "08:00", "channels": [] }]),
            "at least one",
        ),
        (
            json!([{ "from": "22:00", "to": "08:00", "days": "weekdays" }]),
            "days",
        ),
    ] {
        let response = set_quiet_hours(&app, 1805, windows.clone()).await;
        assert_eq!(response.status(), 400, "{windows}");
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{windows}: {message}");
    }
}

/// A push gateway double that accepts everything.
async fn push_gateway() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "messageId": "m" })))
        .mount(&server)
        .await;
    server
}

/// The users the gateway was asked to push to, one entry per request.
async fn pushed_to(server: &MockServer) -> Vec<i64> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.body_json::<Value>().unwrap()["userId"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn twenty_pushes_in_a_minute_with_a_cap_of_five_an_hour_send_five_and_defer_or_skip_the_rest()
{
    let gateway = push_gateway().await;
    let path = routing_file(|t| {
        let t = t.replace(
            "event_type = \"ORDER_CANCELLED\"\nchannels = [\"EMAIL\", \"IN_APP\"]",
            "event_type = \"ORDER_CANCELLED\"\nchannels = [\"PUSH\"]",
        );
        let t = t.replace(
            "event_type = \"PAYMENT_FAILED\"\nchannels = [\"EMAIL\", \"IN_APP\", \"SLACK\"]",
            "event_type = \"PAYMENT_FAILED\"\nchannels = [\"PUSH\"]",
        );
        let t = on_route(t, "ORDER_CANCELLED", r#"when_capped = "skip""#);
        format!("{t}\n[[frequency_cap]]\nchannel = \"PUSH\"\nlimit = 5\nper_minutes = 60\n")
    });
    let url = gateway.uri();
    let app = spawn_app_with(move |s| {
        s.ingest.routing_file = path;
        s.channels.push_gateway_url = Some(format!("{url}/push").parse().unwrap());
        s.dispatch.rate_limits.clear();
    })
    .await;

    let shipped = |user: i64, i: usize| {
        json!({ "userId": user, "eventType": "ORDER_SHIPPED", "channels": ["PUSH"],
                "data": { "orderId": format!("o-{user}-{i}") } })
    };
    let cancelled = |user: i64, i: usize| {
        json!({ "userId": user, "eventType": "ORDER_CANCELLED", "channels": ["PUSH"],
                "data": { "orderId": format!("o-{user}-{i}") } })
    };
    let mut deferred_user = Vec::new();
    let mut skipped_user = Vec::new();
    let mut other_user = Vec::new();
    for i in 0..20 {
        deferred_user.push(notify(&app, shipped(1810, i)).await);
        skipped_user.push(notify(&app, cancelled(1811, i)).await);
    }
    for i in 0..3 {
        other_user.push(notify(&app, shipped(1812, i)).await);
    }
    let ids = |list: &[Value]| -> Vec<String> {
        list.iter()
            .map(|n| n["notificationId"].as_str().unwrap().to_owned())
            .collect()
    };
    let statuses = |ids: Vec<String>| {
        let db = app.db.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>, Option<String>, DateTime<Utc>)>(
                "SELECT status, hold_reason, skip_reason, next_attempt_at FROM deliveries \
                 WHERE notification_id = ANY($1::uuid[]) AND channel = 'PUSH'",
            )
            .bind(&ids)
            .fetch_all(&db)
            .await
            .unwrap()
        }
    };
    wait_until(60, "every push is sent, deferred or skipped", || async {
        let all = [ids(&deferred_user), ids(&skipped_user), ids(&other_user)].concat();
        statuses(all).await.iter().all(|(status, hold, _, _)| {
            status == "SUCCESS"
                || status == "SKIPPED"
                || (status == "PENDING" && hold.as_deref() == Some("frequency_capped"))
        })
    })
    .await;

    let deferred = statuses(ids(&deferred_user)).await;
    let sent = deferred.iter().filter(|r| r.0 == "SUCCESS").count();
    let held: Vec<_> = deferred.iter().filter(|r| r.0 == "PENDING").collect();
    assert_eq!((sent, held.len()), (5, 15), "{deferred:?}");
    // Deferred to when the hour since the first send has passed.
    for (_, _, _, due) in &held {
        let wait = *due - Utc::now();
        assert!(
            wait > Span::minutes(55) && wait <= Span::minutes(61),
            "due in {wait}"
        );
    }
    let skipped = statuses(ids(&skipped_user)).await;
    assert_eq!(skipped.iter().filter(|r| r.0 == "SUCCESS").count(), 5);
    let capped: Vec<_> = skipped.iter().filter(|r| r.0 == "SKIPPED").collect();
    assert_eq!(capped.len(), 15, "{skipped:?}");
    assert!(
        capped
            .iter()
            .all(|r| r.2.as_deref() == Some("frequency_capped"))
    );
    // Another user is not affected.
    wait_until(10, "the other user's pushes are sent", || async {
        statuses(ids(&other_user))
            .await
            .iter()
            .all(|r| r.0 == "SUCCESS")
    })
    .await;
    // A critical event type is never capped.
    let critical = notify(
        &app,
        json!({ "userId": 1810, "eventType": "PAYMENT_FAILED", "channels": ["PUSH"],
                "data": { "amount": 1000, "currency": "KRW", "reason": "card declined" } }),
    )
    .await;
    wait_for_status(
        &app,
        critical["notificationId"].as_str().unwrap(),
        "SUCCESS",
    )
    .await;

    let pushes = pushed_to(&gateway).await;
    let count = |user: i64| pushes.iter().filter(|u| **u == user).count();
    assert_eq!(
        (count(1810), count(1811), count(1812)),
        (6, 5, 3),
        "{pushes:?}"
    );
}

#[tokio::test]
async fn digest_members_held_before_the_routing_stopped_digesting_their_type_still_go_out() {
    // An instance that digests ORDER_SHIPPED takes the events in and holds them.
    let path = routing_file(|t| on_route(t, "ORDER_SHIPPED", "digest = { window_minutes = 10 }"));
    let front = spawn_app_as(&[Role::Api, Role::Ingest], move |s| {
        s.ingest.routing_file = path
    })
    .await;
    let address = format!("left-{}@example.com", Uuid::new_v4());
    set_contact(&front, 1830, &address, "Asia/Seoul").await;
    let mut ids = Vec::new();
    for i in 1..=3 {
        let mut event = envelope(
            "ORDER_SHIPPED",
            1830,
            json!({ "orderId": format!("L-{i}"), "carrier": "CJ", "trackingNumber": format!("T{i}") }),
        );
        event["recipient"] = json!({ "locale": "en" });
        front
            .publish("fluxpay.order.events", "1830", event.to_string().as_bytes())
            .await;
        ids.push(notification_of(&front, event["eventId"].as_str().unwrap()).await);
    }
    for id in &ids {
        assert!(
            deliveries(&front, id)
                .await
                .iter()
                .filter(|d| d.0 != "PUSH")
                .all(|d| d.3.as_deref() == Some("digest") && d.4.is_some()),
            "{:?}",
            deliveries(&front, id).await
        );
    }

    // The dispatcher runs with a routing file that digests nothing (the one shipped), so
    // its claims do not look for digests: its sweeps still find these, once due.
    let mut settings = front.settings.clone();
    settings.ingest.routing_file =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/routing.toml");
    let _dispatcher = spawn_app_on(settings, &[Role::Dispatch]).await;
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    make_due(&front, &refs).await;
    for id in &ids {
        wait_for_status(&front, id, "SUCCESS").await;
    }
    let emails = emails_once_arrived(&address).await;
    assert_eq!(emails.len(), 1, "one digest email: {emails:?}");
}

#[tokio::test]
async fn seven_orders_shipped_in_a_digest_window_make_one_email_listing_seven() {
    let path = routing_file(|t| on_route(t, "ORDER_SHIPPED", "digest = { window_minutes = 10 }"));
    let app = spawn_app_with(move |s| s.ingest.routing_file = path).await;
    let address = format!("digest-{}@example.com", Uuid::new_v4());
    set_contact(&app, 1820, &address, "Asia/Seoul").await;

    let mut notifications = Vec::new();
    for i in 1..=7 {
        let event = envelope(
            "ORDER_SHIPPED",
            1820,
            json!({ "orderId": format!("D-{i}"), "carrier": "CJ", "trackingNumber": format!("T{i}") }),
        );
        let mut event = event;
        event["recipient"] = json!({ "locale": "en" });
        app.publish("fluxpay.order.events", "1820", event.to_string().as_bytes())
            .await;
        notifications.push(event["eventId"].as_str().unwrap().to_owned());
    }
    let mut ids = Vec::new();
    for event_id in &notifications {
        ids.push(notification_of(&app, event_id).await);
    }

    // Every event is stored and held for the same digest, due when its window closes.
    let mut digests = std::collections::BTreeSet::new();
    let mut dues = std::collections::BTreeSet::new();
    for id in &ids {
        // PUSH has no gateway here: SKIPPED, and in no digest.
        for (channel, status, due, hold, digest) in deliveries(&app, id).await {
            if channel == "PUSH" {
                assert_eq!((status.as_str(), digest), ("SKIPPED", None));
                continue;
            }
            assert_eq!(status, "PENDING", "{channel}");
            assert_eq!(hold.as_deref(), Some("digest"), "{channel}");
            digests.insert(digest.expect("a member carries its digest"));
            dues.insert(due);
        }
    }
    assert_eq!(digests.len(), 1, "one digest");
    assert_eq!(dues.len(), 1, "one due time");
    let due = *dues.first().unwrap();
    let wait = due - Utc::now();
    assert!(
        wait > Span::minutes(9) && wait <= Span::minutes(10),
        "{wait}"
    );

    // The window closes; an in-app subscriber of the user listens.
    let client = redis::Client::open(std::env::var("HERALD_REDIS_URL").unwrap()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}inapp:user:1820", app.settings.redis.key_prefix))
        .await
        .unwrap();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    // Six are due; the seventh is due later (as if its quiet hours had moved it): one due
    // member makes the digest due, and all seven go out in its one message.
    make_due(&app, &refs[..6]).await;
    for id in &ids {
        wait_for_status(&app, id, "SUCCESS").await;
    }
    emails_once_arrived(&address).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let emails = emails_to(&address).await;
    assert_eq!(emails.len(), 1, "exactly one email");
    assert_eq!(emails[0]["subject"], "7 of your orders have shipped");
    let text = emails[0]["text"].as_str().unwrap();
    for i in 1..=7 {
        assert!(text.contains(&format!("Order D-{i}")), "{text}");
    }
    // One in-app message too, listing them; the inbox keeps each member, with the digest.
    let mut received = Vec::new();
    let mut messages = pubsub.on_message();
    while let Ok(Some(message)) = tokio::time::timeout(
        Duration::from_secs(2),
        futures_util::StreamExt::next(&mut messages),
    )
    .await
    {
        received.push(
            serde_json::from_str::<Value>(&message.get_payload::<String>().unwrap()).unwrap(),
        );
    }
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["title"], "7 orders shipped");
    for i in 1..=7 {
        assert!(
            received[0]["body"]
                .as_str()
                .unwrap()
                .contains(&format!("D-{i}"))
        );
    }
    drop(messages);

    // An event after the close opens the next digest, and a digest of one reads like the
    // event's own message.
    let mut late = envelope("ORDER_SHIPPED", 1820, json!({ "orderId": "D-8" }));
    late["recipient"] = json!({ "locale": "en" });
    app.publish("fluxpay.order.events", "1820", late.to_string().as_bytes())
        .await;
    let late_id = notification_of(&app, late["eventId"].as_str().unwrap()).await;
    let rows = deliveries(&app, &late_id).await;
    let sent: Vec<_> = rows.iter().filter(|r| r.1 != "SKIPPED").collect();
    assert_eq!(sent.len(), 2, "{rows:?}");
    assert!(
        sent.iter()
            .all(|r| r.4.is_some_and(|d| !digests.contains(&d))),
        "{rows:?}"
    );
    make_due(&app, &[&late_id]).await;
    wait_for_status(&app, &late_id, "SUCCESS").await;
    wait_until(30, "the digest of one arrives", || async {
        emails_to(&address).await.len() == 2
    })
    .await;
    let emails = emails_to(&address).await;
    assert!(
        emails
            .iter()
            .any(|e| e["subject"] == "Your order D-8 has shipped"),
        "{emails:?}"
    );
}
