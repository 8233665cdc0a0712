use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{drop_database, spawn_app, spawn_app_with, wait_until};

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
#[ignore = "depends on the broker's join delay: on a freshly started Tansu every group is \
            assigned within 100 ms, so no group is ever without partitions for the 1 s bound \
            (seen 2026-12-02; it passed against a long-running broker). The watchdog's bound, \
            recreation and readiness state are covered by the unit tests in kafka::watchdog."]
async fn readiness_names_a_group_without_partitions_beyond_the_bound_and_its_consumer_is_recreated()
{
    // A new member joins the test broker's group after about 3 s, so with a bound of 1 s
    // every group is without partitions beyond it at first. (Whether the recreated member
    // then gets partitions is up to the broker: Tansu 0.6.0 keeps a forming group whose
    // leader left without a leader for good, so this test does not wait for it.)
    let app = spawn_app_with(|settings| {
        settings.kafka.consumer.assignment_timeout = Duration::from_secs(1);
    })
    .await;
    let prefix = app.settings.kafka.topic_prefix.clone();
    let payment = format!("{prefix}notif-payment");

    let deadline = Instant::now() + Duration::from_secs(30);
    let stuck: Value = loop {
        let response = app.get("/health/ready").await;
        if response.status() == 503 {
            let body: Value = response.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap_or_default();
            if message.contains(&format!("{payment}: no assignment for")) {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "readiness never named a stuck group"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stuck["status"], "unavailable");
    assert_eq!(stuck["error"]["code"], "not_ready");
    assert_eq!(stuck["checks"]["kafka"]["status"], "up", "{stuck}");
    let consumer = &stuck["consumers"][&payment];
    assert_eq!(consumer["state"], "stuck", "{stuck}");
    assert_eq!(
        consumer["assignedPartitions"],
        serde_json::json!([]),
        "{stuck}"
    );
    assert!(consumer["unassignedForSecs"].as_u64() >= Some(1), "{stuck}");

    wait_until(30, "the payment consumer is recreated", || async {
        let body: Value = app.get("/health/ready").await.json().await.unwrap();
        body["consumers"][&payment]["recreations"].as_u64() >= Some(1)
    })
    .await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let series = |name: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with(&format!("{name}{{group=\"{payment}\"}}")))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert!(
        series("herald_consumer_recreations_total") >= Some(1.0),
        "{metrics}"
    );
    assert!(
        series("herald_consumer_seconds_since_assignment") >= Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn readiness_reports_every_consumer_group_with_its_partitions_once_they_are_assigned() {
    let app = spawn_app().await;
    let prefix = app.settings.kafka.topic_prefix.clone();
    let groups = [
        ("notif-payment", 6),
        ("notif-subscription", 3),
        ("notif-order", 6),
        ("notif-readmodel", 6),
        ("notif-dlq", 4),
    ];

    wait_until(30, "every group is assigned", || async {
        let body: Value = app.get("/health/ready").await.json().await.unwrap();
        groups
            .iter()
            .all(|(group, _)| body["consumers"][format!("{prefix}{group}")]["state"] == "assigned")
    })
    .await;
    let response = app.get("/health/ready").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    for (group, partitions) in groups {
        let consumer = &body["consumers"][format!("{prefix}{group}")];
        assert_eq!(
            consumer["assignedPartitions"].as_array().map(Vec::len),
            Some(partitions),
            "{group}: {body}"
        );
        assert_eq!(consumer["assignmentLost"], false, "{body}");
        assert_eq!(consumer["recreations"], 0, "{body}");
        assert!(consumer["lastRebalanceAt"].is_string(), "{body}");
        assert!(consumer.get("problem").is_none(), "{body}");
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let assigned =
        format!("herald_consumer_assigned_partitions{{group=\"{prefix}notif-order\"}} 6");
    assert!(metrics.contains(&assigned), "{metrics}");
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
