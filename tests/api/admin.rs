//! The DLQ admin API: auth, list, retry, retry-all, discard.

use crate::helpers::{
    TestApp, envelope, slack_mock, slack_url, spawn_app_with, wait_for_delivery, wait_until,
};
use serde_json::{Value, json};
use uuid::Uuid;

const TOKEN: &str = "test-admin-token-0123456789";
/// An operator's API key with `dlq:admin`, named alice.
const ALICE: &str = "hrk_a11ce00000000000000000000000000000000000000000000000000000000000";

/// Calls the admin API as alice, claiming to be mallory in the header audit fields used to
/// trust: the audit must name the credential.
async fn admin(app: &TestApp, verb: reqwest::Method, path: &str) -> reqwest::Response {
    sqlx::query(
        "INSERT INTO api_keys (id, name, scopes, key_hash, key_prefix, created_by) \
         VALUES (gen_random_uuid(), 'alice', ARRAY['dlq:admin'], $1, 'hrk_a11ce', 'test') \
         ON CONFLICT (key_hash) DO NOTHING",
    )
    .bind(herald::auth::digest(ALICE).as_slice())
    .execute(&app.db)
    .await
    .unwrap();
    app.http
        .request(verb, format!("{}{path}", app.address))
        .bearer_auth(ALICE)
        .header("X-Operator", "mallory")
        .send()
        .await
        .unwrap()
}

async fn dead_letter(app: &TestApp, id: &str) -> Value {
    admin(
        app,
        reqwest::Method::GET,
        &format!("/api/v1/admin/dlq/{id}"),
    )
    .await
    .json()
    .await
    .unwrap()
}

async fn dead_letters(app: &TestApp, query: &str) -> Vec<Value> {
    let page: Value = admin(
        app,
        reqwest::Method::GET,
        &format!("/api/v1/admin/dlq{query}"),
    )
    .await
    .json()
    .await
    .unwrap();
    page["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn missing_or_wrong_tokens_get_401_and_a_key_without_dlq_admin_gets_403() {
    let app = spawn_app_with(|s| s.admin.token = Some(TOKEN.to_owned().into())).await;
    let url = format!("{}/api/v1/admin/dlq", app.address);
    let analyst = app.api_key("analyst", &["dashboard:read"]).await;

    let none = app.anonymous.get(&url).send().await.unwrap();
    let wrong = app
        .anonymous
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    let narrow = app
        .anonymous
        .get(&url)
        .bearer_auth(&analyst)
        .send()
        .await
        .unwrap();
    let right = app
        .anonymous
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let retry = app
        .anonymous
        .post(format!("{url}/{}/retry", Uuid::new_v4()))
        .send()
        .await
        .unwrap();

    assert_eq!(none.status(), 401);
    assert_eq!(
        none.headers()["www-authenticate"],
        r#"Bearer realm="herald""#
    );
    let body: Value = none.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(wrong.status(), 401);
    assert_eq!(narrow.status(), 403);
    let body: Value = narrow.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(right.status(), 200);
    assert_eq!(retry.status(), 401);
}

#[tokio::test]
async fn a_dead_letter_is_listed_and_its_retry_after_the_fix_sends_only_the_failed_channel() {
    let slack = slack_mock(&[(404, Some(1)), (200, None)]).await;
    let url = slack_url(&slack);
    let app = spawn_app_with(move |s| {
        s.channels.slack_webhook_url = Some(url.into());
        s.admin.token = Some(TOKEN.to_owned().into());
    })
    .await;
    let event = envelope(
        "PAYMENT_FAILED",
        40,
        json!({ "orderId": "o-40", "amount": 1, "currency": "KRW", "reason": "r" }),
    );
    app.publish("fluxpay.payment.events", "40", event.to_string().as_bytes())
        .await;

    wait_until(40, "the dead letter is stored", || async {
        !dead_letters(&app, "").await.is_empty()
    })
    .await;
    let letters = dead_letters(&app, "?domain=payment").await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter["status"], "PENDING");
    assert_eq!(letter["failedChannel"], "SLACK");
    assert_eq!(letter["errorClass"], "http_4xx");
    assert_eq!(letter["headers"]["X-Retry-Count"], "0");
    let delivery: Uuid = letter["deliveryId"].as_str().unwrap().parse().unwrap();
    wait_until(20, "EMAIL and IN_APP are sent", || async {
        let sent: i64 =
            sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'SUCCESS'")
                .fetch_one(&app.db)
                .await
                .unwrap();
        sent == 2
    })
    .await;

    // The webhook is fixed (the mock now answers 200); the operator retries.
    let id = letter["id"].as_str().unwrap();
    let retried = admin(
        &app,
        reqwest::Method::POST,
        &format!("/api/v1/admin/dlq/{id}/retry"),
    )
    .await;
    assert_eq!(retried.status(), 200);
    wait_for_delivery(&app, delivery, "SUCCESS", 20).await;

    let attempts: Vec<(String, i32)> =
        sqlx::query_as("SELECT channel, attempts FROM deliveries ORDER BY channel")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        attempts,
        [
            ("EMAIL".to_owned(), 1),
            ("IN_APP".to_owned(), 1),
            ("SLACK".to_owned(), 2)
        ],
        "only SLACK was sent again"
    );
    let after = dead_letter(&app, id).await;
    assert_eq!(after["status"], "RETRIED");
    assert_eq!(after["retryOutcome"], "SUCCESS");
    assert_eq!(after["actionedBy"], "alice");
    let again = admin(
        &app,
        reqwest::Method::POST,
        &format!("/api/v1/admin/dlq/{id}/retry"),
    )
    .await;
    assert_eq!(
        again.status(),
        409,
        "a delivery that succeeded is not re-sent"
    );
}

