//! Outbound HTTP (Slack, gateways): redirects are not followed, and a provider's answer is
//! read only up to a bound.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

use crate::helpers::{TestApp, spawn_app_with, wait_for_delivery};

async fn notify(app: &TestApp, request: serde_json::Value) -> Uuid {
    let response = app.post_json("/api/v1/notifications", &request, &[]).await;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    body["deliveries"][0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn error_of(app: &TestApp, delivery: Uuid) -> (String, String) {
    sqlx::query_as("SELECT error_class, last_error FROM deliveries WHERE id = $1")
        .bind(delivery)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn webhooks_and_gateways_that_redirect_fail_for_good_and_the_redirect_is_not_followed() {
    let server = MockServer::start().await;
    for (from, status) in [("/slack", 302), ("/sms", 307)] {
        Mock::given(method("POST"))
            .and(path(from))
            .respond_with(
                ResponseTemplate::new(status)
                    .insert_header("location", format!("{}/elsewhere", server.uri())),
            )
            .mount(&server)
            .await;
    }
    Mock::given(path("/elsewhere"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let (slack, sms) = (
        format!("{}/slack", server.uri()),
        format!("{}/sms", server.uri()),
    );
    let app = spawn_app_with(move |s| {
        s.channels.slack_webhook_url = Some(slack.into());
        s.channels.sms_gateway_url = Some(sms.parse().unwrap());
    })
    .await;

    let to_slack = notify(
        &app,
        json!({ "eventType": "SYSTEM_INCIDENT", "data": { "title": "t", "severity": "critical" } }),
    )
    .await;
    let to_sms = notify(
        &app,
        json!({ "recipient": { "phone": "+821012345678" }, "channels": ["SMS"], "subject": "s", "body": "b" }),
    )
    .await;

    for delivery in [to_slack, to_sms] {
        wait_for_delivery(&app, delivery, "FAILED", 20).await;
        let (class, message) = error_of(&app, delivery).await;
        assert_eq!(class, "http_redirect", "{message}");
    }
    let followed = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/elsewhere")
        .count();
    assert_eq!(followed, 0, "a redirect was followed");
}

#[tokio::test]
async fn a_gateway_answer_that_never_ends_is_not_read_to_its_end() {
    // A gateway that answers 503 with a body announced as 1 GiB and streams it slowly.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
                            content-length: 1073741824\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                // About 6 MB/s: reading it all would take minutes (and that much memory).
                let chunk = vec![b'x'; 64 * 1024];
                while socket.write_all(&chunk).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    });
    let url = format!("http://{address}/sms");
    let app = spawn_app_with(move |s| {
        s.channels.sms_gateway_url = Some(url.parse().unwrap());
        s.dispatch.max_retries = 0;
        s.dispatch.send_timeout = Duration::from_secs(8);
    })
    .await;

    let delivery = notify(
        &app,
        json!({ "recipient": { "phone": "+821012345678" }, "channels": ["SMS"], "subject": "s", "body": "b" }),
    )
    .await;

    wait_for_delivery(&app, delivery, "FAILED", 20).await;
    let (class, message) = error_of(&app, delivery).await;
    assert_eq!(class, "retries_exhausted", "{message}");
    assert!(message.starts_with("HTTP 503"), "{message}");
    assert!(
        message.contains("xxxx"),
        "the start of the body is kept: {message}"
    );
    // Reading the whole body would have taken until the send timeout.
    let latency: i32 =
        sqlx::query_scalar("SELECT latency_ms FROM delivery_attempt_log WHERE delivery_id = $1")
            .bind(delivery)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(latency < 3_000, "the send took {latency} ms");
}
