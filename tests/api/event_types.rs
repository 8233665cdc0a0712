//! The data contract of each event type (issue 13): published, checked at the edge, and
//! enough for every routed message to go out in every locale.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    TestApp, schemas, slack_mock, spawn_app, spawn_app_with, wait_until, with_slack,
};

/// An envelope with exactly `data` (the helpers' `envelope` fills required fields in).
fn event_with(event_type: &str, user: i64, locale: &str, data: Value) -> Value {
    json!({
        "eventId": Uuid::new_v4().to_string(),
        "eventType": event_type,
        "occurredAt": "2026-11-21T09:30:00Z",
        "userId": user,
        "recipient": { "email": format!("contract{user}@example.com"), "locale": locale },
        "data": data,
    })
}

async fn publish(app: &TestApp, topic: &str, event: &Value) {
    let key = event["userId"].to_string();
    app.publish(topic, &key, event.to_string().as_bytes()).await;
}

async fn list(app: &TestApp) -> Vec<Value> {
    let response = app.get("/api/v1/event-types").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn every_routed_event_type_with_only_its_required_fields_is_delivered_on_every_channel_in_every_locale()
 {
    let slack = slack_mock(&[(200, None)]).await;
    let app = spawn_app_with(with_slack(&slack)).await;
    let mut sent = Vec::new();
    let mut user = 600;
    for item in list(&app).await {
        let event_type = item["eventType"].as_str().unwrap();
        if event_type == "ADHOC" {
            continue;
        }
        let minimal = schemas().get(event_type).unwrap().minimal_payload();
        for locale in ["ko", "en"] {
            user += 1;
            let event = event_with(event_type, user, locale, minimal.clone());
            match item["topic"].as_str() {
                Some(topic) => publish(&app, topic, &event).await,
                None => {
                    let response = app
                        .post_json(
                            "/api/v1/notifications",
                            &json!({ "eventType": event_type, "data": minimal, "userId": user }),
                            &[],
                        )
                        .await;
                    assert_eq!(response.status(), 202, "{event_type}");
                    let body: Value = response.json().await.unwrap();
                    sent.push((
                        format!("{event_type} via HTTP"),
                        body["notificationId"].clone(),
                    ));
                    continue;
                }
            }
            sent.push((format!("{event_type} {locale}"), event["eventId"].clone()));
        }
    }
    assert!(sent.len() >= 18, "{} events sent", sent.len());

    for (what, id) in &sent {
        let id = id.as_str().unwrap().to_owned();
        wait_until(60, &format!("every delivery of {what} succeeds"), || {
            let (app, id) = (&app, id.clone());
            async move {
                let statuses: Vec<(String, String, Option<String>)> = sqlx::query_as(
                    "SELECT d.channel, d.status, d.last_error FROM deliveries d \
                     JOIN notifications n ON n.id = d.notification_id \
                     WHERE n.event_id = $1 OR n.id::text = $1",
                )
                .bind(&id)
                .fetch_all(&app.db)
                .await
                .unwrap();
                if let Some(failed) = statuses.iter().find(|(_, s, _)| s == "FAILED") {
                    panic!("{failed:?}");
                }
                !statuses.is_empty() && statuses.iter().all(|(_, s, _)| s == "SUCCESS")
            }
        })
        .await;
    }
    assert!(app.dead_letters().await.is_empty());
}

#[tokio::test]
async fn an_event_missing_a_required_field_is_dead_lettered_at_ingest_with_its_path_and_its_neighbours_go_on()
 {
    let app = spawn_app().await;
    let natural = json!({ "plan": "Premium", "amount": 9900, "currency": "KRW" });
    let before = event_with("SUBSCRIPTION_EXPIRING", 71, "en", natural.clone());
    let broken = event_with(
        "SUBSCRIPTION_EXPIRING",
        72,
        "en",
        json!({ "amount": "lots", "currency": "KRW" }),
    );
    let after = event_with("SUBSCRIPTION_CREATED", 73, "ko", natural);
    for event in [&before, &broken, &after] {
        publish(&app, "fluxpay.subscription.events", event).await;
    }

    for good in [&before, &after] {
        let id = good["eventId"].as_str().unwrap();
        wait_until(30, "the neighbours are delivered", || async {
            let deliveries = app.deliveries_of_event(id).await;
            !deliveries.is_empty() && deliveries.iter().all(|d| d.1 == "SUCCESS")
        })
        .await;
    }
    wait_until(10, "the broken event is dead-lettered", || async {
        !app.dead_letters().await.is_empty()
    })
    .await;
    let letters = app.dead_letters().await;
    assert_eq!(letters.len(), 1, "only the broken event is a dead letter");
    let (topic, headers, payload) = &letters[0];
    assert!(topic.ends_with("notification.dlq.subscription"), "{topic}");
    assert_eq!(headers["X-Error-Class"], "schema_violation");
    assert_eq!(headers["X-Event-Id"], broken["eventId"]);
    let message = headers["X-Error-Message"].as_str().unwrap();
    assert!(message.contains("data.plan: is required"), "{message}");
    assert!(message.contains("data.amount:"), "{message}");
    assert!(
        !message.contains("lots"),
        "the value is not echoed: {message}"
    );
    assert_eq!(payload, &broken.to_string().into_bytes());
    assert!(
        app.deliveries_of_event(broken["eventId"].as_str().unwrap())
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn the_intake_and_broadcasts_refuse_data_that_breaks_the_schema_with_400_naming_each_path() {
    let app = spawn_app().await;
    let notification = json!({
        "userId": 5, "eventType": "PAYMENT_FAILED",
        "data": { "amount": -3, "currency": "won", "orderId": "o-1" }
    });
    let broadcast = json!({
        "name": "renewal reminder", "audience": { "userIds": [1, 2] }, "channels": ["EMAIL"],
        "eventType": "SUBSCRIPTION_EXPIRING", "data": { "expiresAt": "next week" }
    });

    for (path, body) in [
        ("/api/v1/notifications", notification),
        ("/api/v1/broadcasts", broadcast),
    ] {
        let response = app.post_json(path, &body, &[]).await;

        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "schema_violation", "{path}: {body}");
        let paths: Vec<&str> = body["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        let message = body["error"]["message"].as_str().unwrap();
        for expected in paths.iter() {
            assert!(message.contains(expected), "{message} names {expected}");
        }
        if path.ends_with("notifications") {
            assert!(paths.contains(&"data.amount"), "{paths:?}");
            assert!(paths.contains(&"data.currency"), "{paths:?}");
        } else {
            assert!(paths.contains(&"data.plan"), "{paths:?}");
            assert!(paths.contains(&"data.expiresAt"), "{paths:?}");
        }
    }
    assert_eq!(app.notification_count().await, 0);
}

#[tokio::test]
async fn extra_fields_a_schema_does_not_declare_are_accepted_and_kept() {
    let app = spawn_app().await;

    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({
                "userId": 5, "channels": ["IN_APP"], "eventType": "ORDER_SHIPPED",
                "data": { "orderId": "o-5", "giftWrap": true }
            }),
            &[],
        )
        .await;

    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["notificationId"].clone();
    let stored: Value = app
        .get(&format!("/api/v1/notifications/{}", id.as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stored["data"]["giftWrap"], true);
}

#[tokio::test]
async fn event_types_are_published_with_their_schema_example_and_template_locales() {
    let app = spawn_app().await;
    let publisher = app
        .api_key("billing publisher", &["notifications:write"])
        .await;

    let items = list(&app).await;
    let names: Vec<&str> = items
        .iter()
        .map(|i| i["eventType"].as_str().unwrap())
        .collect();
    for expected in [
        "PAYMENT_COMPLETED",
        "PAYMENT_FAILED",
        "SUBSCRIPTION_EXPIRING",
        "ORDER_SHIPPED",
        "SYSTEM_INCIDENT",
        "ADHOC",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    let expiring = items
        .iter()
        .find(|i| i["eventType"] == "SUBSCRIPTION_EXPIRING")
        .unwrap();
    assert_eq!(expiring["topic"], "fluxpay.subscription.events");
    assert_eq!(expiring["channels"], json!(["EMAIL", "IN_APP"]));
    assert!(
        expiring["required"]
            .as_array()
            .unwrap()
            .contains(&json!("plan"))
    );

    let response = app
        .anonymous
        .get(format!("{}/api/v1/event-types/PAYMENT_FAILED", app.address))
        .bearer_auth(&publisher)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "a publisher may read the contract");
    let detail: Value = response.json().await.unwrap();
    assert_eq!(detail["schema"]["type"], "object");
    assert_eq!(detail["exampleEvent"]["eventType"], "PAYMENT_FAILED");
    assert_eq!(detail["exampleEvent"]["data"], detail["example"]);
    assert!(
        schemas()
            .get("PAYMENT_FAILED")
            .unwrap()
            .check(&detail["example"])
            .is_ok()
    );
    for locale in ["ko", "en"] {
        let parts = detail["templates"][locale].as_array().unwrap();
        assert!(
            parts.contains(&json!("email_subject")),
            "{locale}: {parts:?}"
        );
        assert!(parts.contains(&json!("slack")), "{locale}: {parts:?}");
    }

    let missing = app.get("/api/v1/event-types/PAYMENT_REFUNDED").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
}

#[tokio::test]
async fn the_openapi_document_carries_each_event_types_schema() {
    let app = spawn_app().await;

    let doc = crate::docs::openapi(&app).await;

    let components = &doc["components"]["schemas"];
    for schema in schemas().iter() {
        let published = &components[format!("EventData_{}", schema.name())];
        assert_eq!(published["type"], "object", "{}", schema.name());
        assert_eq!(published["required"], schema.document()["required"]);
        assert!(published.get("$id").is_none());
    }
}
