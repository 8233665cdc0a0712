//! The in-app streams (`GET /api/v1/users/{id}/inbox/stream`) against the real Redis: one
//! shared subscription per instance, fanned out per user, with caps.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{TestApp, spawn_app_with, wait_until};

fn stream_path(user: i64) -> String {
    format!("/api/v1/users/{user}/inbox/stream")
}

fn channel(app: &TestApp, user: i64) -> String {
    format!("{}inapp:user:{user}", app.settings.redis.key_prefix)
}

/// PUBLISHes on a user's channel; returns how many Redis clients received it.
async fn publish(app: &TestApp, user: i64, payload: &str) -> i64 {
    let mut redis = app.redis.clone();
    redis::cmd("PUBLISH")
        .arg(channel(app, user))
        .arg(payload)
        .query_async(&mut redis)
        .await
        .unwrap()
}

/// Redis clients subscribed to a user's channel.
async fn subscribers(app: &TestApp, user: i64) -> i64 {
    let mut redis = app.redis.clone();
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel(app, user))
        .query_async(&mut redis)
        .await
        .unwrap();
    count
}

/// The `sub=` counts of Redis's pub/sub clients, from CLIENT LIST.
async fn pubsub_clients(app: &TestApp) -> Vec<u64> {
    let mut redis = app.redis.clone();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .unwrap();
    list.lines()
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("sub="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// Reads a stream until its text contains `needle`.
async fn read_until(stream: &mut reqwest::Response, needle: &str) -> String {
    let mut received = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !received.contains(needle) {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .unwrap_or_else(|_| panic!("{needle} within 10 s; got {received}"))
            .unwrap()
            .expect("the stream stays open");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    received
}

async fn open(app: &TestApp, user: i64) -> reqwest::Response {
    let stream = app.get(&stream_path(user)).await;
    assert_eq!(stream.status(), 200);
    stream
}

/// Checks a refusal: its status, the JSON error code and a Retry-After.
async fn assert_refused(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status);
    let retry_after = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(retry_after.parse::<u64>().unwrap() > 0, "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn several_streams_of_one_user_each_get_every_message_once_over_one_subscription() {
    let app = spawn_app_with(|_| {}).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open(&app, 41).await);
    }

    assert_eq!(
        subscribers(&app, 41).await,
        1,
        "one subscription for three streams"
    );
    assert_eq!(publish(&app, 41, r#"{"n":"first"}"#).await, 1);
    assert_eq!(publish(&app, 41, r#"{"n":"second"}"#).await, 1);
    for stream in &mut streams {
        let received = read_until(stream, "second").await;
        assert_eq!(received.matches("first").count(), 1, "{received}");
        assert!(received.contains("event: notification"), "{received}");
    }

    // The last stream of the user to close unsubscribes (the server notices a closed
    // stream when it next writes to it).
    drop(streams);
    wait_until(15, "the user's channel is unsubscribed", || async {
        publish(&app, 41, "{}").await;
        subscribers(&app, 41).await == 0
    })
    .await;
}

#[tokio::test]
async fn streams_beyond_the_user_cap_get_429_and_beyond_the_instance_cap_503() {
    let app = spawn_app_with(|s| {
        s.limits.streams_per_user = 2;
        s.limits.streams_per_instance = 3;
    })
    .await;
    let mut first = open(&app, 51).await;
    let _second = open(&app, 51).await;

    assert_refused(app.get(&stream_path(51)).await, 429, "too_many_requests").await;
    let _other = open(&app, 52).await;
    assert_refused(app.get(&stream_path(53)).await, 503, "overloaded").await;

    // The streams still open keep working, and a closed one gives its place back.
    publish(&app, 51, r#"{"n":"still here"}"#).await;
    read_until(&mut first, "still here").await;
    drop(first);
    wait_until(15, "a closed stream's place is free again", || async {
        publish(&app, 51, "{}").await;
        app.get(&stream_path(53)).await.status() == 200
    })
    .await;
}

#[tokio::test]
async fn streams_of_many_users_share_one_redis_connection() {
    let app = spawn_app_with(|_| {}).await;
    let _warm = open(&app, 60).await;
    let before = pubsub_clients(&app).await.len();

    let mut streams = Vec::new();
    for user in 61..=80 {
        streams.push(open(&app, user).await);
    }

    let after = pubsub_clients(&app).await;
    // Other tests share this Redis and may open a stream or two meanwhile; a connection
    // per stream would add 20.
    assert!(
        after.len() <= before + 3,
        "{} pub/sub clients before, {} after 20 streams",
        before,
        after.len()
    );
    assert!(
        after.iter().any(|subs| *subs >= 21),
        "one client holds every user's subscription: {after:?}"
    );
    for user in 61..=80 {
        assert_eq!(publish(&app, user, r#"{"n":"hello"}"#).await, 1);
    }
    for stream in &mut streams {
        read_until(stream, "hello").await;
    }
}

#[tokio::test]
async fn when_the_shared_connection_is_lost_streams_end_and_new_ones_work_after_the_reconnect() {
    let app = spawn_app_with(|_| {}).await;
    // Thirteen users: no other test's hub holds exactly thirteen subscriptions, which
    // singles this instance's connection out in CLIENT LIST.
    let mut streams = Vec::new();
    for user in 101..=113 {
        streams.push(open(&app, user).await);
    }
    let mut redis = app.redis.clone();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .unwrap();
    let ids: Vec<String> = list
        .lines()
        .filter(|line| line.split(' ').any(|field| field == "sub=13"))
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 1, "{list}");

    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&ids[0])
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(killed, 1);

    for stream in &mut streams {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = stream.chunk().await {}
        })
        .await;
        assert!(ended.is_ok(), "a stream outlived its lost subscription");
    }
    drop(streams);
    let mut again = open(&app, 101).await;
    assert_eq!(
        publish(&app, 101, r#"{"n":"after the reconnect"}"#).await,
        1
    );
    read_until(&mut again, "after the reconnect").await;
}