#[tokio::test]
async fn discard_hides_a_dead_letter_from_the_default_list_and_retry_all_reports_its_counts() {
    let app = spawn_app_with(|s| s.admin.token = Some(TOKEN.to_owned().into())).await;
    let messages: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| ("1".to_owned(), format!("{{not json {i}").into_bytes()))
        .collect();
    app.publish_all("fluxpay.order.events", &messages).await;
    wait_until(40, "three dead letters are stored", || async {
        dead_letters(&app, "?domain=order").await.len() == 3
    })
    .await;
    let letters = dead_letters(&app, "").await;
    assert!(
        letters
            .iter()
            .all(|l| l["errorClass"] == "decode" && l["deliveryId"].is_null())
    );
    let discarded = letters[0]["id"].as_str().unwrap().to_owned();

    let response = admin(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/v1/admin/dlq/{discarded}"),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "DISCARDED");
    assert_eq!(dead_letters(&app, "").await.len(), 2);
    let audit = dead_letters(&app, "?status=DISCARDED").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["actionedBy"], "alice");

    let report: Value = admin(
        &app,
        reqwest::Method::POST,
        "/api/v1/admin/dlq/retry-all?domain=order",
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        report,
        json!({ "requeued": 0, "reingested": 2, "skipped": 0, "skippedReasons": {}, "failed": 0, "remaining": 0 })
    );
    let retried = dead_letters(&app, "?status=RETRIED").await;
    assert_eq!(retried.len(), 2);
    assert!(
        retried.iter().all(|l| l["retryOutcome"] == "POISON"),
        "{retried:?}"
    );
    let discarded_retry = admin(
        &app,
        reqwest::Method::POST,
        &format!("/api/v1/admin/dlq/{discarded}/retry"),
    )
    .await;
    assert_eq!(discarded_retry.status(), 409);
    let bad = admin(&app, reqwest::Method::GET, "/api/v1/admin/dlq?status=LOST").await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn a_delivery_that_fails_again_after_a_retry_is_pending_again_in_the_list() {
    let slack = slack_mock(&[(404, None)]).await;
    let url = slack_url(&slack);
    let app = spawn_app_with(move |s| {
        s.channels.slack_webhook_url = Some(url.into());
        s.admin.token = Some(TOKEN.to_owned().into());
    })
    .await;
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({ "eventType": "SYSTEM_INCIDENT", "data": { "title": "t", "severity": "minor" } }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202);
    wait_until(40, "the dead letter is stored", || async {
        dead_letters(&app, "?status=PENDING").await.len() == 1
    })
    .await;
    let id = dead_letters(&app, "").await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let retried = admin(
        &app,
        reqwest::Method::POST,
        &format!("/api/v1/admin/dlq/{id}/retry"),
    )
    .await;
    assert_eq!(retried.status(), 200);

    wait_until(
        40,
        "the new failure puts the dead letter back to PENDING",
        || async {
            let letter = dead_letter(&app, &id).await;
            letter["status"] == "PENDING" && letter["actionedBy"].is_null()
        },
    )
    .await;
    assert_eq!(
        dead_letters(&app, "").await.len(),
        1,
        "still one row for the delivery"
    );
    assert_eq!(slack.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn dead_letters_of_three_causes_read_as_three_fingerprints_and_each_filter_finds_its_own() {
    let app = spawn_app_with(|_| {}).await;
    // Three causes, 20 letters each, their messages differing only in ids and numbers.
    let mut messages = Vec::new();
    for i in 0..20 {
        // Not JSON: the column of the error moves with the padding.
        messages.push((
            format!("{i}"),
            format!("{}{{not json", " ".repeat(i)).into_bytes(),
        ));
        let mut unknown = envelope("PAYMENT_REFUNDED_TWICE", 100 + i as i64, json!({}));
        unknown["data"] = json!({ "n": i });
        messages.push((format!("{i}"), unknown.to_string().into_bytes()));
        let mut malformed = envelope("PAYMENT_COMPLETED", 200 + i as i64, json!({}));
        malformed["data"] = json!({ "amount": format!("{i} won"), "currency": "KRW" });
        messages.push((format!("{i}"), malformed.to_string().into_bytes()));
    }
    app.publish_all("fluxpay.payment.events", &messages).await;
    wait_until(60, "60 dead letters are stored", || async {
        dead_letters(&app, "?limit=500").await.len() == 60
    })
    .await;

    let counts: Value = admin(&app, reqwest::Method::GET, "/api/v1/admin/dlq/counts")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(counts["total"], 60, "{counts}");
    let prints = counts["byFingerprint"].as_array().unwrap();
    assert_eq!(prints.len(), 3, "{counts}");
    assert!(prints.iter().all(|p| p["count"] == 20), "{counts}");
    let classes: Vec<&str> = counts["byClass"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["errorClass"].as_str().unwrap())
        .collect();
    assert_eq!(classes.len(), 3, "{counts}");

    // Each fingerprint, class and text finds its own 20.
    for print in prints {
        let fingerprint = print["fingerprint"].as_str().unwrap();
        let query = format!(
            "?limit=500&fingerprint={}",
            url::form_urlencoded::byte_serialize(fingerprint.as_bytes()).collect::<String>()
        );
        let found = dead_letters(&app, &query).await;
        assert_eq!(found.len(), 20, "{fingerprint}");
        assert!(found.iter().all(|l| l["fingerprint"] == fingerprint));
    }
    for class in &classes {
        assert_eq!(
            dead_letters(&app, &format!("?limit=500&errorClass={class}"))
                .await
                .len(),
            20,
            "{class}"
        );
    }
    let by_type = dead_letters(&app, "?limit=500&eventType=PAYMENT_COMPLETED").await;
    assert_eq!(by_type.len(), 20);
    let by_text = dead_letters(&app, "?limit=500&q=payment_refunded_twice").await;
    assert_eq!(by_text.len(), 20, "the text matches in any letter case");
    // A LIKE wildcard in the text is matched literally.
    assert!(dead_letters(&app, "?limit=500&q=%25").await.is_empty());
    // A time window: everything failed in the last hour, nothing before it.
    let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(
        dead_letters(&app, &format!("?limit=500&from={hour_ago}"))
            .await
            .len(),
        60
    );
    assert!(
        dead_letters(&app, &format!("?limit=500&to={hour_ago}"))
            .await
            .is_empty()
    );
    let narrowed: Value = admin(
        &app,
        reqwest::Method::GET,
        "/api/v1/admin/dlq/counts?eventType=PAYMENT_COMPLETED",
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(narrowed["total"], 20, "{narrowed}");
    // The DLQ gauges name the pending letters by class.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("herald_dlq_pending{") && metrics.contains("class=\"schema_violation\""),
        "{metrics}"
    );
    assert!(metrics.contains("herald_dlq_oldest_pending_seconds{"));
    // Bad filters are 400s that say why.
    for query in ["?from=yesterday", "?failedChannel=PIGEON", "?status=LOST"] {
        let response = admin(
            &app,
            reqwest::Method::GET,
            &format!("/api/v1/admin/dlq{query}"),
        )
        .await;
        assert_eq!(response.status(), 400, "{query}");
    }
}
