//! The user import's bounds: its count cap on a streamed JSON array, and how many imports
//! an instance parses at once. Its reports are checked in broadcasts.rs.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::helpers::{TestApp, spawn_app_with};

async fn import(app: &TestApp, body: String, content_type: &str) -> reqwest::Response {
    app.http
        .post(format!("{}/api/v1/users:import", app.address))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_json_array_longer_than_the_cap_is_refused_and_nothing_is_stored() {
    let app = spawn_app_with(|_| {}).await;
    let body = format!(
        r#"[{{"userId": 1, "email": "a@example.com"}},{}0]"#,
        "0,".repeat(200_000)
    );

    let response = import(&app, body, "application/json").await;

    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 200000 users"), "{message}");
    assert_eq!(app.get("/api/v1/users/1/contact").await.status(), 404);
}

#[tokio::test]
async fn imports_beyond_the_concurrency_bound_get_503_with_retry_after() {
    let app = spawn_app_with(|s| s.limits.concurrent_imports = 1).await;
    // A first import whose body is still arriving holds the only permit.
    let (lines, body) = mpsc::channel::<Result<String, std::io::Error>>(4);
    let body = futures_util::stream::unfold(body, |mut body| async move {
        body.recv().await.map(|line| (line, body))
    });
    let slow = app
        .http
        .post(format!("{}/api/v1/users:import", app.address))
        .header("content-type", "application/x-ndjson")
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let slow = tokio::spawn(slow);
    lines
        .send(Ok(
            r#"{"userId": 1, "email": "a@example.com"}"#.to_owned() + "\n"
        ))
        .await
        .unwrap();

    let other = || import(&app, r#"{"userId": 2}"#.to_owned(), "application/x-ndjson");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let response = other().await;
        if response.status() == 503 {
            break response;
        }
        // Only before the first import's handler has started.
        assert_eq!(response.status(), 200);
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let retry_after = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(retry_after.parse::<u64>().unwrap() > 0, "{retry_after}");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "overloaded", "{error}");

    lines
        .send(Ok(r#"{"userId": 3, "email": "c@example.com"}"#.to_owned()))
        .await
        .unwrap();
    drop(lines);
    let done = slow.await.unwrap().unwrap();
    assert_eq!(done.status(), 200);
    let report: Value = done.json().await.unwrap();
    assert_eq!(report["imported"], 2, "{report}");
    assert_eq!(
        other().await.status(),
        200,
        "the permit is given back when an import ends"
    );
}
