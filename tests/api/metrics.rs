use crate::helpers::spawn_app;

#[tokio::test]
async fn metrics_export_http_request_counts_by_route_in_prometheus_format() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/live").await.status(), 200);

    let response = app.get("/metrics").await;

    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("herald_http_requests_total")
                && l.contains(r#"route="/health/live""#)
                && l.contains(r#"status="200""#)
        })
        .unwrap_or_else(|| panic!("no request counter for /health/live in:\n{text}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{line}");
    assert!(text.contains("herald_http_request_duration_seconds_bucket"));
}

#[tokio::test]
async fn metrics_export_delivery_outcomes_send_latency_queue_depth_and_outbox_lag() {
    let app = spawn_app().await;
    let response = app
        .post_json(
            "/api/v1/notifications",
            &serde_json::json!({ "userId": 3, "channels": ["IN_APP"], "subject": "s", "body": "b" }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202);

    crate::helpers::wait_until(
        20,
        "the in-app delivery succeeds and metrics show it",
        || async {
            let text = app.get("/metrics").await.text().await.unwrap();
            text.lines().any(|l| {
                l.starts_with("herald_deliveries_total")
                    && l.contains(r#"channel="IN_APP""#)
                    && l.contains(r#"outcome="success""#)
            }) && text.contains("herald_send_duration_seconds_bucket")
                && text.contains("herald_delivery_queue_depth")
                && text.contains("herald_outbox_lag_seconds")
        },
    )
    .await;
}

#[tokio::test]
async fn the_queue_depth_counts_due_held_and_processing_deliveries_and_not_the_history() {
    let app = crate::helpers::spawn_front_half(|_| {}).await;
    let send = |body: serde_json::Value| {
        let app = &app;
        async move {
            let response = app.post_json("/api/v1/notifications", &body, &[]).await;
            assert_eq!(response.status(), 202);
        }
    };
    let adhoc = |user: i64| serde_json::json!({ "userId": user, "channels": ["IN_APP"], "subject": "s", "body": "b" });
    for user in 1..=4 {
        send(adhoc(user)).await;
    }
    let mut later = adhoc(5);
    later["scheduledAt"] = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339()
        .into();
    send(later).await;
    // Of the four due ones, one is being sent and one was sent: history, not queue.
    sqlx::query(
        "UPDATE deliveries d SET status = s.status, \
             lease_until = CASE WHEN s.status = 'PROCESSING' THEN now() + interval '1 minute' END \
         FROM notifications n, (VALUES (1, 'PROCESSING'), (2, 'SUCCESS')) AS s(user_id, status) \
         WHERE n.id = d.notification_id AND n.user_id = s.user_id",
    )
    .execute(&app.db)
    .await
    .unwrap();

    let depth = herald::deliveries::queue_depth(&app.db).await.unwrap();

    assert_eq!(
        depth,
        herald::deliveries::QueueDepth {
            pending: 2,
            held: 1,
            processing: 1
        }
    );
}
