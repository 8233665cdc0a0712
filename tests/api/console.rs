//! The operator console at /console, in a real browser (issue 17): Debian's Chromium driven
//! by playwright-core (tests/browser/console.mjs), with every host but this machine
//! unreachable.

use std::{path::Path, process::Command, time::Duration};

use crate::helpers::{envelope, slack_mock, slack_url, spawn_app_with, wait_until};
use serde_json::{Value, json};

#[tokio::test]
async fn the_console_lists_a_dead_letter_retries_it_and_shows_it_retried_in_headless_chromium() {
    let slack = slack_mock(&[(404, Some(1)), (200, None)]).await;
    let url = slack_url(&slack);
    let app = spawn_app_with(move |s| s.channels.slack_webhook_url = Some(url.into())).await;
    let key = app
        .api_key(
            "console",
            &[
                "dlq:admin",
                "broadcasts:read",
                "broadcasts:write",
                "dashboard:read",
                "notifications:read",
            ],
        )
        .await;
    let event = envelope(
        "PAYMENT_FAILED",
        5,
        json!({ "orderId": "o-5", "amount": 1, "currency": "KRW", "reason": "card declined" }),
    );
    app.publish("fluxpay.payment.events", "5", event.to_string().as_bytes())
        .await;
    let letter = || async {
        sqlx::query_as::<_, (uuid::Uuid, uuid::Uuid)>(
            "SELECT id, notification_id FROM dlq_messages WHERE failed_channel = 'SLACK'",
        )
        .fetch_optional(&app.db)
        .await
        .unwrap()
    };
    wait_until(30, "the Slack failure is dead-lettered", || async {
        letter().await.is_some()
    })
    .await;
    let (letter, notification) = letter().await.unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let playwright = root.join(".tools/playwright/node_modules/playwright-core/index.mjs");
    assert!(
        playwright.exists(),
        "playwright-core is not installed: run scripts/stack.sh install"
    );
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&shots).unwrap();
    let mut command = Command::new("node");
    command
        .current_dir(root)
        .env("PLAYWRIGHT_CORE", &playwright)
        .arg("tests/browser/console.mjs")
        .arg(&app.address)
        .arg(&key)
        .arg(letter.to_string())
        .arg(notification.to_string())
        .arg(&shots);
    let output = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("the browser run ends within 180 s")
    .unwrap()
    .expect("node runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{log}");
    assert!(log.contains("the page shows it RETRIED"), "{log}");

    // What the page showed is what happened.
    let status: String = sqlx::query_scalar("SELECT status FROM dlq_messages WHERE id = $1")
        .bind(letter)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(status, "RETRIED");
    let audit: Value = app
        .get(&format!("/api/v1/admin/dlq/{letter}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(audit["actionedBy"], "console", "{audit}");
}

#[tokio::test]
async fn the_console_is_served_from_herald_with_a_policy_that_keeps_it_to_its_own_origin() {
    let app = spawn_app_with(|_| {}).await;
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let response = app
            .anonymous
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert!(
            headers[reqwest::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{path}"
        );
        let policy = headers[reqwest::header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"));
        let body = response.text().await.unwrap();
        assert!(
            !body.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }
    // The page holds no data: the API it calls does, behind the key.
    let anonymous = app
        .anonymous
        .get(format!("{}/api/v1/admin/dlq", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}
