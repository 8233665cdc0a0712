//! Preferences (`/api/v1/notifications/settings`) and the user directory
//! (`/api/v1/users/{id}/contact`).

use serde_json::{Value, json};

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn settings_put_then_get_round_trips_and_defaults_are_on() {
    let app = spawn_app().await;
    let before: Value = app
        .get("/api/v1/notifications/settings?userId=9")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        before["channels"],
        json!({ "EMAIL": true, "IN_APP": true, "SMS": true, "KAKAOTALK": true, "PUSH": true })
    );

    let wanted = json!({
        "channels": { "SMS": false },
        "eventTypes": { "ORDER_SHIPPED": { "IN_APP": false } }
    });
    let put = app
        .put_json("/api/v1/notifications/settings?userId=9", &wanted)
        .await;
    assert_eq!(put.status(), 200);
    let after: Value = app
        .get("/api/v1/notifications/settings?userId=9")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(after["userId"], 9);
    assert_eq!(after["channels"]["SMS"], false);
    assert_eq!(after["channels"]["EMAIL"], true);
    assert_eq!(
        after["eventTypes"],
        json!({ "ORDER_SHIPPED": { "IN_APP": false } })
    );
}

#[tokio::test]
async fn a_put_invalidates_the_cached_settings() {
    let app = spawn_app().await;
    let path = "/api/v1/notifications/settings?userId=12";
    app.put_json(path, &json!({ "channels": { "EMAIL": false } }))
        .await;
    let cached: Value = app.get(path).await.json().await.unwrap();
    assert_eq!(cached["channels"]["EMAIL"], false);
    let mut redis = app.redis.clone();
    let in_cache: Option<String> = redis::cmd("GET")
        .arg(format!("{}prefs:v2:12", app.settings.redis.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(in_cache.is_some(), "a read fills the cache");

    app.put_json(path, &json!({ "channels": { "EMAIL": true } }))
        .await;
    let fresh: Value = app.get(path).await.json().await.unwrap();

    assert_eq!(fresh["channels"]["EMAIL"], true);
}

#[tokio::test]
async fn settings_still_work_with_redis_down() {
    let app = spawn_app_with(|s| s.redis.url = "redis://127.0.0.1:1".to_owned().into()).await;
    let path = "/api/v1/notifications/settings?userId=13";

    let put = app
        .put_json(path, &json!({ "channels": { "PUSH": false } }))
        .await;
    let get = app.get(path).await;

    assert_eq!(put.status(), 200);
    assert_eq!(get.status(), 200);
    let body: Value = get.json().await.unwrap();
    assert_eq!(body["channels"]["PUSH"], false);
}

#[tokio::test]
async fn invalid_settings_get_400_with_the_error_body() {
    let app = spawn_app().await;
    let cases = [
        (
            "/api/v1/notifications/settings?userId=9",
            json!({ "channels": { "FAX": false } }),
        ),
        (
            "/api/v1/notifications/settings?userId=9",
            json!({ "channels": { "SLACK": false } }),
        ),
        (
            "/api/v1/notifications/settings?userId=9",
            json!({ "channels": { "EMAIL": "no" } }),
        ),
        (
            "/api/v1/notifications/settings?userId=9",
            json!({ "eventTypes": { "NOPE": { "EMAIL": false } } }),
        ),
        (
            "/api/v1/notifications/settings?userId=9",
            json!({ "colour": "blue" }),
        ),
        ("/api/v1/notifications/settings?userId=0", json!({})),
        ("/api/v1/notifications/settings", json!({})),
        ("/api/v1/notifications/settings?userId=abc", json!({})),
    ];
    for (path, body) in cases {
        let response = app.put_json(path, &body).await;
        assert_eq!(response.status(), 400, "{path} {body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_request", "{path} {body}");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM user_preferences")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn contacts_are_validated_stored_and_read_back() {
    let app = spawn_app().await;

    let put = app
        .put_json(
            "/api/v1/users/5/contact",
            &json!({ "email": "five@example.com", "phone": "+82 10-5555-0005", "locale": "ko-KR", "timezone": "Asia/Seoul" }),
        )
        .await;
    assert_eq!(put.status(), 200);
    let read: Value = app
        .get("/api/v1/users/5/contact")
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(read["userId"], 5);
    assert_eq!(read["email"], "five@example.com");
    assert_eq!(read["phone"], "+821055550005");
    assert_eq!(read["locale"], "ko");
    assert_eq!(read["timezone"], "Asia/Seoul");
    for bad in [
        json!({ "email": "five" }),
        json!({ "phone": "12345" }),
        json!({ "locale": "fr" }),
        json!({ "timezone": "Mars/Base" }),
        json!({ "nickname": "x" }),
    ] {
        let response = app.put_json("/api/v1/users/5/contact", &bad).await;
        assert_eq!(response.status(), 400, "{bad}");
    }
    assert_eq!(app.get("/api/v1/users/6/contact").await.status(), 404);
    assert_eq!(app.get("/api/v1/users/-6/contact").await.status(), 400);
}
