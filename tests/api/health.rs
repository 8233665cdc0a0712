use serde_json::Value;

use crate::helpers::{drop_database, spawn_app, spawn_app_with};

#[tokio::test]
async fn liveness_answers_200_with_the_roles_of_the_instance() {
    let app = spawn_app().await;

    let response = app.get("/health/live").await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "live");
    assert_eq!(
        body["roles"],
        serde_json::json!(["api", "ingest", "dispatch", "relay", "projector", "dlq"])
    );
}

#[tokio::test]
async fn readiness_is_200_when_postgres_redis_and_kafka_are_up() {
    let app = spawn_app().await;

    let response = app.get("/health/ready").await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    for dependency in ["postgres", "redis", "kafka"] {
        assert_eq!(body["checks"][dependency]["status"], "up", "{body}");
    }
}

#[tokio::test]
async fn readiness_is_503_naming_postgres_once_the_database_is_gone() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health/ready").await.status(), 200);

    drop_database(&app.settings, &app.db_name).await;
    let response = app.get("/health/ready").await;

    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["postgres"]["status"], "down", "{body}");
    assert_eq!(body["checks"]["redis"]["status"], "up", "{body}");
    assert_eq!(body["error"]["code"], "not_ready");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("postgres"),
        "{body}"
    );
}

#[tokio::test]
async fn readiness_is_503_naming_redis_when_redis_does_not_answer() {
    let app = spawn_app_with(|settings| {
        settings.redis.url = "redis://127.0.0.1:1".to_owned().into();
    })
    .await;

    let response = app.get("/health/ready").await;

    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"]["redis"]["status"], "down", "{body}");
    assert_eq!(body["checks"]["postgres"]["status"], "up", "{body}");
    assert_eq!(body["error"]["message"], "not ready: redis down");
}

#[tokio::test]
async fn readiness_is_503_naming_kafka_when_no_broker_answers() {
    let app = spawn_app_with(|settings| settings.kafka.brokers = "127.0.0.1:1".to_owned()).await;

    let response = app.get("/health/ready").await;

    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"]["kafka"]["status"], "down", "{body}");
    assert_eq!(body["error"]["message"], "not ready: kafka down");
}

#[tokio::test]
async fn an_unknown_route_gives_404_with_the_json_error_body() {
    let app = spawn_app().await;

    let response = app.get("/api/v1/no-such-thing").await;

    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"].is_string());
}
