//! Templates at run time (issue 13): versions stored through the API overlay the files,
//! reach every instance within 5 s, are refused when they would not render, roll back, and
//! preview without sending. Who may call them is in access.rs (driven by the document).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    TestApp, maildev_emails, spawn_app, spawn_app_as, spawn_app_on, spawn_app_with, wait_until,
};
use herald::roles::Role;

const SUBJECT: &str = "/api/v1/templates/PAYMENT_COMPLETED/en/email_subject";

async fn put_source(app: &TestApp, path: &str, source: &str) -> reqwest::Response {
    app.put_json(path, &json!({ "source": source })).await
}

async fn activate(app: &TestApp, path: &str, version: i32) -> reqwest::Response {
    app.post_json(
        &format!("{path}/versions/{version}/activate"),
        &json!({}),
        &[],
    )
    .await
}

/// Sends a PAYMENT_COMPLETED notification in English through the intake to a fresh address
/// and returns the subject of the email that reaches MailDev.
async fn emailed_subject(app: &TestApp) -> String {
    let address = format!("t{}@example.com", Uuid::new_v4().simple());
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({
                "eventType": "PAYMENT_COMPLETED",
                "channels": ["EMAIL"],
                "recipient": { "email": address, "locale": "en" },
                "data": { "orderId": "o-77", "amount": 12000, "currency": "KRW" }
            }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let mut subject = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while subject.is_none() && Instant::now() < deadline {
        subject = maildev_emails()
            .await
            .iter()
            .find(|e| e["to"][0]["address"] == address.as_str())
            .map(|e| e["subject"].as_str().unwrap_or_default().to_owned());
        if subject.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    subject.unwrap_or_else(|| panic!("no email reached {address} within 30 s"))
}

async fn preview_subject(app: &TestApp) -> String {
    let response = app
        .post_json(
            "/api/v1/templates/PAYMENT_COMPLETED/preview",
            &json!({
                "locale": "en",
                "channels": ["EMAIL"],
                "data": { "orderId": "o-77", "amount": 12000, "currency": "KRW" }
            }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["channels"]["EMAIL"]["subject"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_template_edit_on_one_instance_changes_the_next_email_sent_by_another_within_5_s() {
    let editor = spawn_app_as(&[Role::Api], |_| {}).await;
    let sender = spawn_app_on(editor.settings.clone(), &[Role::Api, Role::Dispatch]).await;
    let file_subject = emailed_subject(&sender).await;
    assert_eq!(file_subject, "Payment complete for order o-77");

    let marker = Uuid::new_v4().simple().to_string();
    let source = format!("Paid {{{{ data.amount | number }}}} {{{{ data.currency }}}} ({marker})");
    let stored = Instant::now();
    let response = put_source(&editor, SUBJECT, &source).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let expected = format!("Paid 12,000 KRW ({marker})");
    wait_until(5, "the second instance renders the new version", || async {
        preview_subject(&sender).await == expected
    })
    .await;
    let delay = stored.elapsed();
    println!("the new version reached the second instance after {delay:?}");

    assert_eq!(emailed_subject(&sender).await, expected);
    assert!(delay < Duration::from_secs(5), "{delay:?}");
}

#[tokio::test]
async fn a_broken_edit_is_refused_with_422_naming_the_template_and_changes_nothing() {
    let app = spawn_app().await;
    let name = "en/PAYMENT_COMPLETED/email_subject.txt";

    for (source, expected) in [
        ("Paid {{ data.tip }}", "data.tip"),
        ("Paid {{ data.amount ", name),
        // orderId is optional: the minimal payload lacks it.
        ("Order {{ data.orderId }}", "data.orderId"),
        // A template must not read the process environment (the admin token lives there).
        (
            r#"{{ get_env(name="HERALD_ADMIN_TOKEN") }}"#,
            "get_env is not available",
        ),
        // A stored template cannot recurse, reach other templates or loop without bound.
        (
            r#"{% include "en/PAYMENT_COMPLETED/email_subject.txt" %}"#,
            "include is not allowed",
        ),
        (
            "{% macro again() %}{{ self::again() }}{% endmacro %}",
            "may not define macros",
        ),
        (
            "{% for i in range(end=100000000) %}x{% endfor %}",
            "at most 1000 items",
        ),
        ("{% set d = data %}{{ d.tip }}", "data as a whole"),
    ] {
        let response = put_source(&app, SUBJECT, source).await;
        assert_eq!(response.status(), 422, "{source}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "template_invalid", "{source}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(name), "{source}: {message}");
        assert!(message.contains(expected), "{source}: {message}");
    }
    let not_json = put_source(
        &app,
        "/api/v1/templates/PAYMENT_FAILED/en/slack",
        "Payment failed",
    )
    .await;
    assert_eq!(not_json.status(), 422);
    let body: Value = not_json.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("en/PAYMENT_FAILED/slack.json") && message.contains("JSON"),
        "{message}"
    );

    let listing: Value = app.get(SUBJECT).await.json().await.unwrap();
    assert_eq!(listing["activeVersion"], 0);
    assert_eq!(
        listing["versions"].as_array().unwrap().len(),
        1,
        "{listing}"
    );
    assert_eq!(
        preview_subject(&app).await,
        "Payment complete for order o-77"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM template_versions")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn unknown_templates_are_404_and_an_oversized_source_is_413() {
    let app = spawn_app().await;

    for path in [
        "/api/v1/templates/NOT_ROUTED/en/email_subject",
        "/api/v1/templates/PAYMENT_COMPLETED/fr/email_subject",
        "/api/v1/templates/PAYMENT_COMPLETED/en/email_subject.txt",
    ] {
        let response = put_source(&app, path, "x").await;
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(app.get(path).await.status(), 404, "{path}");
    }
    let huge = "x".repeat(64 * 1024 + 1);
    assert_eq!(
        put_source(&app, SUBJECT, &huge).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(activate(&app, SUBJECT, 9).await.status(), 404);
    assert_eq!(
        app.post_json(&format!("{SUBJECT}/versions/x/activate"), &json!({}), &[])
            .await
            .status(),
        400
    );
}

#[tokio::test]
async fn activating_an_earlier_version_or_the_file_changes_the_next_email() {
    let app = spawn_app().await;
    for text in ["first", "second"] {
        let response = put_source(&app, SUBJECT, &format!("{text} {{{{ data.currency }}}}")).await;
        assert_eq!(response.status(), 201);
    }
    assert_eq!(emailed_subject(&app).await, "second KRW");

    let response = activate(&app, SUBJECT, 1).await;
    assert_eq!(response.status(), 200);
    let listing: Value = response.json().await.unwrap();
    assert_eq!(listing["activeVersion"], 1);
    assert_eq!(emailed_subject(&app).await, "first KRW");

    assert_eq!(activate(&app, SUBJECT, 0).await.status(), 200);
    assert_eq!(
        emailed_subject(&app).await,
        "Payment complete for order o-77"
    );

    assert_eq!(activate(&app, SUBJECT, 2).await.status(), 200);
    assert_eq!(emailed_subject(&app).await, "second KRW");
}

#[tokio::test]
async fn the_versions_are_listed_newest_first_with_who_stored_and_activated_them() {
    let app = spawn_app().await;
    let editor = app
        .api_key("template editor", &["templates:read", "templates:write"])
        .await;
    for text in ["one", "two"] {
        let response = app
            .http
            .put(format!("{}{SUBJECT}", app.address))
            .bearer_auth(&editor)
            .json(&json!({ "source": text }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let stored: Value = response.json().await.unwrap();
        assert_eq!(stored["createdBy"], "template editor");
        assert_eq!(stored["active"], true);
    }
    assert_eq!(activate(&app, SUBJECT, 1).await.status(), 200);

    let listing: Value = app.get(SUBJECT).await.json().await.unwrap();

    assert_eq!(
        listing["template"],
        "en/PAYMENT_COMPLETED/email_subject.txt"
    );
    assert_eq!(listing["activeVersion"], 1);
    assert_eq!(listing["activatedBy"], "admin");
    let versions = listing["versions"].as_array().unwrap();
    let numbers: Vec<i64> = versions
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [2, 1, 0]);
    assert_eq!(versions[0]["source"], "two");
    assert_eq!(versions[0]["createdBy"], "template editor");
    assert!(versions[0]["createdAt"].is_string());
    assert_eq!(versions[0]["active"], false);
    assert_eq!(versions[1]["active"], true);
    assert_eq!(versions[2]["origin"], "file");
    assert_eq!(
        versions[2]["source"],
        std::fs::read_to_string("templates/en/PAYMENT_COMPLETED/email_subject.txt").unwrap()
    );
    let activations: Vec<(i64, &str)> = listing["activations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["version"].as_i64().unwrap(),
                a["activatedBy"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        activations,
        [(1, "admin"), (2, "template editor"), (1, "template editor")]
    );
}

#[tokio::test]
async fn a_preview_renders_every_routed_channel_without_sending_anything() {
    let app = spawn_app().await;

    let response = app
        .post_json(
            "/api/v1/templates/PAYMENT_FAILED/preview",
            &json!({
                "locale": "ko",
                "data": { "orderId": "o-5", "amount": 12000, "currency": "KRW", "reason": "card declined" }
            }),
            &[],
        )
        .await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["locale"], "ko");
    let channels = body["channels"].as_object().unwrap();
    let mut names: Vec<&str> = channels.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["EMAIL", "IN_APP", "SLACK"]);
    assert!(
        body["channels"]["EMAIL"]["text"]
            .as_str()
            .unwrap()
            .contains("12,000원")
    );
    assert!(
        body["channels"]["EMAIL"]["html"]
            .as_str()
            .unwrap()
            .contains("<html")
    );
    assert!(body["channels"]["SLACK"]["blocks"].is_array());
    assert!(
        !body["channels"]["IN_APP"]["title"]
            .as_str()
            .unwrap()
            .is_empty()
    );

    let sms: Value = app
        .post_json(
            "/api/v1/templates/PAYMENT_FAILED/preview",
            &json!({
                "locale": "en", "channels": ["SMS"],
                "data": { "orderId": "o-5", "amount": 12000, "currency": "KRW", "reason": "x" }
            }),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(sms["channels"]["SMS"]["body"].is_string(), "{sms}");

    for table in ["notifications", "deliveries", "outbox"] {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(rows, 0, "a preview wrote to {table}");
    }
}

#[tokio::test]
async fn a_preview_with_data_breaking_the_schema_is_400_naming_the_field() {
    let app = spawn_app().await;

    let response = app
        .post_json(
            "/api/v1/templates/PAYMENT_COMPLETED/preview",
            &json!({ "locale": "en", "data": { "amount": 12000 } }),
            &[],
        )
        .await;

    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("data.currency"), "{message}");
    assert_eq!(body["error"]["code"], "schema_violation");
    assert!(
        body["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["path"] == "data.currency"),
        "{body}"
    );
}

#[tokio::test]
async fn a_template_failing_at_send_time_fails_the_delivery_naming_the_template_and_field() {
    let dir = std::env::temp_dir().join(format!("herald-templates-{}", Uuid::new_v4()));
    copy_dir(std::path::Path::new("templates"), &dir);
    std::fs::write(
        dir.join("en/ORDER_SHIPPED/in_app_title.txt"),
        "Shipped {{ data.deliveryWindow }}",
    )
    .unwrap();
    let app = spawn_app_with(|s| s.templates.dir = dir.clone()).await;

    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({
                "userId": 5, "eventType": "ORDER_SHIPPED", "channels": ["IN_APP"],
                "recipient": { "email": "shipped@example.com", "locale": "en" },
                "data": { "orderId": "o-1" }
            }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let last_error = loop {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT status, last_error FROM deliveries")
                .fetch_optional(&app.db)
                .await
                .unwrap();
        match row {
            Some((status, error)) if status == "FAILED" => break error,
            _ if Instant::now() > deadline => panic!("the delivery did not fail within 30 s"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };

    let error = last_error.expect("a failed delivery says why");
    assert!(
        error.contains("en/ORDER_SHIPPED/in_app_title.txt"),
        "{error}"
    );
    assert!(error.contains("data.deliveryWindow"), "{error}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
